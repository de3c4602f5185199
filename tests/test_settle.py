"""settle: a file is handed on once, only when complete (closed or moved into place) and
unchanged for its settle time. Real files in tmp_path, mtimes set with os.utime, and explicit
``now`` values: no sleeping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpypeline.watching.settle import RECHECK, Settler, StableFile

ROOT = "/watched"


def write(path: Path, content: bytes = b"data", mtime_ns: int = 1_000_000_000) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return str(path)


def stable(path: str, size: int, mtime_ns: int = 1_000_000_000) -> StableFile:
    return StableFile(ROOT, path, size, mtime_ns)


@pytest.fixture
def settler() -> Settler:
    return Settler()


def test_file_still_being_written_is_never_emitted(settler: Settler, tmp_path: Path) -> None:
    f = write(tmp_path / "a.nc")
    settler.note(f, ROOT, 2.0, 0.0, eligible=False)
    assert f in settler
    assert settler.next_deadline() is None
    for now in (1.0, 2.0, 100.0, 1e9):
        assert settler.poll(now) == []
    assert len(settler) == 1


def test_complete_unchanged_file_is_emitted_once_after_its_settle_time(
    settler: Settler,
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "a.nc", b"12345")
    settler.note(f, ROOT, 2.0, 10.0, eligible=True)
    assert settler.next_deadline() == 12.0
    assert settler.poll(11.999) == []
    assert settler.poll(12.0) == [stable(f, 5)]
    assert f not in settler
    assert len(settler) == 0
    assert settler.next_deadline() is None
    assert settler.poll(13.0) == []
    assert settler.poll(1e9) == []


def test_repeated_eligible_notes_of_an_unchanged_file_keep_the_first_deadline(
    settler: Settler,
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "a.nc")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    settler.note(f, ROOT, 2.0, 1.5, eligible=True)  # a poll that saw the same file
    settler.note(f, ROOT, 2.0, 1.9, eligible=True, sig=(4, 1_000_000_000))
    assert settler.next_deadline() == 2.0
    assert settler.poll(2.0) == [stable(f, 4)]
    assert settler.poll(3.9) == []


def test_change_during_settle_restarts_the_clock(settler: Settler, tmp_path: Path) -> None:
    path = tmp_path / "a.nc"
    f = write(path, b"1234")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    write(path, b"12345678", mtime_ns=2_000_000_000)  # appended without an event
    assert settler.poll(2.0) == []
    assert f in settler
    assert settler.next_deadline() == 4.0
    assert settler.poll(3.99) == []
    assert settler.poll(4.0) == [stable(f, 8, 2_000_000_000)]


def test_mtime_change_alone_restarts_the_clock(settler: Settler, tmp_path: Path) -> None:
    path = tmp_path / "a.nc"
    f = write(path, b"1234")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    os.utime(path, ns=(5_000_000_000, 5_000_000_000))  # rewritten in place, same size
    assert settler.poll(2.0) == []
    assert settler.poll(4.0) == [stable(f, 4, 5_000_000_000)]


def test_eligible_note_with_a_new_signature_restarts_the_clock(
    settler: Settler,
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.nc"
    write(path, b"1234")
    f = str(path)
    settler.note(f, ROOT, 2.0, 0.0, eligible=True, sig=(2, 1))
    write(path, b"1234", mtime_ns=7)
    settler.note(f, ROOT, 2.0, 1.0, eligible=True, sig=(4, 7))
    assert settler.next_deadline() == 3.0  # the deadline at 2.0 is stale
    assert settler.poll(2.5) == []
    assert settler.poll(3.0) == [stable(f, 4, 7)]


def test_file_that_vanished_during_settle_is_dropped(settler: Settler, tmp_path: Path) -> None:
    path = tmp_path / "a.nc"
    f = write(path)
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    path.unlink()
    assert settler.poll(2.0) == []
    assert f not in settler
    path.write_bytes(b"back")  # not noted again: still nothing
    assert settler.poll(10.0) == []


def test_eligible_note_of_a_missing_file_is_not_tracked(
    settler: Settler,
    tmp_path: Path,
) -> None:
    settler.note(str(tmp_path / "missing.nc"), ROOT, 2.0, 0.0, eligible=True)
    assert len(settler) == 0
    assert settler.next_deadline() is None


def test_missing_file_drops_a_candidate_that_was_being_written(
    settler: Settler,
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.nc"
    f = write(path)
    settler.note(f, ROOT, 2.0, 0.0, eligible=False)
    path.unlink()
    settler.note(f, ROOT, 2.0, 1.0, eligible=True)  # "moved away" seen as a close
    assert f not in settler


def test_directory_is_dropped(settler: Settler, tmp_path: Path) -> None:
    d = tmp_path / "looks-like.nc"
    d.mkdir()
    settler.note(str(d), ROOT, 2.0, 0.0, eligible=True)
    assert settler.poll(2.0) == []
    assert str(d) not in settler


def test_file_replaced_by_a_directory_during_settle_is_dropped(
    settler: Settler,
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.nc"
    f = write(path)
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    path.unlink()
    path.mkdir()
    assert settler.poll(2.0) == []
    assert f not in settler


def test_write_after_close_waits_for_the_next_close(settler: Settler, tmp_path: Path) -> None:
    path = tmp_path / "a.nc"
    f = write(path, b"1")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    settler.note(f, ROOT, 2.0, 1.0, eligible=False)  # opened again for writing
    assert settler.next_deadline() is None
    assert settler.poll(2.0) == []
    assert settler.poll(500.0) == []
    assert f in settler
    write(path, b"12", mtime_ns=3_000_000_000)
    settler.note(f, ROOT, 2.0, 600.0, eligible=True)
    assert settler.next_deadline() == 602.0
    assert settler.poll(601.0) == []
    assert settler.poll(602.0) == [stable(f, 2, 3_000_000_000)]


def test_write_after_close_waits_even_when_the_file_looks_unchanged(
    settler: Settler,
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "a.nc")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    settler.note(f, ROOT, 2.0, 1.0, eligible=False)
    settler.note(f, ROOT, 2.0, 5.0, eligible=True)  # same size and mtime as before
    assert settler.next_deadline() == 7.0
    assert settler.poll(6.9) == []
    assert settler.poll(7.0) == [stable(f, 4)]


def test_files_come_out_in_deadline_order_then_note_order(
    settler: Settler,
    tmp_path: Path,
) -> None:
    files = {n: write(tmp_path / f"{n}.nc", n.encode()) for n in ("a", "b", "c", "d", "e")}
    settler.note(files["a"], ROOT, 5.0, 0.0, eligible=True)  # due 5
    settler.note(files["c"], ROOT, 3.0, 0.0, eligible=True)  # due 3
    settler.note(files["b"], ROOT, 1.0, 2.0, eligible=True)  # due 3, noted after c
    settler.note(files["d"], ROOT, 1.0, 2.0, eligible=True)  # due 3, noted after b
    settler.note(files["e"], ROOT, 0.5, 2.0, eligible=True)  # due 2.5
    assert settler.next_deadline() == 2.5
    assert [s.path for s in settler.poll(10.0)] == [
        files["e"],
        files["c"],
        files["b"],
        files["d"],
        files["a"],
    ]


def test_each_candidate_keeps_its_own_root_and_settle_time(
    settler: Settler,
    tmp_path: Path,
) -> None:
    fast = write(tmp_path / "one" / "f.nc")
    slow = write(tmp_path / "two" / "s.nc")
    settler.note(slow, "/two", 30.0, 0.0, eligible=True)
    settler.note(fast, "/one", 1.0, 0.0, eligible=True)
    assert [(s.root, s.path) for s in settler.poll(1.0)] == [("/one", fast)]
    assert [(s.root, s.path) for s in settler.poll(30.0)] == [("/two", slow)]


def test_next_deadline_skips_stale_entries(settler: Settler, tmp_path: Path) -> None:
    assert settler.next_deadline() is None
    a = write(tmp_path / "a.nc")
    b = write(tmp_path / "b.nc")
    c = write(tmp_path / "c.nc")
    settler.note(a, ROOT, 1.0, 0.0, eligible=True)  # due 1, then forgotten
    settler.note(b, ROOT, 2.0, 0.0, eligible=True)  # due 2, then being written again
    settler.note(c, ROOT, 3.0, 0.0, eligible=True)  # due 3
    assert settler.next_deadline() == 1.0
    settler.forget(a)
    settler.note(b, ROOT, 2.0, 0.5, eligible=False)
    assert settler.next_deadline() == 3.0
    assert settler.poll(3.0) == [stable(c, 4)]
    assert settler.next_deadline() is None
    assert len(settler) == 1  # b waits for its close


def test_forget_drops_a_candidate(settler: Settler, tmp_path: Path) -> None:
    f = write(tmp_path / "a.nc")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    settler.forget(f)
    settler.forget(f)
    settler.forget(str(tmp_path / "never-noted.nc"))
    assert f not in settler
    assert settler.poll(10.0) == []


def test_file_noted_again_after_forget_is_emitted_once(settler: Settler, tmp_path: Path) -> None:
    f = write(tmp_path / "a.nc")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    settler.forget(f)
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)  # same deadline as the forgotten entry
    assert settler.poll(2.0) == [stable(f, 4)]
    assert settler.poll(10.0) == []


def test_candidates_not_yet_due_cost_no_stat(tmp_path: Path) -> None:
    calls: list[str] = []

    def counting_stat(path: str) -> os.stat_result:
        calls.append(path)
        return os.stat(path)

    settler = Settler(counting_stat)
    f = write(tmp_path / "a.nc")
    for i in range(10_000):
        settler.note(
            f"{tmp_path}/scanned{i}.nc", ROOT, 60.0, 0.0, eligible=True, sig=(4, 1_000_000_000)
        )
    settler.note(f, ROOT, 1.0, 0.0, eligible=True, sig=(4, 1_000_000_000))
    assert calls == []  # a scan's signature is used as is
    assert settler.poll(1.0) == [stable(f, 4)]
    assert calls == [f]
    for step in range(2, 60):
        assert settler.poll(float(step)) == []
    assert calls == [f]
    assert len(settler) == 10_000


def test_close_note_stats_the_file_at_once_so_settle_starts_at_the_close(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    def counting_stat(path: str) -> os.stat_result:
        calls.append(path)
        return os.stat(path)

    settler = Settler(counting_stat)
    path = tmp_path / "a.nc"
    f = write(path, b"1234")
    settler.note(f, ROOT, 2.0, 0.0, eligible=True)
    assert calls == [f]
    write(path, b"12", mtime_ns=9)  # changed after the close: not stable at 2.0
    assert settler.poll(2.0) == []
    assert settler.poll(4.0) == [stable(f, 2, 9)]


def test_a_settled_file_a_writer_holds_open_waits_for_the_close_and_a_zero_settle_cannot_spin(
    settler: Settler, tmp_path: Path
) -> None:
    f = write(tmp_path / "held.nc", b"half")
    writer = os.open(f, os.O_WRONLY | os.O_APPEND)  # silent, but still open for writing
    try:
        settler.note(f, ROOT, 0.0, 10.0, eligible=True)
        assert settler.poll(10.0) == []  # one look per poll, though settle is zero
        assert settler.next_deadline() == 10.0 + RECHECK
        assert settler.poll(10.0 + RECHECK) == []
        assert f in settler
    finally:
        os.close(writer)
    assert settler.poll(10.0 + 2 * RECHECK) == [stable(f, 4)]
