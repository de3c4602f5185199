from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float | None = None,
    message: str = "condition",
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``message`` (and what
    ``detail()`` says about the state of things) on timeout. Without ``interval``, the
    polls start 20 ms apart and spread out to a quarter of a second: a quick condition is
    seen at once, and a long wait (a process, a container) costs few polls."""
    deadline = time.monotonic() + timeout
    pause = 0.02 if interval is None else interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {message}{extra}")
        time.sleep(pause)
        if interval is None:
            pause = min(pause * 1.5, 0.25)


def log_events(text: str, names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON log lines of ``text`` (other lines left out); with names, only those events."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not names or event.get("event") in names:
            events.append(event)
    return events


def write_config(directory: Path, data: dict[str, Any], name: str = "pipeline.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def runs(log: Path) -> list[tuple[str, int, int]]:
    """(relative path, job id, attempt) of every recorded task run."""
    if not log.exists():
        return []
    return [
        (rel, int(jid), int(att))
        for rel, jid, att, _ in (
            line.split("\t") for line in os.fsdecode(log.read_bytes()).splitlines()
        )
    ]


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CACHE_DIR", None)
    env.pop("DPYPELINE_CONFIG", None)
    return env


def dpypeline(
    *args: str, timeout: float = 60.0, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env={**env_for_subprocess(), **(env or {})},
    )
    if check and proc.returncode != 0:
        pytest.fail(f"dpypeline {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """What ``dpypeline ARGS`` exits with and prints, from the CLI's own ``main()`` in this
    process, in the environment ``dpypeline(...)`` gives a process: the same parsing,
    config loading, checks and messages without an interpreter's start-up (a second of CPU
    each). For the commands that read and report; ``run`` (signal handlers, logging set up
    for the process) and what only a process shows run ``dpypeline(...)``."""
    from dpypeline import cli as command_line

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    for name in ("CACHE_DIR", "DPYPELINE_CONFIG"):
        os.environ.pop(name, None)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = command_line.main(list(args))
            except SystemExit as exc:  # argparse: --version, usage errors
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["dpypeline", *args], code, out.getvalue(), err.getvalue())


def _cli_json(command: str, config: Path, **args: Any) -> Any:
    """What ``dpypeline COMMAND -c CONFIG --json`` prints, from the CLI's own function run
    in this process: the same config loading and ledger reads, without the interpreter
    start-up (a third of a second) that would dominate every poll of a wait loop. Tests of
    the command itself run the real process with ``dpypeline(...)``."""
    from dpypeline import cli
    from dpypeline.config.model import load_config

    loaded = load_config(config, environ=env_for_subprocess())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.COMMANDS[command](loaded, argparse.Namespace(json=True, **args))
    if code != 0:
        pytest.fail(f"dpypeline {command} -c {config} returned {code}")
    return json.loads(out.getvalue())


def status(config: Path) -> dict[str, Any]:
    return _cli_json("status", config)


def jobs(config: Path, state: str | None = None) -> list[dict[str, Any]]:
    return _cli_json("jobs", config, state=state, limit=100000)


class ServiceProcess:
    """``dpypeline run`` as a real child process, with its stderr kept in a file; ``prefix``
    is a command it runs under (one that ends by exec'ing it, so the pid is the service's)."""

    def __init__(self, config: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.log = config.parent / "service.log"
        self._err = self.log.open("a")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dpypeline", "run", "-c", str(config), *extra],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env=env_for_subprocess(),
        )

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The service's JSON log lines so far; with names, only those events."""
        return log_events(self.log.read_text(), names)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(
            lambda: (
                any(e.get("event") == "service_ready" for e in self.events())
                or self.proc.poll() is not None
            ),
            timeout,
            message="service_ready",
        )
        if self.proc.poll() is not None:
            pytest.fail(f"service exited {self.proc.returncode}:\n{self.log.read_text()}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def service_processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.kill()


class ServiceThread:
    """``dpypeline run`` in a thread of this process, as the command runs it: the config
    loaded in the environment ``dpypeline(...)`` gives a process, its tasks imported, the
    same ``Service`` loop on the real serial executor, inotify, SQLite and metrics port,
    and its log the JSON lines the command writes (``events``, as ``ServiceProcess``'s).
    Without an interpreter's start-up and imports (a second or more of CPU each). What only
    a process shows (a real signal, a crash, SIGKILL, a second process on the cache dir,
    the command's own exit) runs ``ServiceProcess``. One runs at a time: the log set-up is
    the process's, put back by ``close``."""

    def __init__(self, config: Path, *, once: bool | None = None) -> None:
        import structlog

        from dpypeline.config.model import load_config
        from dpypeline.loop.service import Service
        from dpypeline.observability import logs
        from dpypeline.observability.redact import known_secrets
        from dpypeline.pipeline import import_tasks

        self.config = config
        self.pid = os.getpid()  # what ``status`` names as the service's
        loaded = load_config(config, environ=env_for_subprocess())
        root = logging.getLogger()
        configured = structlog.get_config() if structlog.is_configured() else None
        self._logging = (configured, logs.settings(), root.handlers[:], root.level)
        self._stream = io.StringIO()
        logs.configure(
            "json", loaded.logging.level, stream=self._stream, secrets=known_secrets(loaded)
        )
        jobs, setup = import_tasks(loaded)
        self.service = Service(loaded, jobs, setup, once=once)
        self.code: int | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-service")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.service.run()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test, by wait()
            self._error = exc

    def log_text(self) -> str:
        return self._stream.getvalue()

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The service's JSON log lines so far; with names, only those events."""
        return log_events(self.log_text(), names)

    def running(self) -> bool:
        return self.thread.is_alive()

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(
            lambda: self.events("service_ready") or not self.running(),
            timeout,
            message="service_ready",
        )
        if not self.running():
            pytest.fail(f"service ended ({self.code}, {self._error!r}):\n{self.log_text()}")

    def stop(self) -> None:
        """What SIGTERM does to the process (``StopSignals``): the first stops taking work
        and gives running jobs ``stop_grace``; a second puts them back at once."""
        self.service.request_stop()

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code ``dpypeline run`` would end with (``Service.run``'s)."""
        self.thread.join(timeout)
        if self.running():
            pytest.fail(f"the service still runs after {timeout}s:\n{self.log_text()[-3000:]}")
        if self._error is not None:
            raise self._error
        assert self.code is not None
        return self.code

    def close(self) -> None:
        """Stop now if still running, and put back the logging found at start."""
        import structlog

        from dpypeline.observability import logs

        if self.running():
            self.stop()
            self.stop()
            self.thread.join(30)
        configured, settings, handlers, level = self._logging
        if configured is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**configured)
        logs._settings.clear()
        logs._settings.update(settings)
        root = logging.getLogger()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def service_threads() -> Iterator[list[ServiceThread]]:
    started: list[ServiceThread] = []
    yield started
    for s in reversed(started):  # the last one's logging first: the first put back last
        s.close()


# Threads that live for the rest of the process by design, by name prefix, each with its
# owner; any other thread a test starts must be gone when it ends.
LONG_LIVED_THREADS = {
    "fsspecIO": "fsspec's event loop for async filesystems (s3fs), one per process",
    "asyncio_": "the default executor of that loop (aiohttp resolves host names in it)",
    "zarr_io": "zarr's event loop for its synchronous API, one per process",
    "moto-s3-server": "the session's S3 server (tests/s3server.py), restarted by outage tests",
    "Dask-Offload": "distributed's offload executor, one per process, made on first use",
    "Dask-Callback-Thread": "distributed's callback thread of that executor, also per process",
}


def _dask_default_pool() -> set[threading.Thread]:
    """The threads of dask's default pool: made on the first ``compute`` in the main thread
    and kept for the life of the process (dask shuts it down at exit)."""
    threaded = sys.modules.get("dask.threaded")
    pool = getattr(threaded, "default_pool", None)
    return set(getattr(pool, "_threads", ()))


def threads_left(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive, but for the process-long
    ones named in LONG_LIVED_THREADS and dask's default pool."""
    kept = _dask_default_pool()
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t not in kept
        and t.is_alive()
        and not t.name.startswith(tuple(LONG_LIVED_THREADS))
    ]


# The tests run in parallel (pytest-xdist). One marked ``machine_wide`` (it lowers a kernel
# setting for a moment) runs alone among this checkout's tests: from when it asks, no test
# of the run starts, and it begins when the running ones have ended. The lock files are the
# checkout's: another checkout's run (other branches, on a shared machine) neither waits for
# this one nor holds it up. Those tests come last and on one worker, which keeps the
# checkout from one to the next.
_CHECKOUT = hashlib.sha256(str(ROOT.resolve()).encode()).hexdigest()[:12]
_ALONE = Path(tempfile.gettempdir()) / f"dpypeline-tests-{_CHECKOUT}.alone"
_RUNNING = Path(tempfile.gettempdir()) / f"dpypeline-tests-{_CHECKOUT}.running"
_held: list[Any] = []  # this process's exclusive hold: the two open lock files


def _machine_wide(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("machine_wide") is not None


@pytest.fixture(autouse=True)
def machine_to_share(request: pytest.FixtureRequest) -> Iterator[None]:
    if _machine_wide(request.node):
        if not _held:
            _held[:] = [_ALONE.open("a"), _RUNNING.open("a")]
            for lock in _held:
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # released after the teardown of the last one in a row
        return
    with _ALONE.open("a") as alone, _RUNNING.open("a") as running:
        fcntl.flock(alone, fcntl.LOCK_SH)  # waits while a machine-wide test waits or runs
        fcntl.flock(running, fcntl.LOCK_SH)
        fcntl.flock(alone, fcntl.LOCK_UN)
        yield


@pytest.hookimpl(trylast=True)  # after the test's own teardown has put the settings back
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _held and not _machine_wide(nextitem):
        for lock in _held:
            lock.close()
        _held.clear()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (a service, watcher, executor, client or
    pool not closed), ours or a library's."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while threads_left(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = threads_left(before)
    assert not left, f"threads left running: {left}"


@pytest.fixture(autouse=True, scope="session")
def uncached_loggers() -> Iterator[None]:
    """In-process tests read log events with ``structlog.testing.capture_logs``, which
    cannot reach a logger cached under an earlier test's ``logs.configure``: within the
    tests, loggers are never cached (the service and CLI processes cache them as ever)."""
    import structlog

    real = structlog.configure

    def configure(*args: Any, **kwargs: Any) -> None:
        real(*args, **{**kwargs, "cache_logger_on_first_use": False})

    structlog.configure = configure  # type: ignore[assignment]
    yield
    structlog.configure = real


DURATIONS = "dpypeline/durations"  # seconds each test took in the last run that ran it
# what a fresh clone orders by before its first run: a run's durations, kept with the tests
# (``python -m pytest --keep-durations`` writes them)
KEPT_DURATIONS = TESTS / "durations.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-durations",
        action="store_true",
        help=f"write the durations of this run to {KEPT_DURATIONS.name} (a fresh clone's order)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first (as long as they took last time, else in the run that wrote
    ``tests/durations.json``; a test in neither: first if marked slow or systemd): run side by
    side, they then end together rather than one of them holding the whole run up at its end.
    The machine-wide ones last. xdist hands the tests out in this order
    (``--no-loadscope-reorder``)."""
    cache = getattr(config, "cache", None)  # none with -p no:cacheprovider
    kept = json.loads(KEPT_DURATIONS.read_text()) if KEPT_DURATIONS.exists() else {}
    took: dict[str, float] = {**kept, **(cache.get(DURATIONS, {}) if cache is not None else {})}

    def order(item: pytest.Item) -> tuple[int, float]:
        marks = {m.name for m in item.iter_markers()}
        if "machine_wide" in marks:
            return 2, 0.0
        if "slurm" in marks:
            # first, before the data-heavy tests fill the memory: the sandbox's node
            # registers the memory free when it starts, and is drained if it has less
            return -1, 0.0
        if item.nodeid in took:
            return 0, -took[item.nodeid]
        return (0, -60.0) if marks & {"slow", "systemd"} else (1, 0.0)

    items.sort(key=order)


_took: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where the reports of every worker arrive: each test's setup, call and teardown."""
    _took[report.nodeid] = _took.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _took == {} or hasattr(session.config, "workerinput"):
        return  # a worker: the controller, which saw every report, keeps them
    cache = getattr(session.config, "cache", None)
    if cache is not None:
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_took})
    if session.config.getoption("--keep-durations"):
        rounded = {nodeid: round(seconds, 1) for nodeid, seconds in sorted(_took.items())}
        KEPT_DURATIONS.write_text(json.dumps(rounded, indent=0) + "\n")


pytest_plugins = ["s3server", "sandbox", "tcpproxy"]
