"""The ledger's counts of jobs by state: kept in ``job_counts`` as jobs change, exact after
any sequence of real ledger operations, and read at a cost that does not grow with the
ledger, like every other query the loop makes on each pass. Real SQLite in tmp_path."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dpypeline.state.cachedir import DB_FILE
from dpypeline.state.ledger import NEXT_READY, Claim, JobState, Ledger
from dpypeline.watching.scan import FileVersion

ROOT = "/data"
NAMES = [f"f{i:02d}.nc" for i in range(24)]
# what the random run does, the common ones more often
OPERATIONS = [
    *("enqueue", "enqueue", "claim", "claim", "finish", "finish", "finish", "release"),
    *("park", "promote", "retry", "skip", "recover", "prune"),
]


def grouped(cache: Path) -> dict[tuple[str, str, str], int]:
    """Jobs by (job, state, source), counted row by row through a connection of its own."""
    db = sqlite3.connect(cache / DB_FILE)
    try:
        rows = db.execute("SELECT job, state, source, count(*) FROM jobs GROUP BY 1, 2, 3")
        return {(job, state, source): n for job, state, source, n in rows}
    finally:
        db.close()


def first_waiting(cache: Path) -> tuple[int | None, float | None]:
    """The oldest queued or retrying job's id and the earliest backoff's end, by reading
    every row."""
    db = sqlite3.connect(cache / DB_FILE)
    try:
        return db.execute(
            "SELECT (SELECT min(id) FROM jobs WHERE state IN ('queued', 'retrying')),"
            " (SELECT min(not_before) FROM jobs WHERE state = 'retrying')"
        ).fetchone()
    finally:
        db.close()


def by_state(tally: dict[tuple[str, str, str], int]) -> dict[str, int]:
    counts = {s.value: 0 for s in JobState}
    for (_, state, _), n in tally.items():
        counts[state] += n
    return counts


class Run:
    """A service ledger and a CLI one on the same cache dir, driven by random operations."""

    def __init__(self, cache: Path, seed: int) -> None:
        self.cache, self.rng = cache, random.Random(seed)
        self.service = Ledger(cache, service=True)
        self.cli = Ledger(cache)
        self.running: list[Claim] = []
        self.now = 1000.0
        self.moved: Counter[str] = Counter()  # operations that changed at least one job

    def close(self) -> None:
        self.service.close()
        self.cli.close()

    def ids(self, state: JobState | None = None) -> list[int]:
        return [r.id for r in self.service.jobs(state, limit=10_000)]

    def step(self) -> None:
        self.now += self.rng.uniform(0.0, 2.0)
        op = self.rng.choice(OPERATIONS)
        changed = getattr(self, op)()
        if changed:
            self.moved[op] += 1

    def enqueue(self) -> int:
        files = [
            FileVersion(f"{ROOT}/{self.rng.choice(NAMES)}", 100, self.rng.choice([1, 2, 3]))
            for _ in range(self.rng.randint(1, 4))
        ]
        jobs = self.rng.choice([["a"], ["a", "b"]])
        source = self.rng.choice(["watch", "scan", "cli"])
        ledger = self.cli if source == "cli" else self.service
        return ledger.enqueue(files, ROOT, jobs, source, self.now)

    def claim(self) -> int:
        others = self.ids()

        def hold(rec: object) -> int | None:
            behind = [i for i in others if i != getattr(rec, "id", None)]
            return self.rng.choice(behind) if behind and self.rng.random() < 0.2 else None

        claim = self.service.claim(self.now, hold)
        if claim is not None:
            self.running.append(claim)
        return claim is not None

    def _take(self) -> Claim | None:
        if not self.running:
            return None
        return self.running.pop(self.rng.randrange(len(self.running)))

    def finish(self) -> int:
        claim = self._take()
        if claim is None:
            return 0
        state = self.rng.choice([JobState.DONE, JobState.RETRYING, JobState.DEAD, JobState.SKIPPED])
        not_before = self.now + self.rng.uniform(0.0, 5.0)
        return self.service.finish(claim, state, self.now, error="e", not_before=not_before)

    def release(self) -> int:
        claim = self._take()
        if claim is not None:
            self.service.release(claim, self.now)
        return claim is not None

    def park(self) -> int:
        claim = self._take()
        others = [i for i in self.ids() if claim is not None and i != claim.record.id]
        if claim is None or not others:
            return 0
        self.service.park(claim, self.rng.choice(others), self.now)
        return 1

    def promote(self) -> int:
        return self.service.promote_due(self.now)

    def retry(self) -> int:
        dead = self.ids(JobState.DEAD)
        if self.rng.random() < 0.3:
            return self.cli.retry(None, self.now)
        return self.cli.retry(self.rng.sample(dead, min(len(dead), 2)), self.now)

    def skip(self) -> int:
        dead = self.ids(JobState.DEAD)
        return bool(dead) and self.cli.skip(self.rng.choice(dead), self.now, "gap: ") is not None

    def recover(self) -> int:
        """A restart: the service's ledger is reopened, jobs it was running are recovered."""
        self.service.close()
        self.running = []
        self.service = Ledger(self.cache, service=True)
        got = self.service.recover(max_attempts=self.rng.randint(1, 3), now=self.now)
        return got.resumed + got.dead

    def prune(self) -> int:
        present = None
        if self.rng.random() < 0.5:
            present = [f"{ROOT}/{n}" for n in NAMES if self.rng.random() < 0.7]
        return self.service.prune(self.now, self.rng.uniform(0.0, 20.0), present)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_stay_exact_across_every_transition(tmp_path: Path, seed: int) -> None:
    """So do the oldest waiting job and the next retry, read off indexes."""
    run = Run(tmp_path / "cache", seed)
    try:
        for i in range(600):
            run.step()
            truth = grouped(run.cache)
            assert run.service.tally() == truth, f"after step {i}"
            assert run.cli.tally() == truth, f"after step {i}, as another process reads it"
            assert run.service.counts() == by_state(truth), f"after step {i}"
            oldest = run.service.oldest_waiting()
            waiting = (oldest.id if oldest else None, run.service.next_retry_at())
            assert waiting == first_waiting(run.cache), f"after step {i}"
    finally:
        run.close()
    # every operation moved jobs at some point: no transition went untested
    kinds = ["enqueue", "claim", "finish", "release", "park", "promote", "retry", "skip"]
    assert set(run.moved) >= {*kinds, "recover", "prune"}, run.moved


def test_a_change_rolled_back_leaves_the_counts_as_they_were(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ledger = Ledger(cache, service=True)
    try:
        ledger.enqueue([FileVersion(f"{ROOT}/x.nc", 1, 1)], ROOT, ["a"], "scan", 1.0)
        before = ledger.counts()

        def hold(rec: object) -> int | None:
            raise RuntimeError("the hold rule failed")

        with pytest.raises(RuntimeError):
            ledger.claim(2.0, hold)
        assert ledger.counts() == before == by_state(grouped(cache))
    finally:
        ledger.close()


# -- what the loop reads on every pass costs the same at any ledger size ---------------------


def fill(cache: Path, finished: int, waiting: int) -> None:
    """``finished`` done and skipped jobs, ``waiting`` queued and as many retrying ones, put
    straight into the ledger's table in one transaction (the triggers count them)."""
    db = sqlite3.connect(cache / DB_FILE, isolation_level=None)
    try:
        rows = [
            (f"{ROOT}/h{i}.nc", i, "done" if i % 10 else "skipped", None, i)
            for i in range(finished)
        ]
        rows += [
            (f"{ROOT}/w{i}.nc", i, "retrying" if i % 2 else "queued", 5000.0 + i, finished + i)
            for i in range(2 * waiting)
        ]
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO jobs (path, size, mtime_ns, job, root, state, attempts, source,"
            " created, updated, not_before, position)"
            f" VALUES (?, 1, ?, 'a', '{ROOT}', ?, 1, 'scan', 1.0, 1.0, ?, ?)",
            rows,
        )
        db.execute("COMMIT")
    finally:
        db.close()


def vm_steps(ledger: Ledger, read: Callable[[Ledger], object]) -> int:
    """How many virtual-machine steps SQLite takes for ``read``: its work, which grows with
    every row it visits."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    db = ledger._db  # the ledger's own connection: the one the loop uses
    db.set_progress_handler(count, 1)
    try:
        read(ledger)
    finally:
        db.set_progress_handler(None, 1)
    return steps


READS: dict[str, Callable[[Ledger], object]] = {
    "counts": Ledger.counts,
    "tally": Ledger.tally,
    "next_retry_at": Ledger.next_retry_at,
    "oldest_waiting": Ledger.oldest_waiting,
    "next_ready": lambda ledger: ledger._db.execute(NEXT_READY).fetchone(),
    "held": Ledger.held,
    "has_unfinished": Ledger.has_unfinished,
}


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Ledger]]:
    """A small ledger and one with 50,000 finished and 10,000 waiting jobs."""
    opened = {}
    for name, finished, waiting in (("small", 100, 10), ("large", 50_000, 5_000)):
        cache = tmp_path_factory.mktemp(name) / "cache"
        Ledger(cache).close()
        fill(cache, finished, waiting)
        opened[name] = Ledger(cache)
    yield opened
    for ledger in opened.values():
        ledger.close()


@pytest.mark.slow
@pytest.mark.parametrize("read", list(READS))
def test_what_the_loop_reads_costs_the_same_at_any_ledger_size(
    ledgers: dict[str, Ledger], read: str
) -> None:
    large = ledgers["large"]
    assert large.counts()["done"] == 45_000  # the fill was counted
    assert large.counts()["retrying"] == 5_000
    cost = {name: vm_steps(ledger, READS[read]) for name, ledger in ledgers.items()}
    # the same index walks either way: a handful of rows, not one per job
    assert cost["large"] <= cost["small"] + 20, cost
    assert cost["large"] < 1_000, cost
