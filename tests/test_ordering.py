"""The commit-order rule on its own: which job may start, which commits next, which are
withdrawn (pure, no Dask, Zarr or SQLite); how a job learns from its tasks' declarations
what it commits to and where its chain splits; then the ledger's side of it on real SQLite:
held jobs are not taken, spend no attempt, and go on once the job ahead commits or is
skipped."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dpypeline.commits import Commit, commits, declared
from dpypeline.ordering import CommitOrder, Hold, Pending, held_summary, hold_for
from dpypeline.pipeline import Job, JobCall, JobContext, Task
from dpypeline.state.cachedir import DB_FILE
from dpypeline.state.ledger import Claim, JobRecord, JobState, Ledger
from dpypeline.watching.scan import FileVersion

# -- the start rule -----------------------------------------------------------------------


def test_a_job_with_nothing_waiting_ahead_starts() -> None:
    assert hold_for(5, []) is None
    assert hold_for(5, [Pending(3, "running"), Pending(4, "running")]) is None
    assert hold_for(5, [Pending(6, "dead"), Pending(9, "queued")]) is None  # later ones


@pytest.mark.parametrize("state", ["queued", "retrying", "dead"])
def test_the_earliest_job_waiting_ahead_holds_a_start(state: str) -> None:
    ahead = [Pending(4, "queued"), Pending(2, state), Pending(1, "running")]
    assert hold_for(5, ahead) == Hold(5, 2, state)


def test_only_a_dead_job_ahead_needs_the_operator() -> None:
    dead = Hold(5, 3, "dead")
    assert dead.needs_operator
    assert "dpypeline retry 3" in dead.reason
    assert "dpypeline skip 3" in dead.reason
    retrying = Hold(5, 3, "retrying")
    assert not retrying.needs_operator
    assert "held behind job 3 (retrying)" in retrying.reason


def test_the_summary_names_each_job_holding_others_and_what_frees_it() -> None:
    assert held_summary([]) == ""
    held = [Hold(4, 3, "dead"), Hold(5, 3, "dead"), Hold(9, 8, "retrying")]
    assert held_summary(held) == (
        "2 held behind dead job 3 (dpypeline retry 3, or dpypeline skip 3 to accept the gap);"
        " 1 held behind job 8 (retrying)"
    )


# -- the commit rule ----------------------------------------------------------------------


def test_the_earliest_job_in_flight_commits_first_and_one_at_a_time() -> None:
    order = CommitOrder()
    for job_id in (3, 1, 2):
        order.add(job_id, "s", ordered=True)
    order.computed(3)
    order.computed(2)
    assert order.next_commit("s") is None  # 1 is not computed: 2 and 3 wait
    order.computed(1)
    assert order.next_commit("s") == 1
    assert order.committing("s") == 1
    assert order.next_commit("s") is None  # one commit per store at a time
    assert order.finished(1, failed=False) == []
    assert order.next_commit("s") == 2
    assert order.finished(2, failed=False) == []
    assert order.next_commit("s") == 3


def test_stores_commit_independently() -> None:
    order = CommitOrder()
    order.add(1, "a", ordered=True)
    order.add(2, "b", ordered=True)
    order.computed(2)
    assert order.next_commit("b") == 2
    assert order.next_commit("a") is None


def test_a_failed_job_of_an_ordered_resource_withdraws_the_later_ones_only() -> None:
    order = CommitOrder()
    for job_id in (1, 2, 3, 4):
        order.add(job_id, "s", ordered=True)
    order.add(5, "other", ordered=True)
    order.computed(1)
    assert order.next_commit("s") == 1
    order.computed(3)
    assert order.finished(2, failed=True) == [3, 4]
    assert 3 not in order
    assert 4 not in order
    assert 1 in order  # earlier, committing: untouched
    assert 5 in order  # another store: untouched
    assert order.finished(1, failed=False) == []
    assert order.next_commit("s") is None
    order.add(6, "s", ordered=True)
    order.computed(6)
    assert order.next_commit("s") == 6


def test_a_failed_job_of_an_unordered_resource_withdraws_nothing() -> None:
    order = CommitOrder()
    for job_id in (1, 2, 3):
        order.add(job_id, "t", ordered=False)
    order.computed(2)
    assert order.finished(1, failed=True) == []
    assert order.next_commit("t") == 2


# -- what a job commits to ----------------------------------------------------------------


def length(path: str) -> int:
    return len(path)


def double(value: int) -> int:
    return value * 2


@commits(lambda kw: Commit(f"table:{kw['table']}", ordered=kw.get("append", True)))
def insert(value: int, *, table: str, rows: list[int], append: bool = True) -> int:
    rows.append(value)
    return value + 1


def call_on(job: Job, path: str) -> JobCall:
    return JobCall(job, path, JobContext(1, 1, path, path, "/", job.name, None))


def test_a_task_declares_its_commit_from_its_arguments() -> None:
    assert declared(insert, {"table": "t", "rows": []}) == Commit("table:t", ordered=True)
    assert declared(insert, {"table": "t", "rows": [], "append": False}) == Commit("table:t")
    assert declared(double, {}) is None


def test_a_job_commits_from_its_first_committing_task_and_splits_there() -> None:
    rows: list[int] = []
    job = Job("j", [Task(length), Task(insert, table="t", rows=rows), Task(double)])
    assert job.commit_index() == 1
    assert job.commit() == Commit("table:t", ordered=True)
    assert job.ordered_resource() == "table:t"
    call = call_on(job, "/data/f.nc")
    assert call.commits_to == Commit("table:t", ordered=True)
    computed = call.compute()
    assert (computed, rows) == (10, [])  # nothing committed while computing
    assert call.commit(computed) == 22
    assert rows == [10]
    assert call() == 22  # whole, as the serial executor runs it


def test_a_job_without_a_committing_task_commits_nothing_and_runs_whole() -> None:
    job = Job("j", [Task(length), Task(double)])
    assert (job.commit_index(), job.commit(), job.ordered_resource()) == (None, None, None)
    call = call_on(job, "abc")
    assert call.commits_to is None
    assert call.compute() == 6
    assert call.commit(6) == 6


def test_an_unordered_resource_is_not_an_ordered_one() -> None:
    job = Job("j", [Task(insert, table="t", rows=[], append=False)])
    assert job.commit() == Commit("table:t", ordered=False)
    assert job.ordered_resource() is None


# -- the ledger's side --------------------------------------------------------------------

ROOT = "/data"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "cache", service=True)
    yield ledger
    ledger.close()


def year(i: int) -> FileVersion:
    return FileVersion(f"{ROOT}/y{i}.nc", 100, 1_000)


def store_gate(ledger: Ledger) -> Callable[[JobRecord], int | None]:
    """The worker's gate for one store written by the job "ingest"."""

    def gate(rec: JobRecord) -> int | None:
        hold = hold_for(rec.id, ledger.ahead(rec.id, ["ingest"]))
        return hold.behind if hold else None

    return gate


def take(ledger: Ledger, now: float = 1.0) -> Claim | None:
    return ledger.claim(now, store_gate(ledger))


def taken_id(ledger: Ledger, now: float) -> int | None:
    claim = take(ledger, now)
    return claim.record.id if claim else None


def test_a_job_behind_a_retrying_one_is_held_without_an_attempt_then_goes_on(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 5)], ROOT, ["ingest"], "scan", 0.0)
    first = take(ledger)
    assert first is not None
    ledger.finish(first, JobState.RETRYING, 1.0, error="boom", not_before=100.0)
    assert take(ledger) is None  # 2, 3 and 4 are held behind 1
    assert [(h.job_id, h.behind, h.behind_state) for h in ledger.held()] == [
        (2, 1, "retrying"),
        (3, 1, "retrying"),
        (4, 1, "retrying"),
    ]
    held = [ledger.get(i) for i in (2, 3, 4)]
    assert {(r.state, r.attempts) for r in held if r is not None} == {(JobState.QUEUED, 0)}
    assert ledger.has_unfinished()  # 1 will run again: a run --once waits for it
    assert take(ledger) is None  # nothing is offered again while held
    ledger.promote_due(100.0)
    again = take(ledger, 100.0)
    assert again is not None
    assert again.record.id == 1
    ledger.finish(again, JobState.DONE, 101.0)
    assert ledger.held() == []
    taken = [take(ledger, 102.0) for _ in range(3)]
    assert [c.record.id for c in taken if c is not None] == [2, 3, 4]
    assert [c.record.attempts for c in taken if c is not None] == [1, 1, 1]


def test_jobs_held_behind_a_dead_one_do_not_keep_a_run_going_and_skip_frees_them(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 4)], ROOT, ["ingest"], "scan", 0.0)
    first = take(ledger)
    assert first is not None
    ledger.finish(first, JobState.DEAD, 1.0, error="PermanentError: corrupt")
    assert take(ledger) is None
    assert {h.behind_state for h in ledger.held()} == {"dead"}
    assert not ledger.has_unfinished()
    assert ledger.skip(2, 2.0, "skipped by the operator: ") is None  # not dead
    skipped = ledger.skip(1, 2.0, "skipped by the operator: ")
    assert skipped is not None
    assert skipped.state is JobState.SKIPPED
    assert skipped.error == "skipped by the operator: PermanentError: corrupt"
    assert ledger.held() == []
    assert ledger.has_unfinished()
    assert [taken_id(ledger, 3.0) for _ in range(2)] == [2, 3]


def test_a_job_running_ahead_holds_no_start_but_its_failure_parks_the_later_one(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 3)], ROOT, ["ingest"], "scan", 0.0)
    first, second = take(ledger), take(ledger)
    assert first is not None
    assert second is not None  # 1 is running: in flight, it commits first
    ledger.finish(first, JobState.RETRYING, 2.0, error="boom", not_before=50.0)
    ledger.park(second, first.record.id, 2.0)  # withdrawn before its commit
    rec = ledger.get(2)
    assert rec is not None
    assert (rec.state, rec.attempts) == (JobState.QUEUED, 0)
    assert [(h.job_id, h.behind) for h in ledger.held()] == [(2, 1)]


def test_a_hold_always_names_a_job_that_is_not_held_itself(ledger: Ledger) -> None:
    ledger.enqueue([year(i) for i in range(1, 4)], ROOT, ["ingest"], "scan", 0.0)
    one, two = take(ledger), take(ledger)
    assert one is not None
    assert two is not None
    ledger.finish(two, JobState.RETRYING, 1.0, error="boom", not_before=10.0)
    assert take(ledger) is None  # 3 held behind 2
    ledger.finish(one, JobState.DEAD, 2.0, error="bad")
    ledger.promote_due(10.0)
    assert take(ledger, 10.0) is None  # 2 is held behind dead 1, and 3 with it
    assert [(h.job_id, h.behind) for h in ledger.held()] == [(2, 1), (3, 1)]
    assert not ledger.has_unfinished()


def test_holds_behind_a_forgotten_job_are_dropped_at_start_up(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ledger = Ledger(cache, service=True)
    try:
        ledger.enqueue([year(i) for i in range(1, 3)], ROOT, ["ingest"], "scan", 0.0)
        first = take(ledger)
        assert first is not None
        ledger.finish(first, JobState.DEAD, 1.0, error="bad")
        assert take(ledger) is None
    finally:
        ledger.close()
    db = sqlite3.connect(cache / DB_FILE)
    with db:
        db.execute("DELETE FROM jobs WHERE id = 1")  # as retention forgets a dead job
    db.close()
    ledger = Ledger(cache, service=True)
    try:
        ledger.recover(5, 2.0)
        assert ledger.held() == []
        assert taken_id(ledger, 2.0) == 2
    finally:
        ledger.close()


def test_the_start_check_reads_the_same_rows_however_long_the_store_history(
    ledger: Ledger, tmp_path: Path
) -> None:
    ledger.enqueue([year(i) for i in range(3)], ROOT, ["ingest"], "scan", 0.0)
    small = _vm_steps(tmp_path / "cache", ledger, 3)
    ledger.enqueue(
        [FileVersion(f"{ROOT}/old{i}.nc", 1, 1) for i in range(20_000)], ROOT, ["ingest"], "s", 0
    )
    db = sqlite3.connect(tmp_path / "cache" / DB_FILE)
    with db:
        db.execute("UPDATE jobs SET state = 'done' WHERE path LIKE '%/old%'")
        db.execute("UPDATE jobs SET id = id + 100000 WHERE path LIKE '%/y%'")
    db.close()
    large = _vm_steps(tmp_path / "cache", ledger, 100_003)
    assert large <= small * 2, (small, large)


def _vm_steps(cache: Path, ledger: Ledger, job_id: int) -> int:
    """SQLite virtual-machine instructions ``Ledger.ahead`` takes (the rows it visits)."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    ledger._db.set_progress_handler(tick, 1)
    try:
        assert ledger.ahead(job_id, ["ingest"]) != []
    finally:
        ledger._db.set_progress_handler(None, 1)
    return steps


# -- a new version of a file takes its job's place ----------------------------------------


def resent(i: int, mtime_ns: int = 2_000) -> FileVersion:
    return FileVersion(f"{ROOT}/y{i}.nc", 200, mtime_ns)


def test_a_new_version_of_a_dead_file_takes_its_place_and_the_held_ones_follow_it(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 6)], ROOT, ["ingest"], "scan", 0.0)
    one = take(ledger)
    assert one is not None
    ledger.finish(one, JobState.DONE, 1.0)
    two = take(ledger)
    assert two is not None
    ledger.finish(two, JobState.DEAD, 1.0, error="PermanentError: truncated")
    assert take(ledger) is None
    assert [(h.job_id, h.behind_state) for h in ledger.held()] == [
        (3, "dead"),
        (4, "dead"),
        (5, "dead"),
    ]
    assert ledger.enqueue([resent(2)], ROOT, ["ingest"], "watch", 2.0) == 1
    again = ledger.get(2)
    assert again is not None
    assert (again.state, again.size, again.attempts, again.error) == (
        JobState.QUEUED,
        200,
        0,
        None,
    )
    assert [r.id for r in ledger.jobs(limit=10)] == [5, 4, 3, 2, 1]  # no job of its own
    assert {(h.behind, h.behind_state) for h in ledger.held()} == {(2, "queued")}
    assert ledger.has_unfinished()  # a run --once waits for it now
    taken = []
    while (claim := take(ledger, 3.0)) is not None:
        taken.append(claim.record.id)
        ledger.finish(claim, JobState.DONE, 3.0)
    assert taken == [2, 3, 4, 5]


def test_a_new_version_that_arrives_while_its_file_runs_takes_the_place_if_the_run_fails(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 4)], ROOT, ["ingest"], "scan", 0.0)
    one = take(ledger)
    assert one is not None
    ledger.enqueue([resent(1, 2_000), resent(1, 3_000)], ROOT, ["ingest"], "watch", 1.0)
    assert [r.id for r in ledger.jobs(limit=10)] == [5, 4, 3, 2, 1]  # while 1 runs
    ledger.finish(one, JobState.DEAD, 2.0, error="PermanentError: truncated")
    assert [r.id for r in ledger.jobs(limit=10)] == [3, 2, 1]
    rec = ledger.get(1)
    assert rec is not None
    assert (rec.state, rec.mtime_ns, rec.attempts) == (JobState.QUEUED, 3_000, 0)
    assert taken_id(ledger, 3.0) == 1


def test_a_new_version_of_a_file_written_meanwhile_is_a_job_of_its_own_at_the_end(
    ledger: Ledger,
) -> None:
    ledger.enqueue([year(i) for i in range(1, 3)], ROOT, ["ingest"], "scan", 0.0)
    one = take(ledger)
    assert one is not None
    ledger.enqueue([resent(1)], ROOT, ["ingest"], "watch", 1.0)
    ledger.finish(one, JobState.DONE, 2.0)
    assert [(r.id, r.state) for r in ledger.jobs(limit=10)] == [
        (3, JobState.QUEUED),
        (2, JobState.QUEUED),
        (1, JobState.DONE),
    ]
    assert [taken_id(ledger, 3.0) for _ in range(2)] == [2, 3]


def test_versions_queued_behind_their_files_dead_job_by_an_older_release_merge_at_start(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    ledger = Ledger(cache, service=True)
    try:
        ledger.enqueue([year(i) for i in range(1, 4)], ROOT, ["ingest"], "scan", 0.0)
        one = take(ledger)
        assert one is not None
        ledger.finish(one, JobState.DEAD, 1.0, error="bad")
    finally:
        ledger.close()
    db = sqlite3.connect(cache / DB_FILE)
    with db:  # as a release that gave each version a job of its own left it
        db.execute(
            "INSERT INTO jobs (path, size, mtime_ns, job, root, state, source, created,"
            " updated, position) VALUES (?, 200, 2000, 'ingest', ?, 'queued', 'watch', 2, 2, 9)",
            (f"{ROOT}/y1.nc", ROOT),
        )
        db.execute("INSERT INTO holds (job_id, behind) VALUES (4, 1)")
    db.close()
    ledger = Ledger(cache, service=True)
    try:
        ledger.recover(5, 3.0)
        assert [r.id for r in ledger.jobs(limit=10)] == [3, 2, 1]
        assert [taken_id(ledger, 3.0) for _ in range(1)] == [1]
    finally:
        ledger.close()
