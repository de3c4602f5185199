"""The command line's contract: exit codes, messages that name the field and line, and the
original dpypeline's forms."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import dpypeline as dpypeline_package
from conftest import ROOT, cli, dpypeline, env_for_subprocess, runs, write_config


@pytest.fixture
def good(tmp_path: Path) -> dict:
    (tmp_path / "inbox").mkdir()
    return {
        "cache_dir": str(tmp_path / "state"),
        "watch": [{"path": str(tmp_path / "inbox"), "settle": "100ms"}],
        "jobs": [
            {
                "name": "work",
                "tasks": [{"task": "taskbox.record", "with": {"log": str(tmp_path / "runs.log")}}],
            }
        ],
        "logging": {"format": "json"},
    }


def _broken(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(text)
    return cfg


JOB = "jobs:\n  - name: a\n    tasks:\n      - task: {task}\n"
WATCH = "watch:\n  - path: {inbox}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WATCH + "    setle: 2s\n" + JOB, ["broken.yaml:3", "watch[0].setle"]),
        (
            WATCH + "    settle: soon\n" + JOB,
            ["broken.yaml:3", "watch[0].settle", "not a duration"],
        ),
        (
            WATCH.replace("{inbox}", "{inbox}/missing") + JOB,
            ["broken.yaml:2", "watch[0].path", "does not exist"],
        ),
        (
            WATCH + JOB.replace("{task}", "taskbox.nope"),
            ["broken.yaml:6", "jobs[0].tasks[0].task", "no task 'nope'"],
        ),
        (
            WATCH + JOB.replace("{task}", "no_such_module.f"),
            ["broken.yaml:6", "jobs[0].tasks[0].task", "No module named 'no_such_module'"],
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_config_errors_exit_2_naming_field_and_line(
    tmp_path: Path, text: str, expected: list[str], command: str
) -> None:
    (tmp_path / "inbox").mkdir()
    cfg = _broken(tmp_path, text.format(inbox=tmp_path / "inbox", task="taskbox.noop"))
    proc = (cli if command == "validate" else dpypeline)(command, "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr


def test_missing_config_file_exits_2_and_says_how_to_give_one(tmp_path: Path) -> None:
    proc = cli("status", "-c", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr


def test_validate_accepts_a_good_config(tmp_path: Path, good: dict) -> None:
    cfg = write_config(tmp_path, good)
    proc = cli("validate", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: pipeline: 1 watch(es), 1 job(s) of 1 task(s)")


def test_original_i_form_runs_the_service_and_version_prints(tmp_path: Path, good: dict) -> None:
    good["monitor"] = False
    cfg = write_config(tmp_path, good)
    (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
    proc = dpypeline("-i", str(cfg), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in runs(tmp_path / "runs.log")] == ["a.nc"]
    version = dpypeline("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("dpypeline ")


def test_status_json_has_the_counts_and_config_from_environment(tmp_path: Path, good: dict) -> None:
    good["monitor"] = False
    cfg = write_config(tmp_path, good)
    for name in ("a.nc", "b.nc"):
        (tmp_path / "inbox" / name).write_bytes(b"x")
    assert dpypeline("run", "-c", str(cfg)).returncode == 0
    report = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert {k: report[k] for k in ("queued", "running", "retrying", "done", "dead", "skipped")} == {
        "queued": 0,
        "running": 0,
        "retrying": 0,
        "done": 2,
        "dead": 0,
        "skipped": 0,
    }
    assert report["service_pid"] is None


def test_retry_without_ids_is_a_usage_error(tmp_path: Path, good: dict) -> None:
    cfg = write_config(tmp_path, good)
    assert cli("retry", "-c", str(cfg)).returncode == 2


def test_the_readme_example_runs_and_converts_every_file(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", "run", "--once", "-c", "examples/gsod-celsius.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    inputs = sorted(p.name for p in (work / "examples/data/gsod-2023").glob("*.csv"))
    outputs = sorted(p.name for p in (work / "output/gsod-celsius").glob("*.csv"))
    assert outputs == inputs
    src = pd.read_csv(work / "examples/data/gsod-2023" / inputs[0])
    out = pd.read_csv(work / "output/gsod-celsius" / inputs[0])
    valid = src["TEMP"] != 9999.9
    expected = ((src.loc[valid, "TEMP"] - 32) * 5 / 9).round(2)
    assert (out.loc[valid, "TEMP"] - expected).abs().max() < 1e-9


def test_enqueue_of_a_file_applies_the_watch_patterns_as_a_directory_does(
    tmp_path: Path, good: dict
) -> None:
    inbox = tmp_path / "inbox"
    good["watch"][0]["patterns"] = ["*.nc"]
    cfg = write_config(tmp_path, good)
    for name in ("a.nc", "notes.txt", ".hidden.nc"):
        (inbox / name).write_bytes(b"x")
    refused = cli("enqueue", "-c", str(cfg), str(inbox / "notes.txt"), str(inbox / ".hidden.nc"))
    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("notes.txt", ".hidden.nc"), strict=True):
        assert line.startswith(f"not queued: {inbox / name} matches the patterns of no watch")
        assert f"{inbox}: patterns ['*.nc'], ignore_patterns ['.*', '*.tmp', '*.part']" in line
    assert refused.stdout.startswith("0 new job(s) from 0 file(s)")
    fifo = inbox / "pipe.nc"
    os.mkfifo(fifo)
    not_regular = cli("enqueue", "-c", str(cfg), str(fifo))
    assert (not_regular.returncode, not_regular.stderr.strip()) == (
        1,
        f"not queued: {fifo} is not a regular file",
    )
    taken = cli("enqueue", "-c", str(cfg), str(inbox / "a.nc"), str(inbox))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.startswith("1 new job(s) from 2 file(s)")  # a.nc, then deduplicated


def test_run_once_exits_3_when_a_job_ended_dead_and_says_so_last(
    tmp_path: Path, good: dict
) -> None:
    good["jobs"][0]["tasks"] = [{"task": "taskbox.behave", "with": {"log": str(tmp_path / "r")}}]
    good["retry"] = {"max_attempts": 1}
    cfg = write_config(tmp_path, good)
    (tmp_path / "inbox" / "bad.nc").write_bytes(b"b")
    (tmp_path / "inbox" / "good.nc").write_bytes(b"g")
    proc = dpypeline("run", "--once", "-c", str(cfg))
    assert proc.returncode == 3, proc.stderr
    last = json.loads(proc.stderr.splitlines()[-1])
    assert (last["event"], last["jobs_dead"], last["exit_code"]) == ("service_stopped", 1, 3)
    # nothing new dies in the next run: it exits 0
    proc = dpypeline("run", "--once", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "jobs_dead" not in proc.stderr.splitlines()[-1]


def test_retry_of_a_job_that_is_not_dead_or_does_not_exist_says_why(
    tmp_path: Path, good: dict
) -> None:
    good["monitor"] = False
    cfg = write_config(tmp_path, good)
    (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
    assert dpypeline("run", "-c", str(cfg)).returncode == 0
    proc = cli("retry", "-c", str(cfg), "1")
    assert proc.returncode == 1
    assert "job 1 is done, not dead" in proc.stderr
    proc = cli("retry", "-c", str(cfg), "999")
    assert proc.returncode == 1
    assert "job 999 does not exist" in proc.stderr


def _private(path: Path, mode: int = 0o600) -> None:
    path.write_text(json.dumps({"token": "AKIATESTTESTTEST", "secret": "verysecretvalue"}))
    path.chmod(mode)


TASK = "jobs:\n  - name: a\n    tasks:\n      - task: {task}\n        with: {with_}\n"
STORE = "objectstores:\n  s3:\n    credentials: {creds}\n"
WHAT_ONLY_THE_WORLD_TELLS = {
    "unknown with key": (
        WATCH + TASK.format(task="taskbox.record", with_="{log: x, delya: 1}"),
        ["broken.yaml:7", "jobs[0].tasks[0].with.delya", "does not take 'delya'"],
    ),
    "missing required option": (
        WATCH + TASK.format(task="to_zarr", with_="{append_dim: t}"),
        ["broken.yaml:7", "jobs[0].tasks[0].with", "missing a required argument: 'store'"],
    ),
    "with gives the task's input": (
        WATCH + TASK.format(task="open_dataset", with_="{path: x.nc}"),
        ["broken.yaml:7", "jobs[0].tasks[0].with.path", "given by the pipeline"],
    ),
    "setup task option": (
        WATCH + TASK.format(task="taskbox.noop", with_="{}") + "setup:\n  - task: taskbox.pause\n"
        "    with: {secs: 1}\n",
        ["broken.yaml:10", "setup[0].with.secs", "does not take 'secs' (it takes: seconds)"],
    ),
    "undefined objectstore": (
        WATCH + TASK.format(task="to_zarr", with_="{store: s3://b/x.zarr, objectstore: nowhere}"),
        ["broken.yaml:7", "jobs[0].tasks[0].with.objectstore", "'nowhere' is not defined"],
    ),
    "bad engine": (
        WATCH + TASK.format(task="open_dataset", with_="{engine: netcdf5}"),
        ["broken.yaml:7", "jobs[0].tasks[0].with.engine", "engine must be one of"],
    ),
    "cache_dir under a file": (
        "cache_dir: {inbox}/file/state\n" + WATCH + TASK.format(task="taskbox.noop", with_="{}"),
        ["broken.yaml:1", "cache_dir", "is not a directory"],
    ),
    "unclosed bracket": (
        WATCH + '    patterns: ["*.n[c"]\n' + TASK.format(task="taskbox.noop", with_="{}"),
        ["broken.yaml:3", "watch[0].patterns[0]", "never closed"],
    ),
    "absolute pattern": (
        WATCH + '    patterns: ["/data/*.nc"]\n' + TASK.format(task="taskbox.noop", with_="{}"),
        ["broken.yaml:3", "watch[0].patterns[0]", "is absolute"],
    ),
    "pattern leaving the watch": (
        WATCH + '    patterns: ["x/../../*.nc"]\n' + TASK.format(task="taskbox.noop", with_="{}"),
        ["broken.yaml:3", "watch[0].patterns[0]", "leaves the watch's path"],
    ),
    "no patterns": (
        WATCH + "    patterns: []\n" + TASK.format(task="taskbox.noop", with_="{}"),
        ["broken.yaml:3", "watch[0].patterns", "nothing would ever be taken"],
    ),
    "missing credentials file": (
        WATCH
        + STORE.format(creds="{inbox}/../nope.json")
        + TASK.format(task="to_zarr", with_="{store: s3://b/x.zarr, objectstore: s3}"),
        ["broken.yaml:5", "objectstores.s3.credentials", "does not exist"],
    ),
    "credentials readable by others": (
        WATCH
        + STORE.format(creds="{inbox}/../open.json")
        + TASK.format(task="to_zarr", with_="{store: s3://b/x.zarr, objectstore: s3}"),
        ["broken.yaml:5", "objectstores.s3.credentials", "chmod 600"],
    ),
    "unreadable credentials": (
        WATCH
        + STORE.format(creds="{inbox}/../dir.json")
        + TASK.format(task="to_zarr", with_="{store: s3://b/x.zarr, objectstore: s3}"),
        ["broken.yaml:5", "objectstores.s3.credentials", "not a regular file"],
    ),
}


@pytest.mark.parametrize("case", list(WHAT_ONLY_THE_WORLD_TELLS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_what_would_kill_every_job_is_refused_at_validate_and_run_naming_field_and_line(
    tmp_path: Path, case: str, command: str
) -> None:
    text, expected = WHAT_ONLY_THE_WORLD_TELLS[case]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "file").write_text("a file, not a directory")
    (inbox / "a.nc").write_bytes(b"x")
    _private(tmp_path / "open.json", 0o644)
    (tmp_path / "dir.json").mkdir()
    cfg = _broken(tmp_path, text.replace("{inbox}", str(inbox)))
    proc = (cli if command == "validate" else dpypeline)(
        command, "-c", str(cfg), *(["--once"] if command == "run" else [])
    )
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr
    assert not (tmp_path / "state").exists() or command == "validate"


def test_config_is_taken_before_or_after_the_command(tmp_path: Path, good: dict) -> None:
    good["monitor"] = False
    cfg = write_config(tmp_path, good)
    (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
    assert dpypeline("-c", str(cfg), "run", timeout=60).returncode == 0
    before = json.loads(dpypeline("-c", str(cfg), "status", "--json", check=True).stdout)
    after = json.loads(dpypeline("status", "--json", "-c", str(cfg), check=True).stdout)
    assert before["done"] == after["done"] == 1
    assert before["cache_dir"] == after["cache_dir"] == str(tmp_path / "state")


def test_v_prints_the_version_and_bare_dpypeline_prints_the_help_as_a_usage_error() -> None:
    short, long = cli("-v"), cli("--version")
    assert short.returncode == long.returncode == 0
    assert short.stdout == long.stdout
    assert short.stdout.startswith("dpypeline ")
    bare = cli()
    assert bare.returncode == 2
    assert bare.stdout == ""
    assert bare.stderr.startswith("usage: dpypeline")
    for command in ("run", "status", "jobs", "retry", "enqueue"):  # the whole help
        assert f"\n    {command} " in bare.stderr


def test_jobs_prints_a_header_and_aligned_columns_and_every_table_has_json(
    tmp_path: Path, good: dict
) -> None:
    good["jobs"][0]["tasks"] = [{"task": "taskbox.behave", "with": {"log": str(tmp_path / "r")}}]
    good["retry"] = {"max_attempts": 1}
    cfg = write_config(tmp_path, good)
    (tmp_path / "inbox" / "deeper").mkdir()
    (tmp_path / "inbox" / "deeper" / "good-and-long.nc").write_bytes(b"g")
    (tmp_path / "inbox" / "bad.nc").write_bytes(b"b")
    assert dpypeline("run", "--once", "-c", str(cfg)).returncode == 3
    header, *rows = dpypeline("jobs", "-c", str(cfg), check=True).stdout.splitlines()
    assert header.split() == ["ID", "STATE", "TRIES", "JOB", "UPDATED", "FILE"]
    by_file = {row.split()[-1]: row for row in rows if row.split()[-1].startswith("/")}
    assert set(by_file) == {
        str(tmp_path / "inbox" / "bad.nc"),
        str(tmp_path / "inbox" / "deeper" / "good-and-long.nc"),
    }
    for row in by_file.values():
        for column in ("STATE", "JOB", "FILE"):  # left-aligned under their names
            at = header.index(column)
            assert row[at] != " ", (column, row)
            assert row[at - 1] == " ", (column, row)
        assert row[header.index("TRIES") + len("TRIES") - 1] == "1"  # numbers to the right
    [note] = [row for row in rows if "cannot make sense of bad.nc" in row]
    assert note.startswith(" " * header.index("STATE"))
    listed = json.loads(dpypeline("jobs", "-c", str(cfg), "--json", check=True).stdout)
    assert sorted(j["state"] for j in listed) == ["dead", "done"]
    assert json.loads(dpypeline("status", "-c", str(cfg), "--json", check=True).stdout)["dead"] == 1
    checked = json.loads(dpypeline("validate", "-c", str(cfg), "--json", check=True).stdout)
    assert (checked["ok"], checked["jobs"], checked["tasks"]) == (True, 1, 1)


# --- bounds and trust, as the operator meets them ---------------------------------------------

MEASURED = """\
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
used = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "returncode": proc.returncode,
    "stderr": proc.stderr,
    "peak_rss": used.ru_maxrss * 1024,  # KiB on Linux
    "cpu": used.ru_utime + used.ru_stime,
}))
"""


def _measured(cwd: Path, *args: str) -> dict[str, Any]:
    """Exit code, stderr, peak RSS (bytes) and CPU time (seconds) of ``dpypeline ARGS``,
    run by a process of its own that has no other child: its RUSAGE_CHILDREN is
    dpypeline's alone, where the test process's would be the largest of every child any
    earlier test started. CPU time, unlike the time on the clock, does not grow with the
    load of the machine."""
    measured = subprocess.run(
        [sys.executable, "-c", MEASURED, sys.executable, "-m", "dpypeline", *args],
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
        cwd=cwd,
        timeout=240,
        check=True,
    )
    result: dict[str, Any] = json.loads(measured.stdout)
    return result


def _aliased(levels: int, fan: int) -> str:
    """A flow list of anchors, each aliasing the one before *fan* times."""
    anchors = [f"&l0 [{', '.join(['x'] * fan)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(anchors)}]"


BOMB = _aliased(4, 20)  # 600 bytes; 20**5 = 3.2 million values once expanded


def test_an_alias_bomb_is_refused_before_expansion_quickly_in_bounded_memory(
    tmp_path: Path,
) -> None:
    (tmp_path / "inbox").mkdir()
    cfg = _broken(
        tmp_path,
        WATCH.format(inbox=tmp_path / "inbox")
        + TASK.format(task="taskbox.noop", with_="{}")
        + f"x-shared: {BOMB}\n",
    )
    run = _measured(tmp_path, "validate", "-c", str(cfg))
    assert run["peak_rss"] < 300 * 2**20, f"peak RSS {run['peak_rss'] / 2**20:.0f} MiB"
    assert run["cpu"] < 5, f"{run['cpu']:.1f} s of CPU time"
    assert run["returncode"] == 2, run["stderr"]
    assert "broken.yaml: the document is too large once its aliases are expanded" in run["stderr"]


def test_validate_names_every_task_module_it_imported_and_its_file(
    tmp_path: Path, good: dict
) -> None:
    (tmp_path / "localtasks.py").write_text("def clean(path):\n    return path\n")
    good["jobs"][0]["tasks"] += [{"task": "localtasks.clean"}, {"task": "open_dataset"}]
    good["setup"] = [{"task": "taskbox.pause", "with": {"seconds": 0}}]
    cfg = write_config(tmp_path, good)
    proc = dpypeline("validate", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    netcdf = Path(dpypeline_package.__file__).parent / "tasks" / "netcdf.py"
    modules = [line for line in proc.stdout.splitlines() if line.startswith("imported ")]
    assert modules == [
        f"imported task module taskbox from {ROOT / 'tests' / 'taskbox.py'}",
        f"imported task module localtasks from {tmp_path / 'localtasks.py'}",
        f"imported task module dpypeline.tasks.netcdf from {netcdf}",
    ]
    checked = json.loads(dpypeline("validate", "-c", str(cfg), "--json", check=True).stdout)
    assert list(checked["task_modules"]) == ["taskbox", "localtasks", "dpypeline.tasks.netcdf"]
    assert checked["task_modules"]["localtasks"] == str(tmp_path / "localtasks.py")


NOBODY = 65534  # not the user running the tests (root), and not root


def _chown_nobody(path: Path) -> None:
    os.chown(path, NOBODY, -1)


FOREIGN_WRITERS = {
    "group-writable config": ("pipeline.yaml", lambda p: p.chmod(0o664), "chmod go-w"),
    "group-writable task module": ("sharedtasks.py", lambda p: p.chmod(0o664), "chmod go-w"),
    "task module of another user": ("sharedtasks.py", _chown_nobody, "chown root"),
    "group-writable credentials": ("creds.json", lambda p: p.chmod(0o620), "chmod 600"),
    "credentials of another user": ("creds.json", _chown_nobody, "chown root"),
}


@pytest.mark.parametrize("case", list(FOREIGN_WRITERS))
def test_a_file_others_can_change_is_refused_naming_it_and_the_command_that_fixes_it(
    tmp_path: Path, good: dict, case: str
) -> None:
    name, change, fix = FOREIGN_WRITERS[case]
    (tmp_path / "sharedtasks.py").write_text("def clean(path):\n    return path\n")
    _private(tmp_path / "creds.json")
    good["jobs"][0]["tasks"].append({"task": "sharedtasks.clean"})
    good["objectstores"] = {"s3": {"credentials": str(tmp_path / "creds.json")}}
    cfg = write_config(tmp_path, good)
    assert dpypeline("validate", "-c", str(cfg)).returncode == 0
    change(tmp_path / name)
    proc = dpypeline("validate", "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / name} " in proc.stderr
    assert f"`{fix} " in proc.stderr
    assert "AKIATESTTESTTEST" not in proc.stderr
