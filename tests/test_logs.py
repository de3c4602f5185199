"""Logs: one shape for our events and the libraries' stdlib loggers; one summary per job."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from conftest import dpypeline, write_config
from dpypeline import Job, Pipeline, Task
from dpypeline.errors import PermanentError
from dpypeline.observability import logs


def test_stdlib_loggers_of_libraries_come_out_as_json_lines() -> None:
    stream = io.StringIO()
    try:
        logs.configure("json", "info", stream=stream)
        logging.getLogger("watchdog.observers.inotify_c").warning("queue %s", "overflowed")
        logs.get_logger("dpypeline.test").info("file_stable", file="/x.nc")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert lines[0]["event"] == "queue overflowed"
    assert lines[0]["level"] == "warning"
    assert lines[0]["logger"] == "watchdog.observers.inotify_c"
    assert lines[1]["event"] == "file_stable"
    assert lines[1]["file"] == "/x.nc"
    assert "timestamp" in lines[1]


@pytest.mark.parametrize(("level", "expected"), [("debug", "WARNING"), ("error", "ERROR")])
def test_libraries_that_set_their_own_levels_on_import_are_quieted_again(
    level: str, expected: str
) -> None:
    stream = io.StringIO()
    distributed = logging.getLogger("distributed")
    try:
        logs.configure("json", level, stream=stream)
        assert logging.getLevelName(distributed.level) == expected
        distributed.setLevel(logging.INFO)  # what importing distributed does
        logs.quiet_libraries()
        distributed.info("scheduler at %s", "tcp://x")
        distributed.log(logging.getLevelName(expected), "worker %s lost", "w1")
        events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert logging.getLevelName(distributed.level) == expected
    assert events == ["worker w1 lost"]


def test_each_job_ends_with_one_summary_line_with_its_context(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.txt").write_text("g")
    (inbox / "worse.txt").write_text("w")

    def check(path: str) -> str:
        if "worse" in path:
            raise PermanentError("unreadable header")
        return path

    pipeline = Pipeline(
        watch=[{"path": str(inbox), "settle": "100ms"}],
        jobs=[Job("check", [Task(check)])],
        cache_dir=str(tmp_path / "state"),
    )
    with capture_logs() as captured:
        assert pipeline.run(once=True) == 3  # a job ended dead
    summaries = [e for e in captured if e["event"] in ("job_done", "job_dead")]
    assert [(Path(e["file"]).name, e["event"]) for e in summaries] == [
        ("good.txt", "job_done"),
        ("worse.txt", "job_dead"),
    ]
    for e in summaries:
        assert {"job_id", "file", "job", "attempt", "state"} <= e.keys()
    assert summaries[0]["duration"] >= 0
    assert "unreadable header" in summaries[1]["error"]


def _decode_entry(data: bytes) -> dict[str, str]:
    """Parse one native-protocol journal entry (what journald itself does)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


def test_under_systemd_each_event_is_a_journal_entry_with_indexed_fields(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    try:
        logs.configure("journald", "info", journal_socket=str(path))
        log = logs.get_logger("dpypeline.worker")
        log.info("job_done", job_id=7, file="/in/x.nc", state="done", duration=0.5)
        try:
            raise ValueError("bad header\nsecond line")
        except ValueError:
            log.exception("job_dead", job_id=8, file="/in/y.nc", state="dead")
        logging.getLogger("s3fs").warning("slow %s", "bucket")
        entries = [_decode_entry(journal.recv(65536)) for _ in range(3)]
    finally:
        journal.close()
        structlog.reset_defaults()
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers.clear()
    done, dead, foreign = entries
    assert done["DPYPELINE_EVENT"] == "job_done"
    assert done["DPYPELINE_JOB_ID"] == "7"
    assert done["DPYPELINE_FILE"] == "/in/x.nc"
    assert done["DPYPELINE_STATE"] == "done"
    assert done["PRIORITY"] == "6"
    assert done["MESSAGE"].startswith("job_done job_id=7")
    assert dead["PRIORITY"] == "3"
    assert dead["DPYPELINE_STATE"] == "dead"
    assert "ValueError: bad header\nsecond line" in dead["DPYPELINE_EXCEPTION"]
    assert foreign["MESSAGE"].startswith("slow bucket")
    assert foreign["PRIORITY"] == "4"


def test_journald_format_without_a_journal_falls_back_to_json_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    try:
        logs.configure("journald", "info", stream=stream, journal_socket=str(tmp_path / "none"))
        logs.get_logger().info("service_ready", name="x")
        line = json.loads(stream.getvalue().splitlines()[0])
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert line["event"] == "service_ready"


SECRETS = {
    "storage_options key": "AKIAOPTIONSKEY0001",
    "storage_options secret": "options/Secret+Value=0001",
    "credentials file token": "AKIAFILETOKEN00002",
    "credentials file secret": 'file"Secret\\Value0002',
    "AWS_SECRET_ACCESS_KEY": "env/Secret+Access=0003",
    "AWS_SESSION_TOKEN": "envSessionToken0004",
}
ENV = {name: SECRETS[name] for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}


def _leaky_pipeline(tmp_path: Path, fmt: str) -> Path:
    """One file, one job whose task dies with secrets all around it (taskbox.leak)."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
    creds = tmp_path / "s3.json"
    creds.write_text(
        json.dumps(
            {
                "token": SECRETS["credentials file token"],
                "secret": SECRETS["credentials file secret"],
                "endpoint_url": "http://127.0.0.1:9",
            }
        )
    )
    creds.chmod(0o600)
    options = {
        "key": SECRETS["storage_options key"],
        "secret": SECRETS["storage_options secret"],
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
    }
    return write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox"), "settle": "50ms"}],
            "retry": {"max_attempts": 1},
            "objectstores": {"store": {"credentials": str(creds)}},
            "jobs": [
                {
                    "name": "leak",
                    "tasks": [{"task": "taskbox.leak", "with": {"storage_options": options}}],
                }
            ],
            "logging": {"format": fmt},
        },
    )


def _assert_no_secret(text: str) -> None:
    for what, secret in SECRETS.items():
        for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]):
            assert form not in text, f"the {what} is in the log"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_the_log_of_a_job_that_dies_with_secrets_around_it(
    tmp_path: Path, fmt: str
) -> None:
    cfg = _leaky_pipeline(tmp_path, fmt)
    proc = dpypeline("run", "--once", "-c", str(cfg), env=ENV)
    assert proc.returncode == 3, proc.stderr
    _assert_no_secret(proc.stderr)
    assert "connecting" in proc.stderr
    assert "PermissionError: access denied for key <redacted>" in proc.stderr
    assert "file_secret" not in proc.stderr
    if fmt == "json":
        assert "taskbox.py" in proc.stderr  # the task's frame is there, without its locals
        [dead] = [json.loads(line) for line in proc.stderr.splitlines() if '"job_dead"' in line]
        assert isinstance(dead["exception"], str)
        assert "service.py" not in dead["exception"]  # dpypeline's own frames left out
        assert len(dead["exception"]) < 1000


def test_no_secret_reaches_the_journal_of_a_job_that_dies_with_secrets_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from dpypeline.config.model import load_config
    from dpypeline.loop.service import Service
    from dpypeline.observability.redact import known_secrets
    from dpypeline.pipeline import import_tasks

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = load_config(_leaky_pipeline(tmp_path, "journald"))
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(0.5)
    entries: list[bytes] = []
    try:
        logs.configure("journald", "info", journal_socket=str(path), secrets=known_secrets(config))
        reader = threading.Thread(target=_receive, args=(journal, entries), name="test-journal")
        reader.start()
        jobs, setup = import_tasks(config)
        assert Service(config, jobs, setup, once=True).run() == 3
        reader.join(30)
    finally:
        journal.close()
        structlog.reset_defaults()
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers.clear()
    fields = [_decode_entry(e) for e in entries]
    [dead] = [f for f in fields if f["DPYPELINE_EVENT"] == "job_dead"]
    assert "PermissionError: access denied for key <redacted>" in dead["DPYPELINE_EXCEPTION"]
    assert any(f["DPYPELINE_EVENT"] == "connecting" for f in fields)
    _assert_no_secret(b"".join(entries).decode("utf-8", "replace"))


def _receive(sock: Any, into: list[bytes]) -> None:
    """Every datagram up to the service's last one."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except OSError:  # closed
            return
        into.append(data)
        if b"DPYPELINE_EVENT=service_stopped" in data:
            return


def test_tracebacks_leave_out_dpypelines_own_frames_unless_debug_and_never_show_locals() -> None:
    def fails(path: str) -> str:
        hidden_local = "only-in-the-frame"
        raise ValueError(f"cannot read {path} ({len(hidden_local)})")

    try:
        Job("j", [Task(fails)]).run("/in/x.nc")
    except ValueError as exc:
        short, full = logs.format_exception(exc), logs.format_exception(exc, full=True)
    assert "pipeline.py" not in short
    assert "frames left out" in short
    assert "pipeline.py" in full
    for text in (short, full):
        assert "in fails" in text
        assert text.endswith("ValueError: cannot read /in/x.nc (17)")
        assert "only-in-the-frame" not in text


def _console(level: str, roots: list[str], emit: Any) -> str:
    stream = io.StringIO()
    try:
        logs.configure("console", level, stream=stream, roots=roots)
        emit(logs.get_logger("dpypeline.worker"))
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    return stream.getvalue()


@pytest.fixture
def paris(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_console_lines_are_short_in_a_fixed_order_in_local_time_and_the_rest_only_at_debug(
    paris: None,
) -> None:
    def emit(log: Any) -> None:
        log.bind(job_id=12, file="/data/in/2023/a.nc", job="convert", attempt=2).info(
            "job_done", state="done", duration=0.5214, bytes_read=123
        )
        log.warning("scan_done", watch="/data/in", files=20, new=3, reason="rescan")

    info = _console("info", ["/data", "/data/in"], emit).splitlines()
    zone = time.strftime("%Z", time.localtime())
    assert zone in ("CET", "CEST")
    done = info[0].split()
    assert done[1:] == [zone, "info", "job_done", "2023/a.nc", "convert#12", "0.52s"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d", done[0])
    assert len(info[0]) < 80
    assert info[1].split()[3:] == ["scan_done", "files=20", "new=3", "reason=rescan"]
    debug = _console("debug", ["/data/in"], emit).splitlines()
    # the other fields follow, in the order the event gave them, not alphabetically
    assert debug[0].split()[7:] == [
        "attempt=2",
        "state=done",
        "bytes_read=123",
        "logger=dpypeline.worker",
    ]


def test_the_console_shows_no_frame_locals_even_with_rich_installed() -> None:
    def emit(log: Any) -> None:
        hidden_local = "only-in-the-frame"
        try:
            raise ValueError(f"bad header ({len(hidden_local)})")
        except ValueError:
            log.exception("job_dead", file="/in/x.nc")

    for level in ("info", "debug"):
        text = _console(level, [], emit)
        # the traceback only at debug: at other levels the line's error says what happened
        assert ("ValueError: bad header (17)" in text) is (level == "debug")
        assert "only-in-the-frame" not in text  # the local's value, never shown


def test_a_short_traceback_keeps_the_users_frames_and_the_error_not_the_librarys() -> None:
    def task(path: str) -> Any:
        return json.loads(path)  # the error is raised inside the standard library

    try:
        Job("j", [Task(task)]).run("not json")
    except json.JSONDecodeError as exc:
        short, full = logs.format_exception(exc), logs.format_exception(exc, full=True)
    assert "json/decoder.py" not in short
    assert "json/decoder.py" in full
    assert "in task" in short
    assert short.endswith("json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)")


FAILING_TASK = """\
import json


def parse(path, context=None):
    context.log.info("parsing", size=1)
    hidden_local = "only-in-the-frame"
    with open(path) as f:
        return json.loads(f.read() + hidden_local[:0])
"""


def _failing_pipeline(tmp_path: Path, level: str, executor: dict[str, Any] | None = None) -> Path:
    (tmp_path / "inbox" / "2023").mkdir(parents=True)
    (tmp_path / "parsetasks.py").write_text(FAILING_TASK)
    (tmp_path / "inbox" / "2023" / "bad.json").write_text("not json")
    return write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox"), "settle": "50ms"}],
            "retry": {"max_attempts": 1},
            "executor": executor or {"kind": "serial"},
            "jobs": [{"name": "parse", "tasks": [{"task": "parsetasks.parse"}]}],
            "logging": {"format": "console", "level": level},
        },
    )


def test_a_failure_is_one_line_on_the_console_its_traceback_at_debug_never_with_locals(
    tmp_path: Path,
) -> None:
    info = dpypeline("run", "--once", "-c", str(_failing_pipeline(tmp_path, "info")))
    assert info.returncode == 3, info.stderr
    lines = info.stderr.splitlines()
    started = next(line for line in lines if " job_started " in line)
    assert started.split()[2:] == ["info", "job_started", "2023/bad.json", "parse#1"]
    dead = lines.index(next(line for line in lines if " job_dead " in line))
    assert "JSONDecodeError: Expecting value" in lines[dead]
    assert " service_" in lines[dead + 1]  # the next event, not a traceback
    assert "Traceback" not in info.stderr
    assert not any(line.startswith("{") for line in lines)  # one format: no JSON lines
    debug = dpypeline("run", "--once", "-c", str(_failing_pipeline(tmp_path / "d", "debug")))
    assert debug.returncode == 3, debug.stderr
    assert "Traceback (most recent call last" in debug.stderr
    for frame in ("pipeline.py", "json/decoder.py", "parsetasks.py"):
        assert frame in debug.stderr
    for text in (info.stderr, debug.stderr):
        assert "only-in-the-frame" not in text  # a local's value, never shown


@pytest.mark.slow
def test_dask_workers_log_in_the_services_console_format(tmp_path: Path) -> None:
    cluster = {"options": {"n_workers": 1, "processes": True, "dashboard_address": ":0"}}
    cfg = _failing_pipeline(tmp_path, "info", {"kind": "dask", "cluster": cluster})
    proc = dpypeline("run", "--once", "-c", str(cfg), timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    said = [line for line in lines if " parsing " in line]  # logged by the task on the worker
    assert len(said) == 1, proc.stderr
    assert said[0].split()[2:] == ["info", "parsing", "2023/bad.json", "parse#1"]
    assert not any(line.lstrip().startswith("{") for line in lines), proc.stderr
    assert "Compute Failed" not in proc.stderr  # the worker's copy of the job's failure
    [dead] = [line for line in lines if " job_dead " in line]  # one line, no traceback
    assert "JSONDecodeError: Expecting value" in dead
    assert "Traceback" not in proc.stderr
    assert "only-in-the-frame" not in proc.stderr


def test_a_truncated_netcdf_file_fails_in_one_line_that_names_it_once_without_noise(
    tmp_path: Path,
) -> None:
    """The console line of a dead job: the file once, relative to its watch root; what
    happened and what to do; no traceback, no chained cache miss of xarray's."""
    inbox = tmp_path / "inbox" / "nemo"
    inbox.mkdir(parents=True)
    # the real GYRE output the repository keeps for its examples
    source = (
        Path(__file__).resolve().parents[1]
        / "examples/data/nemo-gyre/nemo4.0-GYRE_1y_00010101_00011230_grid_T.nc"
    )
    (inbox / "y2_grid_T.nc").write_bytes(source.read_bytes()[:40000])
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox"), "settle": "50ms"}],
            "jobs": [
                {
                    "name": "to-zarr",
                    "tasks": [
                        {"task": "open_dataset", "with": {"chunks": {"time_counter": 1}}},
                        {"task": "to_zarr", "with": {"store": str(tmp_path / "out.zarr")}},
                    ],
                }
            ],
            "logging": {"format": "console"},
        },
    )
    run = dpypeline("run", "--once", "-c", str(cfg))
    assert run.returncode == 3, run.stderr
    [dead] = [line for line in run.stderr.splitlines() if " job_dead " in line]
    assert dead.count("y2_grid_T.nc") == 1
    assert " nemo/y2_grid_T.nc to-zarr#1 " in dead
    assert "not readable NetCDF" in dead
    assert "re-send the file" in dead
    assert "dpypeline retry 1" in dead
    assert len(dead) < 300, dead
    for noise in ("Traceback", "KeyError", str(inbox)):
        assert noise not in run.stderr
    # status and jobs show the file in its own column, and the error without it
    [error] = [
        line for line in dpypeline("status", "-c", str(cfg)).stdout.splitlines() if "#1" in line
    ]
    assert error.count("y2_grid_T.nc") == 1
    # a job the operator skipped is not told to be retried
    assert dpypeline("skip", "1", "-c", str(cfg)).returncode == 0
    [listed] = json.loads(dpypeline("jobs", "--json", "-c", str(cfg)).stdout)
    assert listed["state"] == "skipped"
    assert "retry" not in listed["error"]
    assert "not readable NetCDF" in listed["error"]
