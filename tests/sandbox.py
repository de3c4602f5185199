"""A real systemd to test the shipped units against: ``../shared/tools/systemd-sandbox``
boots one as PID 1 in a throwaway container that shares this machine's /usr (and the
Python under /root/.pyenv). Directories bound into it appear at the same path inside.

The units under test are the shipped ones; only ExecStart and paths may differ: the
service runs this checkout's code with the interpreter running the tests, and test task
modules are importable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "systemd-sandbox"
WORK = Path("/srv/dpypeline-tests")  # not under /tmp: the units have a private /tmp
UNIT = "dpypeline.service"


def unavailable() -> str | None:
    """Why the sandbox cannot run here, or None."""
    if os.geteuid() != 0:
        return "systemd tests need root (the sandbox boots a container)"
    if not TOOL.exists():
        return f"the systemd sandbox tool is missing: {TOOL}"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (Debian: apt-get install systemd-container)"
    return None


SHARED = (Path("/usr"), Path("/root/.pyenv"))  # what every container has (the tool's binds)


def reachable_python(work: Path) -> tuple[str, Path | None]:
    """The interpreter running the tests, as a unit in the container can run it, and the
    mount made for that (None: none was needed). An interpreter under the shared trees is
    there as it is; a virtual environment anywhere else (under /tmp, which the units'
    PrivateTmp= hides, or a home directory) is bind-mounted under *work*, which is bound
    into the container. Its base interpreter must be under the shared trees."""
    prefix = Path(sys.prefix)
    if any(prefix.is_relative_to(tree) for tree in SHARED) or sys.prefix == sys.base_prefix:
        return sys.executable, None
    mount = work / "venv"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(prefix), str(mount)], check=True)
    return str(mount / Path(sys.executable).relative_to(prefix)), mount


class Sandbox:
    def __init__(self, name: str, work: Path, python: str = sys.executable) -> None:
        self.name, self.work = name, work
        self.inbox, self.output = work / "inbox", work / "output"
        self.code = work / "code"
        self.python = python  # the tests' interpreter, as the units reach it

    # -- running things inside ------------------------------------------------------------

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(TOOL), "exec", self.name, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                f"stderr: {proc.stderr}"
            )
        return proc

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def copy(self, src: Path, dest: str) -> None:
        subprocess.run([str(TOOL), "copy", self.name, str(src), dest], check=True)

    def show(self, prop: str, unit: str = UNIT) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def main_pid(self, unit: str = UNIT) -> int:
        return int(self.show("MainPID", unit))

    def journal(self, *matches: str, unit: str = UNIT) -> list[dict[str, Any]]:
        out = self._journalctl("-u", unit, "-o", "json", "--no-pager", *matches)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def journal_text(self, unit: str = UNIT) -> str:
        return self._journalctl("-u", unit, "-o", "cat", "--no-pager")

    def _journalctl(self, *args: str) -> str:
        """journald stores what it was sent first (`--sync`): a line logged before the call,
        even by a process that has exited since, is in the answer."""
        return self.sh(f"journalctl --sync && {shlex.join(['journalctl', *args])}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The dpypeline command line, as the service user (the state's owner)."""
        return self.run(
            "setpriv",
            "--reuid=dpypeline",
            "--regid=dpypeline",
            "--init-groups",
            "env",
            f"PYTHONPATH={self.code / 'src'}:{self.code / 'tests'}",
            self.python,
            "-m",
            "dpypeline",
            *args,
            "-c",
            "/etc/dpypeline/pipeline.yaml",
            check=check,
        )

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("jobs", "--json", "--limit", "1000").stdout)

    # -- setting up the service -------------------------------------------------------------

    def add_service_user(self) -> None:
        self.copy(ROOT / "deploy" / "dpypeline.sysusers", "/etc/sysusers.d/dpypeline.conf")
        self.run("systemd-sysusers", "/etc/sysusers.d/dpypeline.conf")

    def install_units(self) -> None:
        """The shipped units, with ExecStart running this checkout and the test's paths."""
        python = f"/usr/bin/env PYTHONPATH={self.code / 'src'}:{self.code / 'tests'} {self.python}"
        for name in (UNIT, "dpypeline@.service"):
            text = (ROOT / "systemd" / name).read_text()
            text = text.replace("/opt/dpypeline/bin/dpypeline", f"{python} -m dpypeline")
            text = text.replace("/srv/dpypeline/output", str(self.output))
            local = self.work / name
            local.write_text(text)
            self.copy(local, f"/etc/systemd/system/{name}")
        self.run("systemctl", "daemon-reload")

    def configure(self, **overrides: Any) -> dict[str, Any]:
        """Write /etc/dpypeline/pipeline.yaml: the watched inbox, a recording job."""
        data: dict[str, Any] = {
            "name": "test",
            "cache_dir": "/var/lib/dpypeline",
            "watch": [{"path": str(self.inbox), "settle": "300ms", "rescan_interval": "1m"}],
            "retry": {
                "max_attempts": 3,
                "backoff": {"initial": "500ms", "max": "2s"},
                "job_timeout": "1m",
            },
            "jobs": [
                {
                    "name": "record",
                    "tasks": [{"task": "taskbox.record", "with": {"log": str(self.runs)}}],
                }
            ],
        }
        data.update(overrides)
        local = self.work / "pipeline.yaml"
        local.write_text(yaml.safe_dump(data, sort_keys=False))
        self.copy(local, "/etc/dpypeline/pipeline.yaml")
        return data

    @property
    def runs(self) -> Path:
        return self.output / "runs.log"

    def stage_install(self, wheelhouse: Path) -> tuple[Path, Path]:
        """deploy/ and systemd/ as shipped, and the wheels install.sh will use: in the
        bound directory, readable by anyone (install.sh --user runs as an ordinary user)."""
        wheels = self.work / "wheels"
        shutil.copytree(wheelhouse, wheels, copy_function=os.link)
        shutil.copytree(ROOT / "deploy", self.work / "deploy")
        shutil.copytree(ROOT / "systemd", self.work / "systemd")
        for path in (self.work, *self.work.rglob("*")):
            executable = path.is_dir() or path.suffix == ".sh"
            path.chmod(0o755 if executable else 0o644)
        return self.work / "deploy", wheels

    def recorded(self) -> list[str]:
        """The relative paths of the task runs recorded so far, in order."""
        if not self.runs.exists():
            return []
        return [line.split("\t")[0] for line in self.runs.read_text().splitlines()]

    def drop(self, *names: str) -> None:
        """Files arrive the way rsync delivers them: written under a hidden name, renamed."""
        for name in names:
            tmp = self.inbox / f".{name}.part"
            tmp.write_bytes(name.encode())
            tmp.rename(self.inbox / name)

    def wait(
        self, predicate: Callable[[], Any], timeout: float = 60, message: str = "condition"
    ) -> Any:
        return wait_for(predicate, timeout, 0.3, message, detail=self.describe)

    def describe(self) -> str:
        return (
            f"unit: {self.show('ActiveState')}/{self.show('SubState')}"
            f" restarts={self.show('NRestarts')}\njournal:\n{self.journal_text()[-4000:]}"
        )


BOOT_TIMEOUT = 60.0
STATE = Path("/run/systemd-sandbox")


def boot(name: str, work: Path) -> bool:
    """``systemd-sandbox start``, made robust: the tool takes the first child of
    systemd-nspawn as the container's PID 1, but now and then that child is a short-lived
    helper, and the tool then waits its full minute for a dead process. Here the leader
    file is corrected to the child that is systemd, and boot is judged by asking it."""
    tool = subprocess.Popen(
        [str(TOOL), "start", name, "--bind", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + BOOT_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if tool.poll() == 0:
                return True
            leader, nspawn = STATE / f"{name}.leader", STATE / f"{name}.nspawn"
            if leader.exists() and nspawn.exists():
                if _comm(leader.read_text().strip()) != "systemd":
                    children = subprocess.run(
                        ["pgrep", "-P", nspawn.read_text().strip()],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout.split()
                    real = [pid for pid in children if _comm(pid) == "systemd"]
                    if real:
                        leader.write_text(real[0] + "\n")
                state = subprocess.run(
                    [str(TOOL), "exec", name, "systemctl", "is-system-running"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.strip()
                if state in ("running", "degraded"):
                    return True
            time.sleep(0.3)
        return False
    finally:
        if tool.poll() is None:
            tool.kill()  # only the tool's own wait loop: the container runs on
        tool.wait()


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# the dependencies' wheels, made once for each set of requirements and kept between runs:
# resolving and fetching them takes minutes, the checkout's own wheel seconds
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpypeline-tests"


def _dependency_wheels() -> Path:
    """Wheels of what ``dpypeline[dask]`` requires, from the cache (made on first use)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = sorted([*project["dependencies"], *project["optional-dependencies"]["dask"]])
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:16]
    kept = WHEEL_CACHE / f"wheels-{key}"
    if kept.is_dir():
        return kept
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    making = Path(tempfile.mkdtemp(prefix="wheels-", dir=WHEEL_CACHE))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *requirements, "-w", str(making)],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        shutil.rmtree(making, ignore_errors=True)
        pytest.fail(f"pip wheel of the dependencies failed: {built.stderr[-3000:]}")
    try:
        making.rename(kept)  # whole or not at all; another run may have made it meanwhile
    except OSError:
        shutil.rmtree(making, ignore_errors=True)
    return kept


def _build_python() -> Path:
    """An interpreter with the checkout's build backend, from the cache (made on first use):
    the checkout's wheel is built with it, not in an isolated environment that pip would
    make and install the backend into anew on every run."""
    requires = sorted(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    )
    key = hashlib.sha256("\n".join([sys.version, *requires]).encode()).hexdigest()[:16]
    kept = WHEEL_CACHE / f"build-{key}"
    if not kept.is_dir():
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        making = Path(tempfile.mkdtemp(prefix="build-", dir=WHEEL_CACHE))
        python = str(making / "bin" / "python")
        for cmd in (
            [sys.executable, "-m", "venv", "--without-pip", str(making)],
            [sys.executable, "-m", "pip", "--python", python, "install", "-q", *requires],
        ):
            made = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if made.returncode != 0:
                shutil.rmtree(making, ignore_errors=True)
                pytest.fail(f"the build environment failed: {made.stderr[-3000:]}")
        try:
            making.rename(kept)  # as the wheels above
        except OSError:
            shutil.rmtree(making, ignore_errors=True)
    return kept / "bin" / "python"


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:  # the cache on another file system
        shutil.copy2(src, dest)


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    """This checkout and everything it needs as wheels, for install.sh --wheelhouse."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    path = WORK / f"wheelhouse-{uuid.uuid4().hex[:8]}"
    shutil.copytree(_dependency_wheels(), path, copy_function=_link_or_copy)
    wheel = ["wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(path)]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(_build_python()), *wheel],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed: {built.stderr[-3000:]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    name = f"dpt-{uuid.uuid4().hex[:8]}"
    work = WORK / name
    for sub in ("inbox", "output", "code"):
        (work / sub).mkdir(parents=True)
    WORK.chmod(0o755)
    shutil.copytree(ROOT / "src", work / "code" / "src")
    shutil.copytree(
        ROOT / "tests", work / "code" / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in (work, *work.rglob("*")):  # readable by the service user
        path.chmod(0o755 if path.is_dir() else 0o644)
    python, mount = reachable_python(work)
    try:
        if not boot(name, work):
            subprocess.run([str(TOOL), "stop", name], check=False, capture_output=True)
            pytest.fail(f"the systemd sandbox {name} did not boot within {BOOT_TIMEOUT}s")
        box = Sandbox(name, work, python)
        try:
            # the container's /root holds the bound interpreter; the service user must reach it
            box.run("chmod", "0711", "/root")
            yield box
        finally:
            subprocess.run([str(TOOL), "stop", name], check=False, capture_output=True)
    finally:
        if mount is not None:
            subprocess.run(["umount", "--lazy", str(mount)], check=False)
        if mount is None or not os.path.ismount(mount):  # never delete through the mount
            shutil.rmtree(work, ignore_errors=True)
