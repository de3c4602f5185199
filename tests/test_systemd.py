"""The shipped units under a real systemd (tests/sandbox.py): readiness, status, journal
fields, restarts after a crash, a hang and a SIGSTOP, no restart loop on a bad config, a
graceful stop, and the hardening letting the job do its work (and nothing else)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import ROOT, TOOL, UNIT, Sandbox

pytestmark = pytest.mark.systemd

UNITS = [ROOT / "systemd" / "dpypeline.service", ROOT / "systemd" / "dpypeline@.service"]
USER_UNIT = ROOT / "systemd" / "user" / "dpypeline.service"

# pip's compiling of every installed module is two thirds of an install's CPU time, and
# no test here depends on it: the tests that install skip it (each module is compiled when
# first imported instead)
NO_BYTECODE = "PIP_COMPILE=0"
# ...but the system service's commands run as its user, who cannot write bytecode into
# root's /opt/dpypeline: each would compile the thousand modules it imports anew (seconds
# each time). Importing those once as root, after the install, compiles only them.
IMPORTED = (
    "dpypeline.cli",
    "dpypeline.loop.service",
    "dpypeline.objectstore",
    "dpypeline.tasks.netcdf",
    "dpypeline.tasks.zarr.to_zarr",
    "kerchunk.codecs",
    "xarray",
    "zarr",
)


def ready(box: Sandbox, **config: object) -> None:
    box.add_service_user()
    box.run("chown", "dpypeline:dpypeline", str(box.output))
    # what install.sh leaves: an empty 0600 credentials file for LoadCredential=
    box.sh("mkdir -p /etc/dpypeline && umask 077 && echo '{}' > /etc/dpypeline/credentials.json")
    box.install_units()
    box.configure(**config)


def start(box: Sandbox) -> float:
    t0 = time.monotonic()
    proc = box.run("systemctl", "start", UNIT, check=False)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(
            f"systemctl start failed: {proc.stderr}\njournal:\n{box.journal_text()[-4000:]}"
        )
    return took


def settled_failed(box: Sandbox, unit: str = UNIT) -> None:
    """Until systemd has decided what follows a failed start: a restart it will make is a
    pending one (``auto-restart``, for RestartSec=), a unit left ``failed`` gets none."""
    box.wait(
        lambda: box.show("SubState", unit) in ("failed", "auto-restart"),
        message=f"{unit} failed or waiting to restart",
    )


# the watchdog timeout and the restart delay, shortened for the tests that wait on them
# through a drop-in, as an operator's `systemctl edit` would (the shipped unit keeps its
# 30 s and 5 s): each watchdog restart then costs seconds, not most of a minute
WATCHDOG_SEC = 8  # pings every 4 s: room for a busy machine


def quicken(box: Sandbox) -> None:
    drop_in = box.work / "timers.conf"
    drop_in.write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nRestartSec=500ms\n")
    box.copy(drop_in, f"/etc/systemd/system/{UNIT}.d/timers.conf")
    box.run("systemctl", "daemon-reload")
    assert box.show("RestartUSec") == "500ms"  # in effect (WatchdogUSec= shows once started)
    assert f"WatchdogSec={WATCHDOG_SEC}s" in box.run("systemctl", "cat", UNIT).stdout


# -- the unit files themselves -----------------------------------------------------------


def directives(path: Path) -> list[tuple[int, str]]:
    return [
        (n, line)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line and not line.startswith(("#", "["))
    ]


@pytest.mark.parametrize("path", [*UNITS, USER_UNIT], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_setting_says_why(path: Path) -> None:
    lines = path.read_text().splitlines()
    for n, line in directives(path):
        above = n - 2
        while above >= 0 and lines[above] and not lines[above].startswith(("#", "[")):
            above -= 1  # a group of related settings shares one comment
        assert above >= 0, f"{path.name}:{n}: {line} comes before any section"
        assert lines[above].startswith("#"), f"{path.name}:{n}: {line} has no comment"


def test_system_units_share_one_hardening() -> None:
    single, instance = (p.read_text().split("# --- hardening")[1] for p in UNITS)
    assert single == instance


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_security_exposure_is_ok(path: Path) -> None:
    if (
        subprocess.run(
            ["systemd-analyze", "--version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("systemd-analyze is missing")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out)
    assert found, out[-2000:]
    print(f"{path.name}: exposure {found[1]} {found[2]}")
    assert float(found[1]) <= 2.0, out


# -- the service under systemd -----------------------------------------------------------


@pytest.mark.slow  # boots a container
def test_start_waits_for_ready_then_files_are_processed_and_journaled(sandbox: Sandbox) -> None:
    box = sandbox
    ready(
        box,
        setup=[{"task": "taskbox.pause", "with": {"seconds": 2.5}}],
        jobs=[
            {
                "name": "record",
                "tasks": [{"task": "taskbox.record", "with": {"log": str(box.runs)}}],
            },
            {
                "name": "escape",
                "tasks": [
                    {"task": "taskbox.try_write", "with": {"log": str(box.output / "w.log")}}
                ],
            },
        ],
    )
    took = start(box)
    # Type=notify: `systemctl start` returned only once READY=1 came, after the setup task
    assert took >= 2.5
    assert box.show("ActiveState") == "active"
    events = [e.get("DPYPELINE_EVENT") for e in box.journal()]
    assert events.index("setup_done") < events.index("service_ready")
    assert re.search(r"\d+ queued, \d+ running, .*\d+ done, \d+ dead", box.show("StatusText"))

    names = [f"2024-01-{day:02d}.nc" for day in range(1, 6)]
    box.drop(*names)
    box.wait(lambda: box.status()["done"] == 10, message="5 files x 2 jobs done")
    assert sorted(box.recorded()) == names
    assert "5 done" not in box.show("StatusText")  # counts per job entry, not per file
    assert box.wait(lambda: "10 done" in box.show("StatusText"), message="status text updated")

    done = box.wait(  # the ledger is written before the line is logged
        lambda: (
            (d := box.journal("DPYPELINE_STATE=done", "DPYPELINE_JOB=record")) and len(d) >= 5 and d
        ),
        message="five job_done lines",
    )
    assert sorted(e["DPYPELINE_FILE"] for e in done) == [str(box.inbox / n) for n in names]
    one = box.journal(f"DPYPELINE_FILE={box.inbox / names[0]}")
    assert {e["DPYPELINE_EVENT"] for e in one} >= {"job_done"}
    assert all(e["PRIORITY"] == "6" for e in done)  # info

    # the hardening let the job read the watched directory, write its output and the
    # state; writing next to the input (not a ReadWritePaths=) is refused
    outcomes = dict(line.split("\t") for line in (box.output / "w.log").read_text().splitlines())
    assert set(outcomes) == set(names)
    assert set(outcomes.values()) == {"Read-only file system"}
    assert box.sh("stat -c '%U %a' /var/lib/dpypeline").split() == ["dpypeline", "700"]


@pytest.mark.slow  # boots a container
def test_kill_9_restarts_and_the_running_job_resumes(sandbox: Sandbox) -> None:
    box = sandbox
    ready(box)
    quicken(box)
    box.configure(
        jobs=[
            {
                "name": "record",
                "tasks": [{"task": "taskbox.record_held", "with": {"log": str(box.runs)}}],
            }
        ]
    )
    start(box)
    names = ["f00.nc", "f01.nc", "f02-held.nc", "f03.nc", "f04.nc", "f05.nc"]
    box.drop(*names)
    box.wait(
        lambda: (
            {Path(j["path"]).name: j["state"] for j in box.jobs()}.items()
            >= {"f00.nc": "done", "f01.nc": "done", "f02-held.nc": "running"}.items()
        ),
        message="two files done, the third running",
    )
    first = box.main_pid()
    box.run("kill", "-9", str(first))
    box.wait(
        lambda: box.show("NRestarts") == "1" and box.show("ActiveState") == "active",
        message="systemd to restart the service",
    )
    assert box.main_pid() != first
    box.wait(lambda: box.status()["done"] == 6, timeout=90, message="all six done")
    jobs = box.jobs()
    assert sorted(Path(j["path"]).name for j in jobs) == names  # one row each: nothing lost
    assert {j["state"] for j in jobs} == {"done"}
    assert sorted(set(box.recorded())) == names
    attempts = {Path(j["path"]).name: j["attempts"] for j in jobs}
    assert attempts == dict.fromkeys(names, 1) | {"f02-held.nc": 2}  # the one killed ran again
    assert "jobs_recovered" in {e.get("DPYPELINE_EVENT") for e in box.journal()}


@pytest.mark.slow  # boots a container
def test_a_hung_job_stops_the_pings_systemd_restarts_and_the_job_ends_dead(
    sandbox: Sandbox,
) -> None:
    box = sandbox
    ready(box)
    quicken(box)
    box.configure(
        retry={"max_attempts": 2, "backoff": {"initial": "500ms"}, "job_timeout": "1s"},
        jobs=[
            {
                "name": "record",
                "tasks": [{"task": "taskbox.behave", "with": {"log": str(box.runs)}}],
            }
        ],
    )
    start(box)
    box.drop("a-hang.nc", "b.nc", "c.nc")
    box.wait(
        lambda: int(box.show("NRestarts")) >= 2,
        timeout=90,
        message="two watchdog restarts",
    )
    text = box.journal_text()
    assert "Watchdog timeout" in text
    assert "job_stuck" in text
    assert "Current thread" in text or "Thread 0x" in text  # stacks dumped on SIGABRT
    box.wait(lambda: box.status()["done"] == 2, timeout=60, message="the other files done")
    states = {Path(j["path"]).name: (j["state"], j["attempts"]) for j in box.jobs()}
    assert states["a-hang.nc"] == ("dead", 2)
    assert states["b.nc"][0] == states["c.nc"][0] == "done"
    dead = box.journal("DPYPELINE_STATE=dead")
    assert [e["DPYPELINE_FILE"] for e in dead] == [str(box.inbox / "a-hang.nc")]
    assert box.show("ActiveState") == "active"


@pytest.mark.slow  # boots a container
def test_sigstop_is_caught_by_the_watchdog(sandbox: Sandbox) -> None:
    box = sandbox
    ready(box)
    quicken(box)
    start(box)
    first = box.main_pid()
    box.run("kill", "-STOP", str(first))
    box.wait(
        lambda: box.show("NRestarts") == "1" and box.show("ActiveState") == "active",
        timeout=90,
        message="a watchdog restart",
    )
    assert box.main_pid() != first
    assert "Watchdog timeout" in box.journal_text()
    box.drop("after.nc")
    box.wait(lambda: box.recorded() == ["after.nc"], message="the restarted service at work")


def operators_command(box: Sandbox) -> str:
    """deploy/dpypeline-cli.sh as install.sh installs it, running this checkout."""
    bindir = box.work / "cli" / "bin"
    bindir.mkdir(parents=True)
    python = f"/usr/bin/env PYTHONPATH={box.code / 'src'}:{box.code / 'tests'} {box.python}"
    (bindir / "dpypeline").write_text(f'#!/bin/sh\nexec {python} -m dpypeline "$@"\n')
    wrapper = box.work / "dpypeline-cli.sh"
    text = (ROOT / "deploy" / "dpypeline-cli.sh").read_text()
    wrapper.write_text(text.replace("@VENV@", str(box.work / "cli")))
    for path in (box.work / "cli", bindir, bindir / "dpypeline", wrapper):
        path.chmod(0o755)
    return str(wrapper)


@pytest.mark.slow  # boots a container
def test_a_broken_config_or_a_missing_credentials_file_fails_once_with_the_error_in_the_journal(
    sandbox: Sandbox,
) -> None:
    box = sandbox
    ready(box)
    command = operators_command(box)
    # dpypeline@nemo without /etc/dpypeline/nemo.credentials.json: a pipeline that uses no
    # object store starts, and validate (run by root, as the operator does) agrees
    instance, source = "dpypeline@nemo.service", "/etc/dpypeline/nemo.credentials.json"
    box.configure(cache_dir="/var/lib/dpypeline/nemo")
    box.sh("cp /etc/dpypeline/pipeline.yaml /etc/dpypeline/nemo.yaml")
    started = box.run("systemctl", "start", instance, check=False)
    assert started.returncode == 0, f"{started.stderr}\n{box.journal_text(instance)[-3000:]}"
    assert box.show("ActiveState", instance) == "active"
    box.run("systemctl", "stop", instance)
    # (its state directory, which validate checks, is there now)
    assert "ok: " in box.run(command, "validate", "-c", "/etc/dpypeline/nemo.yaml").stdout
    # with an object store, validate and the unit refuse it, naming the file to fill in
    box.configure(
        cache_dir="/var/lib/dpypeline/nemo",
        objectstores={"store": {"credentials": "${CREDENTIALS_DIRECTORY}/s3.json"}},
    )
    box.sh("cp /etc/dpypeline/pipeline.yaml /etc/dpypeline/nemo.yaml")
    missing = f"credentials file {source} (handed over by systemd as $CREDENTIALS_DIRECTORY"
    checked = box.run(command, "validate", "-c", "/etc/dpypeline/nemo.yaml", check=False)
    assert checked.returncode == 2
    assert missing in checked.stdout + checked.stderr
    assert box.run("systemctl", "start", instance, check=False).returncode != 0

    box.configure(wacth=[{"path": str(box.inbox)}])  # a typo
    proc = box.run("systemctl", "start", UNIT, check=False)
    assert proc.returncode != 0
    for unit in (UNIT, instance):
        settled_failed(box, unit)  # no restart pending: none will come after RestartSec=
        assert box.show("ActiveState", unit) == "failed"
        assert box.show("ExecMainStatus", unit) == "2"
        assert box.show("NRestarts", unit) == "0"
    text = box.journal_text()
    assert "wacth" in text  # the field, with the file and line it is on
    assert "/etc/dpypeline/pipeline.yaml:" in text
    assert text.count("Starting dpypeline.service") == 1
    text = box.journal_text(instance)
    assert missing in text
    assert text.count(f"Starting {instance}") == 2  # the start that worked, the one refused


DAMAGE_JOBS_ROOT = """
import sqlite3
db = "/var/lib/dpypeline/dpypeline.db"
conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
root, size = conn.execute(
    "SELECT rootpage, (SELECT page_size FROM pragma_page_size) FROM sqlite_master"
    " WHERE name = 'jobs'"
).fetchone()
conn.close()
with open(db, "r+b") as f:
    f.seek((root - 1) * size)
    f.write(b"\\xff" * 24)
"""


@pytest.mark.slow  # boots a container
def test_a_damaged_ledger_fails_once_with_what_to_do_in_the_journal(sandbox: Sandbox) -> None:
    box = sandbox
    ready(box)
    start(box)
    box.drop("a.nc")
    box.wait(lambda: box.status()["done"] == 1, message="the first file done")
    box.run("systemctl", "stop", UNIT)
    box.run(sys.executable, "-c", DAMAGE_JOBS_ROOT)
    proc = box.run("systemctl", "start", UNIT, check=False)
    assert proc.returncode != 0
    settled_failed(box)  # no restart pending: none will come after RestartSec=
    assert box.show("ActiveState") == "failed"
    assert box.show("ExecMainStatus") == "4"
    assert box.show("NRestarts") == "0"
    text = box.journal_text()
    assert "/var/lib/dpypeline/dpypeline.db is damaged" in text
    assert "dpypeline ledger restore" in text
    assert "writable" not in text
    assert box.recorded() == ["a.nc"]


@pytest.mark.slow  # boots a container
def test_long_jobs_are_healthy_and_systemctl_stop_is_graceful(
    sandbox: Sandbox,
) -> None:
    box = sandbox
    ready(box)
    quicken(box)

    def record_with(grace: str, **args: object) -> None:
        task = "taskbox.record_gated" if "gate" in args else "taskbox.record"
        job = {"task": task, "with": {"log": str(box.runs), **args}}
        box.configure(stop_grace=grace, jobs=[{"name": "record", "tasks": [job]}])

    gate = box.output / "go"  # the short job ends once this exists
    record_with(grace="30s", gate=str(gate))
    start(box)
    box.drop("short.nc")
    box.wait(lambda: box.journal("DPYPELINE_EVENT=job_started"), message="the short job started")
    stop = subprocess.Popen([str(TOOL), "exec", box.name, "systemctl", "stop", UNIT])
    try:
        box.wait(
            lambda: box.journal("DPYPELINE_EVENT=service_stopping"),
            message="the stop begun while the job runs",
        )
        assert box.show("ActiveState") == "deactivating"  # waiting for the job
        gate.touch()
        assert stop.wait(timeout=60) == 0
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert box.show("ActiveState") == "inactive"
    assert box.show("Result") == "success"
    assert box.recorded() == ["short.nc"]
    assert [j["state"] for j in box.jobs()] == ["done"]
    ends = [
        (e["DPYPELINE_EVENT"], e.get("DPYPELINE_RUNNING"))
        for e in box.journal()
        if e.get("DPYPELINE_EVENT") in ("service_stopping", "job_done")
    ]
    assert ends == [("service_stopping", "1"), ("job_done", None)], "stopped while it ran"

    record_with(grace="2s", delay=120.0)
    start(box)
    box.drop("long.nc")
    box.wait(lambda: box.status()["running"] == 1, message="the long job running")
    # a long job within its timeout is healthy: the pings go on while it runs (each one
    # moves systemd's watchdog timestamp), for longer than WatchdogSec= without a restart
    first = int(box.show("WatchdogTimestampMonotonic"))
    box.wait(
        lambda: int(box.show("WatchdogTimestampMonotonic")) > first + WATCHDOG_SEC * 1e6,
        message="watchdog pings for longer than WatchdogSec= while the long job runs",
    )
    assert box.show("NRestarts") == "0"
    assert box.status()["running"] == 1
    t0 = time.monotonic()
    box.run("systemctl", "stop", UNIT)
    assert time.monotonic() - t0 < 15  # the grace, not the job
    assert box.show("Result") == "success"
    states = {Path(j["path"]).name: (j["state"], j["attempts"]) for j in box.jobs()}
    assert states["long.nc"] == ("queued", 0)  # back in the queue, attempt refunded
    assert "job_released" in {e.get("DPYPELINE_EVENT") for e in box.journal()}


@pytest.mark.slow  # boots a container
@pytest.mark.xdist_group("wheelhouse")  # the tests that install from it share one build
def test_install_script_then_the_skeleton_config_runs_the_main_job(
    sandbox: Sandbox, wheelhouse: Path
) -> None:
    box = sandbox
    deploy, wheels = box.stage_install(wheelhouse)
    nemo = box.work / "nemo"
    make_nemo = [sys.executable, str(ROOT / "scripts" / "make_nemo.py"), str(nemo), "--files", "3"]
    subprocess.run(make_nemo, check=True, capture_output=True)
    install = [str(deploy / "install.sh"), "--wheelhouse", str(wheels), "--bindir", "/opt/bin"]
    install = ["env", NO_BYTECODE, *install]
    out = box.run(*install, timeout=300).stdout
    assert "installed dpypeline" in out
    box.run("/opt/dpypeline/bin/python", "-c", f"import {', '.join(IMPORTED)}")
    assert "credentials placeholder /etc/dpypeline/credentials.json (mode 0600)" in out
    assert "config skeleton /etc/dpypeline/pipeline.yaml" in out
    box.run("systemd-analyze", "verify", "dpypeline.service", "dpypeline@example.service")
    perms = box.sh(
        "stat -c '%n %U %G %a' /etc/dpypeline/pipeline.yaml /etc/dpypeline/credentials.json"
    )
    assert perms.split("\n")[:2] == [
        "/etc/dpypeline/pipeline.yaml root dpypeline 640",
        "/etc/dpypeline/credentials.json root root 600",
    ]
    assert "ok: dpypeline" in box.run("/opt/bin/dpypeline", "validate").stdout
    # an object store, as the skeleton explains: the credentials reach the command (run as
    # the service user) the way LoadCredential= hands them to the service
    secret = {"token": "AKIA-TEST", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}
    (box.work / "credentials.json").write_text(json.dumps(secret))
    box.copy(box.work / "credentials.json", "/etc/dpypeline/credentials.json")
    config = box.run("cat", "/etc/dpypeline/pipeline.yaml").stdout
    config += "objectstores:\n  jasmin:\n    credentials: ${CREDENTIALS_DIRECTORY}/s3.json\n"
    (box.work / "pipeline.yaml").write_text(config)
    box.copy(box.work / "pipeline.yaml", "/etc/dpypeline/pipeline.yaml")
    checked = box.run("/opt/bin/dpypeline", "validate").stdout
    assert "1 object store(s)" in checked
    assert "s3cr3t" not in checked
    assert box.run("ls", "/run").stdout.count("dpypeline-cli") == 0  # the private copy is gone

    box.run("systemctl", "start", UNIT)
    ready_line = [e for e in box.journal() if e.get("DPYPELINE_EVENT") == "service_ready"]
    assert ready_line  # started with the credential loaded and the object store configured
    for path in sorted(nemo.glob("*_grid_T.nc")):
        hidden, final = f"/srv/dpypeline/inbox/.{path.name}", f"/srv/dpypeline/inbox/{path.name}"
        box.sh(f"cp {path} {hidden} && mv {hidden} {final}")
    box.wait(
        lambda: '"done": 3' in box.run("/opt/bin/dpypeline", "status", "--json").stdout,
        timeout=90,
        message="three NEMO files appended",
    )
    steps = box.run(
        "/opt/dpypeline/bin/python",
        "-c",
        "import xarray as xr;"
        " print(xr.open_zarr('/srv/dpypeline/output/nemo_T.zarr').sizes['time_counter'])",
    ).stdout.strip()
    assert steps == "3"  # one annual mean per file

    # a second run upgrades in place: the config is kept, the running service restarts
    before = box.sh("md5sum /etc/dpypeline/pipeline.yaml"), box.main_pid()
    out = box.run(*install, timeout=300).stdout
    assert "restarted dpypeline.service" in out
    assert box.sh("md5sum /etc/dpypeline/pipeline.yaml") == before[0]
    assert box.main_pid() not in (0, before[1])
    assert box.show("ActiveState") == "active"

    out = box.run(str(deploy / "uninstall.sh"), "--bindir", "/opt/bin").stdout
    assert "kept /etc/dpypeline" in out
    assert box.show("LoadState") == "not-found"
    assert box.sh("ls /etc/dpypeline /var/lib/dpypeline").count("pipeline.yaml") == 1


@pytest.mark.slow  # boots a container
@pytest.mark.xdist_group("wheelhouse")
def test_user_install_runs_without_root(sandbox: Sandbox, wheelhouse: Path) -> None:
    box = sandbox
    deploy, wheels = box.stage_install(wheelhouse)
    # an ordinary user with a user manager that outlives logins (PAM from this machine)
    box.sh("useradd -m -s /bin/sh alice && loginctl enable-linger alice")
    subprocess.run(
        f"tar -C /etc -c pam.d security | {TOOL} exec {box.name} tar -C /etc -x",
        shell=True,
        check=True,
    )
    box.sh("systemctl restart user@$(id -u alice).service")
    uid = box.sh("id -u alice").strip()

    def as_alice(script: str, check: bool = True) -> str:
        return box.run(
            "setpriv",
            "--reuid=alice",
            "--regid=users",
            "--init-groups",
            "env",
            "HOME=/home/alice",
            f"XDG_RUNTIME_DIR=/run/user/{uid}",
            "PATH=/home/alice/.local/bin:/usr/bin:/bin",
            "sh",
            "-c",
            f"cd && {script}",
            check=check,
            timeout=300,
        ).stdout

    out = as_alice(f"{NO_BYTECODE} {deploy}/install.sh --user --wheelhouse {wheels}")
    assert "config skeleton /home/alice/.config/dpypeline/pipeline.yaml" in out
    as_alice("systemd-analyze --user verify dpypeline.service")
    as_alice("dpypeline validate -c ~/.config/dpypeline/pipeline.yaml")
    as_alice("systemctl --user start dpypeline")  # returns after READY=1
    assert as_alice("systemctl --user is-active dpypeline").strip() == "active"
    assert "0 queued" in as_alice("systemctl --user show -p StatusText --value dpypeline")
    state = as_alice(
        "stat -c '%a %U' ~/.local/state/dpypeline ~/.config/dpypeline/credentials.json"
    )
    assert state.split("\n")[:2] == ["700 alice", "600 alice"]
    # a file dropped in is processed; the journal has it
    nemo = box.work / "nemo"
    make_nemo = [sys.executable, str(ROOT / "scripts" / "make_nemo.py"), str(nemo), "--files", "1"]
    subprocess.run(make_nemo, check=True, capture_output=True)
    (nemo_file,) = nemo.glob("*_grid_T.nc")
    nemo_file.chmod(0o644)
    inbox = "/home/alice/dpypeline/inbox"
    as_alice(f"cp {nemo_file} {inbox}/.x && mv {inbox}/.x {inbox}/{nemo_file.name}")
    done = "journalctl --user -u dpypeline DPYPELINE_STATE=done -o cat --no-pager -q"
    box.wait(lambda: nemo_file.name in as_alice(done, check=False), message="the file done")
    out = as_alice("dpypeline status --json")  # found where install.sh --user put it
    assert '"done": 1' in out
    guide = as_alice("systemctl --user show -p Documentation --value dpypeline").strip()
    as_alice(f"test -f {guide.removeprefix('file:')}")
    out = as_alice(f"{deploy}/uninstall.sh --user")
    assert "kept /home/alice/.config/dpypeline" in out


@pytest.mark.slow  # boots a container
def test_an_object_store_down_at_start_is_waited_for_without_a_restart_loop(
    sandbox: Sandbox,
) -> None:
    box = sandbox
    ready(box)
    refused = {"token": "test-token", "secret": "test-secret", "endpoint_url": "http://127.0.0.1:9"}
    box.sh(f"umask 077 && echo '{json.dumps(refused)}' > /etc/dpypeline/credentials.json")
    box.configure(
        objectstores={"store": {"credentials": "${CREDENTIALS_DIRECTORY:-/none}/s3.json"}},
        setup=[{"task": "create_bucket", "with": {"objectstore": "store", "bucket": "nemo-n06"}}],
    )
    took = start(box)  # returns: READY came although setup could not run
    assert took < 30
    pid = box.main_pid()
    assert "waiting for objectstore 'store'" in box.show("StatusText")
    tries = box.wait(
        lambda: (found := box.journal("DPYPELINE_EVENT=setup_waiting"))[2:] and found,
        message="three tries of the setup",
    )
    # each failed try, by the process systemd started: it did not exit to be restarted
    assert {int(e["_PID"]) for e in tries} == {pid}
    assert box.show("ActiveState") == "active"
    assert box.show("NRestarts") == "0"
    assert box.main_pid() == pid
    assert box.journal_text().count("Starting dpypeline.service") == 1
    box.drop("a.nc")  # recorded while waiting; no job starts before setup succeeded
    box.wait(lambda: box.status()["queued"] == 1, message="the file queued")
    assert not box.recorded()
    box.run("systemctl", "stop", UNIT)
    assert box.show("Result") == "success"


@pytest.mark.slow  # boots a container
def test_the_dask_executor_works_inside_the_hardened_unit(sandbox: Sandbox) -> None:
    box = sandbox
    ready(box)
    box.configure(
        executor={
            "kind": "dask",
            "cluster": {"options": {"n_workers": 2, "threads_per_worker": 1}},
        },
        jobs=[
            {
                "name": "record",
                "tasks": [{"task": "taskbox.record", "with": {"log": str(box.runs), "delay": 0.5}}],
            }
        ],
    )
    start(box)
    assert box.wait(lambda: box.status()["executor"], message="the cluster in status")
    names = [f"d{i:02d}.nc" for i in range(8)]
    box.drop(*names)
    box.wait(lambda: box.status()["done"] == 8, timeout=90, message="eight files on the cluster")
    assert sorted(box.recorded()) == names
    assert box.show("NRestarts") == "0"
    events = {e.get("DPYPELINE_EVENT") for e in box.journal()}
    assert "cluster_ready" in events
    box.run("systemctl", "stop", UNIT)
    assert box.show("Result") == "success"
    leftover = box.sh("pgrep -u dpypeline -c || true").strip()
    assert leftover == "0"  # the workers went with the service
