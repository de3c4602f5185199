"""The ledger: one job per file version, attempts counted before a job runs, no head-of-line
blocking, every state change guarded by the transition table, and nothing lost across a
crash. Real SQLite in tmp_path throughout."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dpypeline.errors import StateError
from dpypeline.state.cachedir import DB_FILE, service_pid
from dpypeline.state.ledger import NEXT_READY, Claim, JobState, Ledger, Recovery
from dpypeline.state.transitions import TRANSITIONS, Event, apply
from dpypeline.watching.scan import FileVersion

ROOT = "/data"


def fv(name: str, size: int = 100, mtime_ns: int = 1_000) -> FileVersion:
    return FileVersion(f"{ROOT}/{name}", size, mtime_ns)


def names(claims: list[Claim]) -> list[str]:
    return [c.record.path.rsplit("/", 1)[1] for c in claims]


def claim_all(ledger: Ledger, now: float) -> list[Claim]:
    """Claim until nothing is ready (without finishing anything)."""
    taken: list[Claim] = []
    while (c := ledger.claim(now)) is not None:
        taken.append(c)
    return taken


def raw_rows(cache: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the database through a connection of its own, as another process would."""
    db = sqlite3.connect(cache / DB_FILE)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def raw_write(cache: Path, sql: str, params: tuple = ()) -> None:
    db = sqlite3.connect(cache / DB_FILE)
    try:
        with db:
            db.execute(sql, params)
    finally:
        db.close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def open_ledger(cache: Path) -> Iterator[Callable[..., Ledger]]:
    """Open ledgers on ``cache``; every one is closed at the end (close is idempotent)."""
    opened: list[Ledger] = []

    def _open(*, service: bool = False) -> Ledger:
        ledger = Ledger(cache, service=service)
        opened.append(ledger)
        return ledger

    yield _open
    for ledger in reversed(opened):
        ledger.close()


@pytest.fixture
def service(open_ledger: Callable[..., Ledger]) -> Ledger:
    return open_ledger(service=True)


def _child(cache: Path, body: str) -> subprocess.Popen[str]:
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from dpypeline.state.ledger import Ledger
        from dpypeline.watching.scan import FileVersion
        ledger = Ledger(Path({str(cache)!r}), service=True)
    """) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- one job per file version -----------------------------------------------------------------


def test_same_version_enqueued_twice_makes_one_job(service: Ledger) -> None:
    assert service.enqueue([fv("a.nc"), fv("b.nc")], ROOT, ["ingest"], "watch", 1.0) == 2
    assert service.enqueue([fv("a.nc"), fv("b.nc")], ROOT, ["ingest"], "rescan", 2.0) == 0
    assert service.enqueue([fv("b.nc"), fv("a.nc"), fv("a.nc")], ROOT, ["ingest"], "cli", 3.0) == 0
    assert service.counts()["queued"] == 2
    assert [r.source for r in service.jobs()] == ["watch", "watch"]


def test_version_known_to_the_service_is_not_added_again_by_a_cli_process(
    service: Ledger,
    open_ledger: Callable[..., Ledger],
) -> None:
    service.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    cli = open_ledger()
    assert cli.enqueue([fv("a.nc"), fv("new.nc")], ROOT, ["ingest"], "cli", 2.0) == 1
    assert service.enqueue([fv("new.nc")], ROOT, ["ingest"], "watch", 3.0) == 0
    assert sorted((r.path, r.source) for r in service.jobs()) == [
        (f"{ROOT}/a.nc", "watch"),
        (f"{ROOT}/new.nc", "cli"),
    ]


def test_a_new_version_of_a_written_file_has_a_job_of_its_own(service: Ledger) -> None:
    service.enqueue([fv("a.nc", 100, 1_000)], ROOT, ["ingest"], "watch", 1.0)
    first = service.claim(1.0)
    assert first is not None
    service.finish(first, JobState.DONE, 1.0)
    assert service.enqueue([fv("a.nc", 100, 2_000)], ROOT, ["ingest"], "watch", 2.0) == 1
    assert service.enqueue([fv("a.nc", 100, 1_000)], ROOT, ["ingest"], "watch", 4.0) == 0
    assert sorted((r.id, r.size, r.mtime_ns, r.state) for r in service.jobs()) == [
        (1, 100, 1_000, JobState.DONE),
        (2, 100, 2_000, JobState.QUEUED),
    ]


def test_a_new_version_of_a_file_not_yet_written_takes_its_jobs_place(service: Ledger) -> None:
    service.enqueue([fv("a.nc", 100, 1_000), fv("b.nc")], ROOT, ["ingest"], "watch", 1.0)
    assert service.enqueue([fv("a.nc", 100, 2_000)], ROOT, ["ingest"], "watch", 2.0) == 1
    assert service.enqueue([fv("a.nc", 101, 2_000)], ROOT, ["ingest"], "scan", 3.0) == 1
    assert service.enqueue([fv("a.nc", 101, 2_000)], ROOT, ["ingest"], "watch", 4.0) == 0
    assert sorted((r.id, Path(r.path).name, r.size, r.mtime_ns) for r in service.jobs()) == [
        (1, "a.nc", 101, 2_000),
        (2, "b.nc", 100, 1_000),
    ]
    a = service.get(1)
    assert a is not None
    assert (a.state, a.source) == (JobState.QUEUED, "scan")


def test_enqueue_counts_only_new_jobs_one_per_job_name(service: Ledger) -> None:
    assert service.enqueue([fv("a.nc")], ROOT, ["zarr", "upload"], "watch", 1.0) == 2
    assert service.enqueue([fv("a.nc")], ROOT, ["zarr", "upload", "checksum"], "watch", 2.0) == 1
    assert service.enqueue([], ROOT, ["zarr"], "watch", 3.0) == 0
    assert service.counts()["queued"] == 3


def test_job_ids_follow_the_order_files_are_given_in(service: Ledger) -> None:
    service.enqueue([fv("c.nc"), fv("a.nc"), fv("b.nc")], ROOT, ["x", "y"], "scan", 1.0)
    service.enqueue([fv("0.nc")], ROOT, ["x"], "scan", 2.0)
    by_id = sorted(service.jobs(limit=100), key=lambda r: r.id)
    assert [(r.path.rsplit("/", 1)[1], r.job) for r in by_id] == [
        ("c.nc", "x"),
        ("c.nc", "y"),
        ("a.nc", "x"),
        ("a.nc", "y"),
        ("b.nc", "x"),
        ("b.nc", "y"),
        ("0.nc", "x"),
    ]
    first = by_id[0]
    assert (first.state, first.attempts, first.root, first.created) == (
        JobState.QUEUED,
        0,
        ROOT,
        1.0,
    )


# -- claiming -----------------------------------------------------------------------------


def test_jobs_are_claimed_in_enqueue_order(service: Ledger) -> None:
    service.enqueue([fv("3.nc"), fv("1.nc")], ROOT, ["ingest"], "watch", 1.0)
    service.enqueue([fv("2.nc")], ROOT, ["ingest"], "watch", 2.0)
    taken = [service.claim(3.0) for _ in range(3)]
    assert names([c for c in taken if c]) == ["3.nc", "1.nc", "2.nc"]
    assert service.claim(3.0) is None


def test_jobs_are_taken_in_ledger_order_while_others_finish(service: Ledger) -> None:
    service.enqueue([fv(f"{i:02}.nc") for i in range(5)], ROOT, ["ingest"], "watch", 1.0)
    order = []
    while (c := service.claim(2.0)) is not None:
        order.append(c)
        if len(order) == 2:
            service.enqueue([fv(f"{i:02}.nc") for i in range(5, 10)], ROOT, ["ingest"], "w", 2.0)
        service.finish(c, JobState.DONE, 3.0)
    assert names(order) == [f"{i:02}.nc" for i in range(10)]


def test_attempt_is_committed_before_the_job_runs(
    service: Ledger,
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    service.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    claim = service.claim(5.0)
    assert claim is not None
    assert (claim.record.state, claim.record.attempts, claim.record.started) == (
        JobState.RUNNING,
        1,
        5.0,
    )
    # Another connection (another process) already sees the counted attempt.
    assert raw_rows(
        cache, "SELECT state, attempts, started FROM jobs WHERE id = ?", (claim.record.id,)
    ) == [("running", 1, 5.0)]
    seen = open_ledger().get(claim.record.id)
    assert seen is not None
    assert (seen.state, seen.attempts) == (JobState.RUNNING, 1)


def test_finish_records_the_outcome(
    service: Ledger,
    cache: Path,
) -> None:
    service.enqueue([fv("a.nc"), fv("b.nc")], ROOT, ["ingest"], "watch", 1.0)
    a, b = claim_all(service, 2.0)
    service.finish(a, JobState.DONE, 3.0)
    service.finish(b, JobState.DEAD, 4.0, error="corrupt input: fix the file, then retry")
    done, dead = service.get(a.record.id), service.get(b.record.id)
    assert done is not None
    assert dead is not None
    assert (done.state, done.finished, done.error) == (JobState.DONE, 3.0, None)
    assert (dead.state, dead.finished, dead.error) == (
        JobState.DEAD,
        4.0,
        "corrupt input: fix the file, then retry",
    )
    assert service.has_unfinished() is False
    assert service.claim(5.0) is None


def test_finish_of_a_job_no_longer_running_changes_nothing(service: Ledger) -> None:
    service.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    (a,) = claim_all(service, 2.0)
    assert service.finish(a, JobState.DONE, 3.0) is True
    assert service.finish(a, JobState.DEAD, 4.0, error="late report") is False
    done = service.get(a.record.id)
    assert done is not None
    assert (done.state, done.error, done.finished) == (JobState.DONE, None, 3.0)


@pytest.mark.parametrize("event", list(Event))
def test_every_event_moves_a_job_only_from_the_states_in_the_transition_table(
    service: Ledger, cache: Path, event: Event
) -> None:
    service.enqueue([fv(f"{s.value}.nc") for s in JobState], ROOT, ["ingest"], "watch", 1.0)
    for state in JobState:
        raw_write(
            cache, "UPDATE jobs SET state = ? WHERE path = ?", (state.value, f"{ROOT}/{state}.nc")
        )
    rule = TRANSITIONS[event]
    moved = apply(service._db, event, "1", {"now": 2.0}).rowcount
    after = {r.path.rsplit("/", 1)[1][:-3]: r.state for r in service.jobs()}
    assert moved == len(rule.from_states)
    assert after == {s.value: rule.to if s in rule.from_states else s for s in JobState}


# -- retries and backoff ------------------------------------------------------------------


def test_failed_job_waits_out_its_backoff_without_blocking_the_jobs_behind_it(
    service: Ledger,
) -> None:
    service.enqueue([fv("a.nc"), fv("b.nc"), fv("c.nc")], ROOT, ["ingest"], "watch", 1.0)
    a = service.claim(10.0)
    assert a is not None
    assert names([a]) == ["a.nc"]
    service.finish(a, JobState.RETRYING, 10.0, error="timeout talking to S3", not_before=100.0)

    waiting = service.get(a.record.id)
    assert waiting is not None
    assert (waiting.state, waiting.not_before, waiting.attempts) == (JobState.RETRYING, 100.0, 1)
    assert service.next_retry_at() == 100.0

    # The others run meanwhile; the failed job is not handed out before its time.
    b = service.claim(11.0)
    assert b is not None
    assert names([b]) == ["b.nc"]
    service.finish(b, JobState.DONE, 12.0)
    assert service.promote_due(99.9) == 0
    c = service.claim(99.9)
    assert c is not None
    assert names([c]) == ["c.nc"]
    assert service.claim(99.9) is None
    service.finish(c, JobState.DONE, 99.9)

    assert service.promote_due(100.0) == 1
    assert service.next_retry_at() is None
    again = service.claim(100.0)
    assert again is not None
    assert again.record.id == a.record.id
    assert again.record.attempts == 2


def test_promoted_retry_goes_behind_every_job_already_ready(service: Ledger) -> None:
    service.enqueue([fv("a.nc"), fv("b.nc"), fv("c.nc")], ROOT, ["ingest"], "watch", 1.0)
    a = service.claim(10.0)
    assert a is not None
    service.finish(a, JobState.RETRYING, 10.0, error="throttled", not_before=20.0)
    service.enqueue([fv("d.nc")], ROOT, ["ingest"], "watch", 15.0)
    assert service.promote_due(30.0) == 1
    assert names(claim_all(service, 30.0)) == ["b.nc", "c.nc", "d.nc", "a.nc"]


def test_retrying_job_is_not_claimed_before_its_backoff_ends(service: Ledger) -> None:
    service.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    a = service.claim(2.0)
    assert a is not None
    service.finish(a, JobState.RETRYING, 2.0, error="flaky", not_before=50.0)
    assert service.claim(10.0) is None
    assert service.get(a.record.id).state is JobState.RETRYING  # type: ignore[union-attr]


# -- crash and restart --------------------------------------------------------------------


def _crash_after_claiming(cache: Path, files: list[str]) -> int:
    """A real service process that enqueues ``files``, claims the first job and is killed
    (SIGKILL) while "running" it. Returns the claimed job id."""
    child = _child(
        cache,
        f"""
        ledger.enqueue([FileVersion('{ROOT}/' + n, 100, 1000) for n in {files!r}],
                       '{ROOT}', ['ingest'], 'watch', 1.0)
        claim = ledger.claim(2.0)
        print(claim.record.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err
    return int(out.split()[0])


def test_job_running_when_the_service_was_killed_runs_again_first(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    job_id = _crash_after_claiming(cache, ["a.nc", "b.nc"])
    assert service_pid(cache) is None  # the kernel dropped the lock with the process

    ledger = open_ledger(service=True)
    assert ledger.get(job_id).state is JobState.RUNNING  # type: ignore[union-attr]
    assert ledger.recover(max_attempts=5, now=3.0) == Recovery(resumed=1, dead=0)
    taken = claim_all(ledger, 4.0)
    assert names(taken) == ["a.nc", "b.nc"]
    assert taken[0].record.id == job_id
    assert taken[0].record.attempts == 2  # the attempt that crashed still counts


def test_job_running_at_a_stop_without_release_is_queued_again(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    first = Ledger(cache, service=True)
    first.enqueue([fv("a.nc"), fv("b.nc")], ROOT, ["ingest"], "watch", 1.0)
    assert first.claim(2.0) is not None
    first.close()
    first.close()  # closing twice is harmless

    ledger = open_ledger(service=True)
    assert ledger.recover(max_attempts=5, now=3.0) == Recovery(resumed=1, dead=0)
    assert ledger.counts()["queued"] == 2
    assert names(claim_all(ledger, 4.0)) == ["a.nc", "b.nc"]


def test_job_that_keeps_killing_the_service_goes_dead_after_max_attempts(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    max_attempts = 3
    job_id = _crash_after_claiming(cache, ["poison.nc", "good.nc"])
    for attempt in range(2, max_attempts + 1):
        ledger = Ledger(cache, service=True)
        assert ledger.recover(max_attempts, now=float(attempt)) == Recovery(resumed=1, dead=0)
        claim = ledger.claim(float(attempt))
        assert claim is not None
        assert (claim.record.id, claim.record.attempts) == (job_id, attempt)
        ledger.close()  # stopped while it ran, like the kill above

    ledger = open_ledger(service=True)
    rec = ledger.recover(max_attempts, now=10.0)
    assert rec == Recovery(resumed=0, dead=1)
    dead = ledger.get(job_id)
    assert rec.dead_jobs == (dead,)  # reported as they now are, for the log
    assert dead is not None
    assert (dead.state, dead.attempts, dead.finished) == (JobState.DEAD, 3, 10.0)
    assert dead.error is not None
    assert "3 attempts" in dead.error
    assert f"dpypeline retry {job_id}" in dead.error
    taken = claim_all(ledger, 11.0)
    assert names(taken) == ["good.nc"]


def test_recover_with_attempts_left_does_not_kill_jobs(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    first = Ledger(cache, service=True)
    first.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    first.claim(2.0)
    first.close()
    ledger = open_ledger(service=True)
    assert ledger.recover(max_attempts=2, now=3.0) == Recovery(resumed=1, dead=0)
    assert ledger.recover(max_attempts=2, now=3.0) == Recovery(resumed=0, dead=0)
    assert names(claim_all(ledger, 4.0)) == ["a.nc"]


def test_job_ended_by_another_process_is_not_taken(
    service: Ledger,
    cache: Path,
) -> None:
    service.enqueue([fv("a.nc"), fv("b.nc")], ROOT, ["ingest"], "watch", 1.0)
    a_id = min(r.id for r in service.jobs())
    # The job ended through another path while it waited in line.
    raw_write(
        cache, "UPDATE jobs SET state = 'skipped', error = 'superseded' WHERE id = ?", (a_id,)
    )
    b = service.claim(2.0)
    assert b is not None
    assert names([b]) == ["b.nc"]
    skipped = service.get(a_id)
    assert skipped is not None
    assert (skipped.state, skipped.attempts) == (JobState.SKIPPED, 0)
    service.finish(b, JobState.DONE, 3.0)
    assert service.claim(4.0) is None


def test_release_puts_the_job_back_first_and_refunds_the_attempt(
    service: Ledger,
    cache: Path,
) -> None:
    service.enqueue([fv("a.nc"), fv("b.nc"), fv("c.nc")], ROOT, ["ingest"], "watch", 1.0)
    a = service.claim(2.0)
    b = service.claim(2.0)
    assert a is not None
    assert b is not None
    service.release(b, 3.0)
    service.release(a, 3.0)
    assert raw_rows(
        cache, "SELECT state, attempts FROM jobs WHERE id IN (?, ?)", (a.record.id, b.record.id)
    ) == [("queued", 0), ("queued", 0)]
    taken = claim_all(service, 4.0)
    assert names(taken) == ["a.nc", "b.nc", "c.nc"]
    assert [c.record.attempts for c in taken] == [1, 1, 1]


# -- dpypeline retry ----------------------------------------------------------------------


def _dead_jobs(ledger: Ledger, files: list[str]) -> list[int]:
    ledger.enqueue([fv(n) for n in files], ROOT, ["ingest"], "watch", 1.0)
    ids = []
    for c in claim_all(ledger, 2.0):
        ledger.finish(c, JobState.DEAD, 3.0, error="schema mismatch")
        ids.append(c.record.id)
    return ids


def test_retry_by_id_revives_that_dead_job_with_a_fresh_attempt_count(service: Ledger) -> None:
    a, b = _dead_jobs(service, ["a.nc", "b.nc"])
    assert service.retry([b], 5.0) == 1
    revived = service.get(b)
    assert revived is not None
    assert (
        revived.state,
        revived.attempts,
        revived.error,
        revived.not_before,
        revived.finished,
        revived.updated,
    ) == (JobState.QUEUED, 0, None, None, None, 5.0)
    assert service.get(a).state is JobState.DEAD  # type: ignore[union-attr]
    taken = claim_all(service, 6.0)
    assert [(c.record.id, c.record.attempts) for c in taken] == [(b, 1)]


def test_retry_all_revives_every_dead_job_and_nothing_else(service: Ledger) -> None:
    dead = _dead_jobs(service, ["d1.nc", "d2.nc"])
    service.enqueue([fv("ok.nc"), fv("wait.nc"), fv("later.nc")], ROOT, ["ingest"], "w", 4.0)
    ok, wait, _later = claim_all(service, 5.0)
    service.finish(ok, JobState.DONE, 6.0)
    service.finish(wait, JobState.RETRYING, 6.0, error="flaky", not_before=100.0)
    before = {r.id: r for r in service.jobs(limit=100)}

    assert service.retry(None, 7.0) == 2
    after = {r.id: r for r in service.jobs(limit=100)}
    assert {i for i in after if after[i] != before[i]} == set(dead)
    assert service.counts() == {
        "queued": 2,
        "running": 1,
        "retrying": 1,
        "done": 1,
        "dead": 0,
        "skipped": 0,
    }


def test_retry_of_a_job_that_is_not_dead_changes_nothing(service: Ledger) -> None:
    service.enqueue([fv("done.nc"), fv("queued.nc")], ROOT, ["ingest"], "watch", 1.0)
    c = service.claim(2.0)
    assert c is not None
    service.finish(c, JobState.DONE, 3.0)
    before = service.jobs(limit=100)
    assert service.retry([r.id for r in before] + [9999], 4.0) == 0
    assert service.jobs(limit=100) == before


def test_retry_from_the_cli_is_run_by_the_service(
    service: Ledger,
    open_ledger: Callable[..., Ledger],
) -> None:
    (job_id,) = _dead_jobs(service, ["a.nc"])
    assert open_ledger().retry([job_id], 5.0) == 1
    taken = claim_all(service, 6.0)
    assert [(c.record.id, c.record.attempts) for c in taken] == [(job_id, 1)]


# -- the CLI and the service share CACHE_DIR ----------------------------------------------


def test_cli_enqueue_while_the_service_runs_is_claimed(
    service: Ledger,
    open_ledger: Callable[..., Ledger],
) -> None:
    service.enqueue([fv("a.nc")], ROOT, ["ingest"], "watch", 1.0)
    (a,) = claim_all(service, 2.0)
    cli = open_ledger()
    assert cli.service is False
    assert cli.enqueue([fv("backfill1.nc"), fv("backfill2.nc")], ROOT, ["ingest"], "cli", 3.0) == 2
    cli.close()
    service.finish(a, JobState.DONE, 4.0)
    taken = claim_all(service, 5.0)
    assert names(taken) == ["backfill1.nc", "backfill2.nc"]
    assert {c.record.source for c in taken} == {"cli"}


def test_cli_ledger_cannot_take_or_recover_jobs(open_ledger: Callable[..., Ledger]) -> None:
    cli = open_ledger()
    cli.enqueue([fv("a.nc")], ROOT, ["ingest"], "cli", 1.0)
    with pytest.raises(RuntimeError, match="service process"):
        cli.recover(5, 2.0)
    with pytest.raises(RuntimeError, match="service process"):
        cli.claim(2.0)


def test_second_service_on_one_cache_dir_is_refused(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    assert service_pid(cache) is None  # never started
    first = Ledger(cache, service=True)
    try:
        assert service_pid(cache) == os.getpid()
        with pytest.raises(StateError, match="another dpypeline service") as info:
            Ledger(cache, service=True)
        assert f"pid {os.getpid()}" in str(info.value)
        assert str(cache) in str(info.value)
        assert service_pid(cache) == os.getpid()  # the refused one did not disturb the lock
        open_ledger().counts()  # the CLI still works alongside
    finally:
        first.close()
    assert service_pid(cache) is None
    open_ledger(service=True)
    assert service_pid(cache) == os.getpid()


def test_service_lock_held_by_another_process_names_its_pid(
    cache: Path,
    open_ledger: Callable[..., Ledger],
) -> None:
    child = _child(
        cache,
        """
        print('ready', flush=True)
        sys.stdin.read()
    """,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert service_pid(cache) == child.pid
        with pytest.raises(StateError, match=f"another dpypeline service \\(pid {child.pid}\\)"):
            Ledger(cache, service=True)
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert service_pid(cache) is None
    open_ledger(service=True)


def test_failed_open_releases_the_service_lock(cache: Path) -> None:
    (cache / DB_FILE).mkdir(parents=True)  # the database cannot be opened
    with pytest.raises(StateError, match="cannot open the state database"):
        Ledger(cache, service=True)
    assert service_pid(cache) is None
    (cache / DB_FILE).rmdir()
    Ledger(cache, service=True).close()


def test_cache_dir_is_created_private_to_its_owner(cache: Path) -> None:
    Ledger(cache / "nested").close()
    assert stat.S_IMODE((cache / "nested").stat().st_mode) == 0o700


def test_existing_cache_dir_open_to_others_is_made_private(cache: Path) -> None:
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    Ledger(cache).close()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


# -- reconciliation -----------------------------------------------------------------------


def test_unknown_reports_versions_missing_any_job_in_input_order(service: Ledger) -> None:
    service.enqueue([fv("both.nc")], ROOT, ["zarr", "upload"], "watch", 1.0)
    service.enqueue([fv("half.nc")], ROOT, ["zarr"], "watch", 1.0)
    service.enqueue([fv("other-job.nc")], ROOT, ["checksum"], "watch", 1.0)
    files = [
        fv("new2.nc"),
        fv("both.nc"),
        fv("half.nc"),
        fv("both.nc", mtime_ns=9),
        fv("other-job.nc"),
        fv("new1.nc"),
    ]
    assert service.unknown(files, ["zarr", "upload"]) == [0, 2, 3, 4, 5]
    assert service.unknown(files, ["zarr"]) == [0, 3, 4, 5]
    assert service.unknown([], ["zarr"]) == []
    assert service.unknown(files, []) == []
    # Called again (its temporary table is reused), the answer is the same.
    assert service.unknown(files, ["zarr", "upload"]) == [0, 2, 3, 4, 5]


def test_unknown_handles_a_50k_file_scan(
    service: Ledger,
    open_ledger: Callable[..., Ledger],
) -> None:
    files = [fv(f"y{i // 1000}/f{i}.nc", size=i, mtime_ns=i) for i in range(50_000)]
    assert service.enqueue(files[::2], ROOT, ["ingest"], "scan", 1.0) == 25_000
    expected = list(range(1, 50_000, 2))
    assert service.unknown(files, ["ingest"]) == expected
    assert open_ledger().unknown(files, ["ingest"]) == expected


# -- pruning ------------------------------------------------------------------------------


def _run_all(ledger: Ledger, now: float, state: JobState = JobState.DONE) -> None:
    for c in claim_all(ledger, now):
        ledger.finish(c, state, now)


def _paths(ledger: Ledger) -> list[tuple[str, int]]:
    return sorted((r.path.rsplit("/", 1)[1], r.mtime_ns) for r in ledger.jobs(limit=1000))


def test_prune_forgets_superseded_versions_after_retention_and_keeps_the_newest(
    service: Ledger,
) -> None:
    service.enqueue([fv("a.nc", mtime_ns=1)], ROOT, ["ingest"], "watch", 0.0)
    _run_all(service, 10.0)
    service.enqueue([fv("a.nc", mtime_ns=2)], ROOT, ["ingest"], "watch", 20.0)
    _run_all(service, 20.0, JobState.SKIPPED)
    service.enqueue([fv("a.nc", mtime_ns=3)], ROOT, ["ingest"], "watch", 90.0)
    _run_all(service, 90.0)
    service.enqueue([fv("b.nc", mtime_ns=1)], ROOT, ["ingest"], "watch", 0.0)
    _run_all(service, 10.0)

    assert service.prune(now=100.0, retention=50.0) == 2
    assert _paths(service) == [("a.nc", 3), ("b.nc", 1)]
    assert service.prune(now=1000.0, retention=50.0) == 0  # the newest of each is kept


def test_prune_keeps_superseded_versions_within_retention(service: Ledger) -> None:
    service.enqueue([fv("a.nc", mtime_ns=1)], ROOT, ["ingest"], "watch", 0.0)
    _run_all(service, 80.0)
    service.enqueue([fv("a.nc", mtime_ns=2)], ROOT, ["ingest"], "watch", 90.0)
    _run_all(service, 90.0)
    assert service.prune(now=100.0, retention=50.0) == 0
    assert service.prune(now=131.0, retention=50.0) == 1
    assert _paths(service) == [("a.nc", 2)]


def test_prune_forgets_vanished_files_only_when_present_paths_are_given(
    service: Ledger,
) -> None:
    service.enqueue([fv("kept.nc"), fv("gone.nc")], ROOT, ["ingest"], "watch", 0.0)
    _run_all(service, 10.0)
    assert service.prune(now=100.0, retention=50.0) == 0
    assert service.prune(now=100.0, retention=50.0, present={f"{ROOT}/kept.nc"}) == 1
    assert _paths(service) == [("kept.nc", 1_000)]


def test_prune_takes_the_present_paths_in_any_order_and_form(service: Ledger) -> None:
    names = ["a.nc", "b.nc", "c.nc", "d.nc", "e.nc"]
    service.enqueue([fv(n) for n in names], ROOT, ["ingest"], "watch", 0.0)
    _run_all(service, 10.0)
    present = (f"{ROOT}/{n}" for n in ["e.nc", "a.nc", "c.nc", "zz.nc"])  # a one-pass iterator
    assert service.prune(now=100.0, retention=50.0, present=present) == 2
    assert _paths(service) == [("a.nc", 1_000), ("c.nc", 1_000), ("e.nc", 1_000)]


def test_prune_of_one_watch_leaves_the_jobs_of_other_watches(service: Ledger) -> None:
    service.enqueue([FileVersion("/a/x.nc", 1, 1)], "/a", ["ingest"], "watch", 0.0)
    service.enqueue(
        [FileVersion("/b/y.nc", 1, 1), FileVersion("/b/gone.nc", 1, 1)],
        "/b",
        ["ingest"],
        "watch",
        0.0,
    )
    _run_all(service, 10.0)
    assert service.prune(now=100.0, retention=50.0, present={"/b/y.nc"}, root="/b") == 1
    assert sorted(r.path for r in service.jobs()) == ["/a/x.nc", "/b/y.nc"]


def test_prune_never_forgets_unfinished_jobs(service: Ledger) -> None:
    states = ("running", "retrying", "queued")
    service.enqueue([fv(f"{s}.nc", mtime_ns=1) for s in states], ROOT, ["ingest"], "watch", 0.0)
    running, retrying = service.claim(1.0), service.claim(1.0)
    assert running is not None
    assert retrying is not None
    service.finish(retrying, JobState.RETRYING, 1.0, error="flaky", not_before=1e9)
    service.enqueue([fv(f"{s}.nc", mtime_ns=2) for s in states], ROOT, ["ingest"], "watch", 2.0)
    assert service.prune(now=1e6, retention=1.0, present=set()) == 0
    # the new versions of the retrying and the queued file took their jobs' places
    assert service.counts() == {
        "queued": 3,
        "running": 1,
        "retrying": 0,
        "done": 0,
        "dead": 0,
        "skipped": 0,
    }


def _vm_steps(cache: Path, sql: str, params: tuple) -> int:
    """SQLite virtual-machine instructions one query takes: a deterministic measure of the
    rows it visits (unlike wall time)."""
    db = sqlite3.connect(cache / DB_FILE)
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        db.set_progress_handler(tick, 1)
        db.execute(sql, params).fetchall()
    finally:
        db.close()
    return steps


def _statements_run_by(ledger: Ledger, act: Callable[[], object]) -> list[str]:
    """The statements the ledger runs on the jobs for ``act``, as SQLite ran them (values
    bound), so that the tests below look at the real queries, not copies."""
    seen: list[str] = []
    ledger._db.set_trace_callback(seen.append)
    try:
        act()
    finally:
        ledger._db.set_trace_callback(None)
    return [q for q in seen if q.split()[0] in ("SELECT", "UPDATE") and " jobs" in q]


def test_taking_finishing_and_promoting_jobs_read_an_index_not_the_whole_table(
    service: Ledger, cache: Path
) -> None:
    service.enqueue([fv(f"{i}.nc") for i in range(50)], ROOT, ["ingest"], "watch", 0.0)

    def work() -> None:
        first = service.claim(1.0)
        assert first is not None
        service.finish(first, JobState.RETRYING, 1.0, error="flaky", not_before=2.0)
        service.next_retry_at()
        service.promote_due(3.0)
        again = service.claim(3.0)
        assert again is not None
        service.finish(again, JobState.DONE, 4.0)

    statements = _statements_run_by(service, work)
    assert NEXT_READY in statements
    assert len(statements) >= 6
    for sql in statements:
        plan = [row[3] for row in raw_rows(cache, "EXPLAIN QUERY PLAN " + sql)]
        assert all(not step.startswith("SCAN") for step in plan), (sql, plan)
        assert plan[0].startswith("SEARCH jobs"), (sql, plan)
    plan = " | ".join(row[3] for row in raw_rows(cache, "EXPLAIN QUERY PLAN " + NEXT_READY))
    assert "jobs_ready (state=?)" in plan
    assert "TEMP B-TREE" not in plan  # taken in line order straight from the index


def test_finished_history_does_not_add_work_to_taking_jobs(
    service: Ledger,
    cache: Path,
) -> None:
    service.enqueue([fv(f"w{i}.nc") for i in range(5)], ROOT, ["ingest"], "watch", 0.0)
    small = _vm_steps(cache, NEXT_READY, ())
    history = [fv(f"old{i}.nc") for i in range(20_000)]
    service.enqueue(history, ROOT, ["ingest"], "scan", 0.0)
    raw_write(cache, "UPDATE jobs SET state = 'done', finished = 0 WHERE path LIKE '%/old%'")
    large = _vm_steps(cache, NEXT_READY, ())
    assert large <= small * 2, (small, large)
    assert names(claim_all(service, 1.0)) == [f"w{i}.nc" for i in range(5)]


def test_a_backoff_end_beyond_the_largest_backoff_is_brought_within_it(service: Ledger) -> None:
    """A wall clock stepped back while the service was down: a stored backoff end an hour
    ahead would park the job for that hour; the largest backoff the config allows is the
    longest a retry can be due from now."""
    service.enqueue([fv("far.nc"), fv("near.nc")], ROOT, ["ingest"], "watch", 1000.0)
    far, near = claim_all(service, 1000.0)
    service.finish(far, JobState.RETRYING, 1000.0, error="flaky", not_before=1000.0 + 3605)
    service.finish(near, JobState.RETRYING, 1000.0, error="flaky", not_before=1005.0)
    assert service.retime_retries(now=1000.0, longest=600.0) == 1
    assert sorted((r.id, r.not_before) for r in service.jobs(JobState.RETRYING)) == [
        (far.record.id, 1600.0),
        (near.record.id, 1005.0),
    ]
    assert service.retime_retries(now=1000.0, longest=600.0) == 0  # nothing left beyond it
    assert service.next_retry_at() == 1005.0


def test_a_clock_step_moves_every_backoff_end_with_it(service: Ledger) -> None:
    """The service saw the wall clock step: each retry stays due as long from now as it
    was, in the stored times the CLI shows and a restart reads."""
    service.enqueue([fv("a.nc"), fv("b.nc"), fv("c.nc")], ROOT, ["ingest"], "watch", 1000.0)
    a, b, c = claim_all(service, 1000.0)
    service.finish(a, JobState.RETRYING, 1000.0, error="flaky", not_before=1005.0)
    service.finish(b, JobState.RETRYING, 1000.0, error="flaky", not_before=1500.0)
    service.finish(c, JobState.DONE, 1000.0)
    assert service.retime_retries(now=1000.0 - 3600, longest=600.0, stepped=-3600.0) == 2
    assert sorted(r.not_before for r in service.jobs(JobState.RETRYING)) == [  # type: ignore[type-var]
        1005.0 - 3600,
        1500.0 - 3600,
    ]
    assert service.get(c.record.id).not_before is None  # type: ignore[union-attr]
    # stepped forward, a backoff end keeps its wait, capped by the largest backoff
    assert service.retime_retries(now=1000.0 + 86400, longest=300.0, stepped=86400.0 + 3600) == 2
    assert sorted(r.not_before for r in service.jobs(JobState.RETRYING)) == [  # type: ignore[type-var]
        1005.0 + 86400,
        1000.0 + 86400 + 300,
    ]


# -- revert -------------------------------------------------------------------------------


def test_revert_queues_the_job_and_the_later_ones_of_its_store_in_order(service: Ledger) -> None:
    service.enqueue([fv(f"{c}.nc") for c in "abcd"], ROOT, ["ingest"], "watch", 1.0)
    service.enqueue([fv("x.nc")], ROOT, ["other"], "watch", 1.0)
    for c in claim_all(service, 2.0):
        service.finish(c, JobState.DONE, 3.0)
    a, b, c, d, x = (r.id for r in sorted(service.jobs(), key=lambda r: r.id))

    moved = service.revert(b, ["ingest"], 4.0)

    assert [r.id for r in moved] == [b, c, d]
    assert {r.state for r in moved} == {JobState.QUEUED}
    assert all(r.attempts == 0 and r.finished is None for r in moved)
    untouched = [service.get(i) for i in (a, x)]
    assert [r.state for r in untouched if r] == [JobState.DONE, JobState.DONE]
    assert names(claim_all(service, 5.0)) == ["b.nc", "c.nc", "d.nc"]


def test_revert_with_withdraw_skips_the_job_and_queues_only_the_later_ones(
    service: Ledger,
) -> None:
    service.enqueue([fv(f"{c}.nc") for c in "abc"], ROOT, ["ingest"], "watch", 1.0)
    for c in claim_all(service, 2.0):
        service.finish(c, JobState.DONE, 3.0)
    a, b, c = (r.id for r in sorted(service.jobs(), key=lambda r: r.id))

    moved = service.revert(a, ["ingest"], 4.0, withdraw="reverted by the operator")

    assert [(r.id, r.state) for r in moved] == [
        (a, JobState.SKIPPED),
        (b, JobState.QUEUED),
        (c, JobState.QUEUED),
    ]
    assert moved[0].error == "reverted by the operator"
    assert names(claim_all(service, 5.0)) == ["b.nc", "c.nc"]


def test_revert_is_refused_to_a_process_without_the_service_lock(
    open_ledger: Callable[..., Ledger],
) -> None:
    cli = open_ledger()
    with pytest.raises(RuntimeError):
        cli.revert(1, ["ingest"], 1.0)
