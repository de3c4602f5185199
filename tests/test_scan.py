"""scan: the rescan finds every matching regular file, in natural order, whatever the tree does."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest

from dpypeline.watching.patterns import PathMatcher
from dpypeline.watching.scan import FileVersion, ScanResult, natural_key, scan

NC = PathMatcher(["**/*.nc"], [".*", "*.tmp"], case_sensitive=True)


def _touch(path: Path, content: bytes = b"x", mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _rel(root: Path, result: ScanResult) -> list[str]:
    return [Path(v.path).relative_to(root).as_posix() for v in result.files]


def test_natural_key_orders_digit_runs_as_numbers() -> None:
    names = ["f10.nc", "f2.nc", "f1.nc", "F3.nc", "f02.nc", "y10/a.nc", "y2/b.nc", "f2.nc5", "g.nc"]
    assert sorted(names, key=natural_key) == [
        "F3.nc",  # case-sensitive: upper case sorts first
        "f1.nc",
        "f02.nc",  # ties with f2.nc as a number; the plain string breaks the tie
        "f2.nc",
        "f2.nc5",
        "f10.nc",
        "g.nc",
        "y2/b.nc",
        "y10/a.nc",
    ]


def test_natural_key_never_compares_text_with_numbers() -> None:
    names = ["1", "a", "1a", "a1", "", "10", "a/1", "a1/", "2020-01-05", "2020-1-5"]
    for shuffled in (names, names[::-1]):
        assert sorted(shuffled, key=natural_key) == sorted(names, key=natural_key)


def _reference_key(path: str) -> tuple[list[str | int], str]:
    """Natural order spelled out: text and numbers alternate, compared piece by piece."""
    parts: list[str | int] = list(re.split(r"([0-9]+)", path))
    parts[1::2] = [int(p) for p in parts[1::2]]
    return parts, path


def test_natural_key_agrees_with_piecewise_comparison() -> None:
    rng = random.Random(20240607)
    alphabet = "ab0129/._-Z~"
    for _ in range(5000):
        names = ["".join(rng.choices(alphabet, k=rng.randint(0, 9))) for _ in range(8)]
        names.append("x" + "9" * 120)  # a number longer than any fixed width
        assert sorted(names, key=natural_key) == sorted(names, key=_reference_key)


def test_scan_returns_file_versions_with_size_and_mtime(tmp_path: Path) -> None:
    path = _touch(tmp_path / "a" / "f.nc", b"12345", mtime_ns=1_700_000_000_123_456_789)
    result = scan(tmp_path, NC)
    assert result.files == [FileVersion(str(path), 5, 1_700_000_000_123_456_789)]
    assert result.errors == []
    assert result.vanished == 0
    assert os.path.isabs(result.files[0].path)


def test_scan_accepts_relative_root_and_returns_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path / "w" / "f.nc")
    monkeypatch.chdir(tmp_path)
    assert [v.path for v in scan("w", NC).files] == [str(tmp_path / "w" / "f.nc")]


def test_scan_walks_nested_dirs_in_natural_order(tmp_path: Path) -> None:
    for rel in ["y10/f1.nc", "y2/f10.nc", "y2/f2.nc", "y2/m3/f1.nc", "f10.nc", "f2.nc", "y1.nc"]:
        _touch(tmp_path / rel)
    _touch(tmp_path / "y2" / "notes.txt")
    assert _rel(tmp_path, scan(tmp_path, NC)) == [
        "f2.nc",
        "f10.nc",
        "y1.nc",
        "y2/f2.nc",
        "y2/f10.nc",
        "y2/m3/f1.nc",
        "y10/f1.nc",
    ]


def test_scan_order_does_not_depend_on_directory_order(tmp_path: Path) -> None:
    names = [f"f{i}.nc" for i in range(300)]
    for name in reversed(names):
        _touch(tmp_path / "d" / name)
    assert _rel(tmp_path, scan(tmp_path, NC)) == [f"d/{n}" for n in names]


def test_scan_order_is_natural_key_order_of_relative_paths(tmp_path: Path) -> None:
    rng = random.Random(7)
    rels = set()
    for _ in range(400):
        depth = rng.randint(0, 3)
        dirs = [
            rng.choice(["y", "y0", "m", "run_", "a-b"]) + str(rng.randint(0, 12))
            for _ in range(depth)
        ]
        rels.add("/".join([*dirs, f"f{rng.randint(0, 30):0{rng.randint(1, 3)}}.nc"]))
    for rel in rels:
        _touch(tmp_path / rel)
    expected = sorted(
        (p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.nc")), key=_reference_key
    )
    assert _rel(tmp_path, scan(tmp_path, NC)) == expected


def test_ignored_directories_are_not_entered(tmp_path: Path) -> None:
    _touch(tmp_path / "keep" / "f.nc")
    _touch(tmp_path / ".snapshot" / "f.nc")
    _touch(tmp_path / "keep" / ".git" / "objects" / "f.nc")
    _touch(tmp_path / "keep" / ".f.nc.Ab12Cd")  # an rsync temporary file
    _touch(tmp_path / "out.tmp" / "f.nc")
    entered: list[str] = []

    class Recording(PathMatcher):
        def could_contain(self, reldir: str) -> bool:
            entered.append(reldir)
            return super().could_contain(reldir)

    matcher = Recording(["**/*.nc"], [".*", "*.tmp"], case_sensitive=True)
    assert _rel(tmp_path, scan(tmp_path, matcher)) == ["keep/f.nc"]
    assert sorted(entered) == [".snapshot", "keep", "keep/.git", "out.tmp"]  # asked, not entered


def test_symlinks_are_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _touch(outside / "secret.nc")
    root = tmp_path / "root"
    _touch(root / "real.nc")
    (root / "link.nc").symlink_to(root / "real.nc")
    (root / "out.nc").symlink_to(outside / "secret.nc")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "dangling.nc").symlink_to(tmp_path / "nowhere.nc")
    result = scan(root, NC)
    assert _rel(root, result) == ["real.nc"]
    assert result.errors == []


def test_only_regular_files_are_taken(tmp_path: Path) -> None:
    _touch(tmp_path / "f.nc")
    os.mkfifo(tmp_path / "pipe.nc")
    (tmp_path / "dir.nc").mkdir()
    assert _rel(tmp_path, scan(tmp_path, NC)) == ["f.nc"]


def test_file_vanishing_mid_walk_is_counted_not_returned(tmp_path: Path) -> None:
    _touch(tmp_path / "a.nc")
    _touch(tmp_path / "b.nc")
    _touch(tmp_path / "c.nc")

    class DeletesB(PathMatcher):
        """Removes b.nc after it was listed and before it is looked at, as a mover would."""

        def matches(self, relpath: str) -> bool:
            if relpath == "b.nc":
                os.unlink(tmp_path / "b.nc")
            return super().matches(relpath)

    result = scan(tmp_path, DeletesB(["*.nc"], [], case_sensitive=True))
    assert _rel(tmp_path, result) == ["a.nc", "c.nc"]
    assert result.vanished == 1
    assert result.errors == []


def test_directory_vanishing_mid_walk_is_counted_not_an_error(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "f.nc")
    _touch(tmp_path / "b" / "f.nc")

    class DeletesB(PathMatcher):
        def could_contain(self, reldir: str) -> bool:
            if reldir == "b":
                shutil.rmtree(tmp_path / "b")
            return super().could_contain(reldir)

    result = scan(tmp_path, DeletesB(["*.nc"], [], case_sensitive=True))
    assert _rel(tmp_path, result) == ["a/f.nc"]
    assert result.vanished == 1
    assert result.errors == []


def test_unreadable_directory_is_reported_and_the_walk_goes_on(tmp_path: Path) -> None:
    """A directory that cannot be listed is an error; its siblings are still scanned.

    chmod 000 does not stop root, so the failure is produced by replacing the directory with
    a file after it was listed: ``scandir`` then fails with ENOTDIR, an OSError like EACCES.
    """
    _touch(tmp_path / "a" / "f.nc")
    _touch(tmp_path / "b" / "f.nc")
    _touch(tmp_path / "c" / "f.nc")

    class ReplacesB(PathMatcher):
        def could_contain(self, reldir: str) -> bool:
            if reldir == "b":
                shutil.rmtree(tmp_path / "b")
                _touch(tmp_path / "b")
            return super().could_contain(reldir)

    result = scan(tmp_path, ReplacesB(["*.nc"], [], case_sensitive=True))
    assert _rel(tmp_path, result) == ["a/f.nc", "c/f.nc"]
    assert [(path, type(exc)) for path, exc in result.errors] == [
        (str(tmp_path / "b"), NotADirectoryError)
    ]


def test_permission_denied_directory_is_reported(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads a chmod 000 directory anyway")
    _touch(tmp_path / "a" / "f.nc")
    _touch(tmp_path / "locked" / "f.nc")
    (tmp_path / "locked").chmod(0)
    try:
        result = scan(tmp_path, NC)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert _rel(tmp_path, result) == ["a/f.nc"]
    assert [(path, type(exc)) for path, exc in result.errors] == [
        (str(tmp_path / "locked"), PermissionError)
    ]


def test_missing_root_is_an_error_not_an_exception(tmp_path: Path) -> None:
    result = scan(tmp_path / "missing", NC)
    assert result.files == []
    assert [type(exc) for _, exc in result.errors] == [FileNotFoundError]


def test_files_not_matching_are_not_returned(tmp_path: Path) -> None:
    _touch(tmp_path / "2020" / "ORCA0083-N06_2020m01T.nc")
    _touch(tmp_path / "2020" / "ORCA0083-N06_2020m01U.nc")
    _touch(tmp_path / "2020" / "ORCA0083-N06_2020m01T.nc.tmp")
    matcher = PathMatcher(["**/ORCA*-N06_*m*T.nc"], ["*.tmp", ".*"], case_sensitive=True)
    assert _rel(tmp_path, scan(tmp_path, matcher)) == ["2020/ORCA0083-N06_2020m01T.nc"]


def test_unsorted_scan_finds_the_same_files(tmp_path: Path) -> None:
    for rel in ("y10/f2.nc", "y2/f10.nc", "y2/f9.nc", "a.tmp", ".hidden/x.nc", "z.txt"):
        _touch(tmp_path / rel)
    sorted_files = scan(tmp_path, NC).files
    unsorted = scan(tmp_path, NC, sort=False).files
    assert sorted(unsorted, key=lambda f: f.path) == sorted(sorted_files, key=lambda f: f.path)
    assert sorted(unsorted, key=lambda f: natural_key(f.path)) == sorted_files


def test_known_paths_are_taken_without_matching_again(tmp_path: Path) -> None:
    taken = _touch(tmp_path / "d" / "f.nc")
    _touch(tmp_path / "d" / "g.txt")
    asked: list[str] = []

    class Counting(PathMatcher):
        def matches(self, relpath: str) -> bool:
            asked.append(relpath)
            return super().matches(relpath)

    matcher = Counting(["**/*.nc"])
    assert _rel(tmp_path, scan(tmp_path, matcher, known={str(taken)})) == ["d/f.nc"]
    assert asked == ["d/g.txt"]
