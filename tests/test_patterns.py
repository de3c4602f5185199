"""PathMatcher: the glob rules every route into the pipeline (watch, rescan, enqueue) shares."""

from __future__ import annotations

import pytest

from dpypeline.watching.patterns import PathMatcher


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # "**" as a whole segment crosses zero or more directories
        ("**/x.nc", "x.nc", True),
        ("**/x.nc", "a/b/x.nc", True),
        ("**/x.nc", "a/b/y.nc", False),
        ("**/x.nc", "ax.nc", False),
        ("a/**", "a/f.nc", True),
        ("a/**", "a/b/c/f.nc", True),
        ("a/**", "a", False),
        ("a/**", "b/a/f.nc", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/xb", False),
        ("a/**/b", "b", False),
        ("a/**/**/b", "a/x/b", True),
        ("**", "any/thing/at/all.nc", True),
        ("**/ORCA*-N06_*m*T.nc", "means/1990/ORCA0083-N06_19900105d05T.nc", False),
        ("**/ORCA*-N06_*m*T.nc", "means/1990/ORCA0083-N06_1990m01T.nc", True),
        # "*" and "?" stop at "/"
        ("a/*.nc", "a/f.nc", True),
        ("a/*.nc", "a/b/f.nc", False),
        ("a/?.nc", "a/1.nc", True),
        ("a/?.nc", "a/12.nc", False),
        ("a?b/f", "a/b/f", False),
        ("a**b/f", "axyb/f", True),
        ("a**b/f", "ax/yb/f", False),
        # a pattern without "/" matches the file name at any depth
        ("*.nc", "f.nc", True),
        ("*.nc", "y/2020/f.nc", True),
        ("*.nc", "y/2020/f.nc.tmp", False),
        ("*.nc", "d.nc/f.txt", False),
        ("f.nc", "y/f.nc", True),
        # a "/" anywhere anchors the pattern at the watch root
        ("y/*.nc", "y/f.nc", True),
        ("y/*.nc", "z/y/f.nc", False),
        ("/f.nc", "f.nc", True),
        ("/f.nc", "a/f.nc", False),
        ("./f.nc", "f.nc", True),
        # a trailing "/" names a directory: every file under it
        ("raw/", "raw/f.nc", True),
        ("raw/", "x/raw/y/f.nc", True),
        ("raw/", "raw", False),
        ("x/raw/", "x/raw/f.nc", True),
        ("x/raw/", "y/x/raw/f.nc", False),
        # character classes
        ("f[0-9].nc", "f7.nc", True),
        ("f[0-9].nc", "fa.nc", False),
        ("f[!0-9].nc", "fa.nc", True),
        ("f[!0-9].nc", "f7.nc", False),
        ("a[!x]b/f", "a/b/f", False),
        ("f[]x].nc", "f].nc", True),
        ("f[!]].nc", "f].nc", False),
        ("f[!]].nc", "fa.nc", True),
        ("f[^x].nc", "f^.nc", True),
        ("f[^x].nc", "fa.nc", False),
        ("f[ab.nc", "f[ab.nc", True),
        # regex metacharacters are literal
        ("f(1)+.nc", "f(1)+.nc", True),
        ("f(1)+.nc", "f11.nc", False),
        ("f.nc", "fxnc", False),
        (r"f\*.nc", "f*.nc", True),
        (r"f\*.nc", "fa.nc", False),
        # names with newlines or spaces are still file names
        ("*.nc", "a b/c\nd.nc", True),
    ],
)
def test_glob_matches_relative_paths(pattern: str, path: str, expected: bool) -> None:
    assert PathMatcher([pattern], [], case_sensitive=True).matches(path) is expected


def test_any_of_several_patterns_is_enough() -> None:
    matcher = PathMatcher(["*.nc", "grid/*.grib"], [], case_sensitive=True)
    assert matcher.matches("a/f.nc")
    assert matcher.matches("grid/g.grib")
    assert not matcher.matches("a/grid/g.grib")
    assert not matcher.matches("f.txt")


def test_empty_pattern_list_matches_nothing() -> None:
    assert not PathMatcher([], [], case_sensitive=True).matches("f.nc")


@pytest.mark.parametrize(
    ("ignore", "path", "ignored"),
    [
        # without "/": tested against every component
        (".*", ".hidden/f.nc", True),
        (".*", "d/.f.nc.XYZ", True),
        (".*", "a/.git/objects/f.nc", True),
        (".*", "a/b.c/f.nc", False),
        ("*.tmp", "f.nc.tmp", True),
        ("*.tmp", "x.tmp/f.nc", True),
        ("*.tmp", "xtmp/f.nc", False),
        (".snapshot", "a/.snapshot/b/f.nc", True),
        (".snapshot", "a/.snapshots/f.nc", False),
        # a trailing "/" only ignores directories
        ("scratch/", "scratch/f.nc", True),
        ("scratch/", "a/scratch/f.nc", True),
        ("scratch/", "scratch", False),
        # with "/": the whole path, or one of its parent directories
        ("logs/old", "logs/old", True),
        ("logs/old", "logs/old/f.nc", True),
        ("logs/old", "logs/older/f.nc", False),
        ("logs/old", "x/logs/old/f.nc", False),
        ("a/*/tmp", "a/b/tmp/f.nc", True),
        ("a/**", "a/b/f.nc", True),
        ("a/**", "ab/f.nc", False),
        ("**/work/*.nc", "x/y/work/f.nc", True),
        ("**/work/*.nc", "x/y/work/f.txt", False),
    ],
)
def test_ignore_patterns_exclude_paths(ignore: str, path: str, ignored: bool) -> None:
    matcher = PathMatcher(["**"], [ignore], case_sensitive=True)
    assert matcher.matches(path) is not ignored


def test_spec_example_watch() -> None:
    matcher = PathMatcher(["**/ORCA*-N06_*m*T.nc"], ["*.tmp", ".*"], case_sensitive=True)
    assert matcher.matches("1990/ORCA0083-N06_1990m01T.nc")
    assert not matcher.matches("1990/.ORCA0083-N06_1990m01T.nc.Xy12ab")  # rsync temp name
    assert not matcher.matches(".staging/ORCA0083-N06_1990m01T.nc")
    assert not matcher.matches("1990/ORCA0083-N06_1990m01T.nc.tmp")


def test_case_insensitive_matching() -> None:
    insensitive = PathMatcher(["**/DATA/*.NC"], ["*.TMP"], case_sensitive=False)
    assert insensitive.matches("x/data/f.nc")
    assert insensitive.matches("x/Data/F.Nc")
    assert not insensitive.matches("x/data/f.nc/y.tmp")
    assert not insensitive.matches("x/data.tmp/f.nc")
    sensitive = PathMatcher(["**/DATA/*.NC"], ["*.TMP"], case_sensitive=True)
    assert not sensitive.matches("x/data/f.nc")
    assert sensitive.matches("x/DATA/F.NC")
    assert PathMatcher(["f[a-c].nc"], [], case_sensitive=False).matches("FB.NC")


@pytest.mark.parametrize(
    ("ignore", "directory", "could_contain"),
    [
        (".*", ".git", False),
        (".*", "a/.snapshot", False),
        (".*", "a/b", True),
        ("scratch/", "a/scratch", False),
        ("*.tmp", "out.tmp", False),
        ("logs/old", "logs/old", False),
        ("logs/old", "logs", True),
        ("logs/old", "x/logs/old", True),
        ("a/**", "a", False),
        ("a/**", "a/b", False),
        ("a/**", "b", True),
        ("a/*/tmp", "a/b/tmp", False),
        ("a/*/tmp", "a/b", True),
        ("*.nc", "x", True),
    ],
)
def test_could_contain_prunes_ignored_directories(
    ignore: str, directory: str, could_contain: bool
) -> None:
    matcher = PathMatcher(["**"], [ignore], case_sensitive=True)
    assert matcher.could_contain(directory) is could_contain
    # pruning never hides a file that matches() would take
    if not could_contain:
        assert not matcher.matches(directory + "/f.nc")
        assert not matcher.matches(directory + "/x/y/f.nc")


def test_root_is_never_pruned() -> None:
    assert PathMatcher(["**"], [".*", "*"], case_sensitive=True).could_contain("")


def test_no_ignore_patterns_prunes_nothing() -> None:
    matcher = PathMatcher(["*.nc"], [], case_sensitive=True)
    assert matcher.could_contain(".git")
    assert matcher.matches(".git/f.nc")


def test_invalid_glob_names_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"'f\[z-a\]\.nc'"):
        PathMatcher(["f[z-a].nc"], [], case_sensitive=True)
    with pytest.raises(ValueError, match="x/"):
        PathMatcher(["*.nc"], ["x/[9-0]"], case_sensitive=True)


def test_hundreds_of_patterns_and_ignores_combine() -> None:
    patterns = [f"run{i}/**/*.nc" for i in range(200)]
    matcher = PathMatcher(patterns, [f"*.tmp{i}" for i in range(200)], case_sensitive=True)
    assert matcher.matches("run199/a/b/f.nc")
    assert not matcher.matches("run200/a/f.nc")
    assert not matcher.matches("run5/a/f.nc.tmp7/g.nc")


def test_blank_patterns_match_and_ignore_nothing() -> None:
    assert not PathMatcher([""], [], case_sensitive=True).matches("f.nc")
    assert PathMatcher(["*.nc"], ["", "/"], case_sensitive=True).matches("f.nc")
