"""Under the original's API (its Akita, its tagged YAML) the files taken are the ones the
original took: with ``monitor: false`` what its start-up glob found, with ``monitor: true``
what its watchdog handler matched.

The original's own ``DirectoryState`` and ``EventHandler`` are run from its source (with
the watchdog installed here) on the same tree; the handler's one-second wait for a stable
size is replaced (it only sleeps), and each event carries the watched path, as the
observer sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env_for_subprocess
from dpypeline.legacy.config import read
from dpypeline.legacy.watched import as_the_original_took
from dpypeline.watching.patterns import PathMatcher

ORIGINAL_SRC = ROOT.parent / "shared" / "original" / "src"
TREE = [
    "a.csv",
    "b.txt",
    "celsius/a.csv",
    "celsius/celsius/a.csv",
    "1958/ORCA0083-N06_1958m01T.nc",
    "1958/extra/ORCA0083-N06_1958m02T.nc",
    "ORCA0083-N06_1957m12T.nc",
    "sub/x.nc",
    "deep/sub/y.nc",
]
CASES = [
    (["*.csv"], None),
    (["**/ORCA*-N06_*m*T.nc"], None),
    (["**/*.nc"], {"recursive": True}),
    (["sub/*.nc"], None),
    (["*.csv", "*.nc"], None),
]

PROBE = """
import json, os, sys
from watchdog.events import FileCreatedEvent
from dpypeline.akita.directory_state import DirectoryState
from dpypeline.akita.event_handler import EventHandler

root, files, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = []
for patterns, glob_kwargs in cases:
    started = DirectoryState(root, patterns, glob_kwargs).current_state
    seen = []
    class Queue:
        def enqueue(self, event):
            seen.append(event)
    handler = EventHandler(Queue(), patterns=patterns, ignore_directories=True)
    handler.is_file_size_stable = lambda path, sleep_time=1: True
    for name in files:
        event = FileCreatedEvent(os.path.join(root, name))
        event.watch_path = root  # as its observer sets it on every event
        handler.dispatch(event)
    out.append({
        "glob": sorted(os.path.relpath(p, root) for p in started),
        "watcher": sorted(os.path.relpath(p, root) for p in seen),
    })
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, list[str]]]]:
    """What the original took of TREE, for each case: at start-up and while watching."""
    root = tmp_path_factory.mktemp("tree")
    for name in TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    cache = tmp_path_factory.mktemp("cache")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(root), json.dumps(TREE), json.dumps(CASES)],
        env={**os.environ, "PYTHONPATH": str(ORIGINAL_SRC), "CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return root, json.loads(proc.stdout)


def taken(patterns: list[str]) -> list[str]:
    matcher = PathMatcher(patterns, ignore_patterns=[])
    return sorted(name for name in TREE if matcher.matches(name))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c[0]) for c in CASES])
def test_monitor_false_takes_what_the_original_start_up_glob_took(
    original: tuple[Path, list[dict[str, list[str]]]], index: int
) -> None:
    patterns, glob_kwargs = CASES[index]
    ours = as_the_original_took(patterns, monitor=False, glob_kwargs=glob_kwargs)
    assert taken(ours) == original[1][index]["glob"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c[0]) for c in CASES])
def test_monitor_true_takes_what_the_original_watcher_took(
    original: tuple[Path, list[dict[str, list[str]]]], index: int
) -> None:
    patterns, glob_kwargs = CASES[index]
    ours = as_the_original_took(patterns, monitor=True, glob_kwargs=glob_kwargs)
    assert taken(ours) == original[1][index]["watcher"]


def test_the_tagged_file_watches_as_the_original_did_and_migrate_says_so(tmp_path: Path) -> None:
    tagged = tmp_path / "old.yaml"
    tagged.write_text(
        "akita: &akita !Akita\n  path: ./\n  patterns: '*.csv'\n  monitor: false\n"
        "jobs:\n  - &job !Job\n    name: j\n    tasks:\n      - !Task\n"
        "        function: os.path.basename\n"
        "pipeline: &pipeline !ThreadPipeline\n  jobs: [*job]\n"
        "event_consumer: !ConsumerSerial\n  akita: *akita\n  job_producer: *pipeline\n"
    )
    conversion = read(tagged)
    assert conversion.data["watch"][0]["patterns"] == ["./*.csv"]
    (note,) = conversion.notes[("watch", 0, "patterns")]
    assert "from the top of path" in note


CELSIUS_TASKS = """
import os
import pandas as pd

def read_csv(path):
    df = pd.read_csv(path)
    df.attrs["filename"] = os.path.basename(path)
    return df

def write_csv(df, prefix):
    os.makedirs(prefix, exist_ok=True)
    df.to_csv(os.path.join(prefix, df.attrs["filename"]), index=False)
"""


def test_a_job_that_rewrites_its_own_input_ends_instead_of_looping(tmp_path: Path) -> None:
    """Outputs inside the watched tree, patterns that take them (the issue's ``./`` with
    ``*.csv`` and outputs in ``./celsius/``): each input once, each output once (it is a
    file the service did not write as far as it can tell), and the output's rewrite of
    itself is set aside with a warning, so the run ends."""
    (tmp_path / "celsius_tasks.py").write_text(CELSIUS_TASKS)
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("STATION,TEMP\n1,50.0\n")
    (tmp_path / "pipeline.yaml").write_text(
        "monitor: false\nwatch:\n  - path: .\n    patterns: ['*.csv']\n    settle: 0.2s\n"
        "jobs:\n  - name: convert\n    tasks:\n      - task: celsius_tasks.read_csv\n"
        "      - task: celsius_tasks.write_csv\n        with: {prefix: celsius}\n"
        "cache_dir: cache\nlogging: {format: json}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", "run", "--once", "-c", "pipeline.yaml"],
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = sorted(os.path.relpath(e["file"], tmp_path) for e in events if e["event"] == "job_done")
    assert done == ["a.csv", "b.csv", "celsius/a.csv", "celsius/b.csv"]
    aside = [e for e in events if e["event"] == "own_write_not_taken"]
    assert sorted(os.path.basename(e["file"]) for e in aside) == ["a.csv", "b.csv"]
    assert "touch the file" in aside[0]["reason"]


def test_validate_warns_of_an_output_the_watch_would_take(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "watch:\n  - path: in\n"
        "jobs:\n  - name: z\n    tasks:\n      - task: open_dataset\n"
        "      - task: to_zarr\n        with: {store: in/out.zarr, append_dim: time}\n"
        "cache_dir: cache\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", "validate", "-c", str(config)],
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (warning,) = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert "jobs[0].tasks[1].with.store" in warning
    assert "out.zarr is inside watch[0]" in warning
    assert "ignore_patterns" in warning

    config.write_text(
        config.read_text().replace("  - path: in\n", "  - path: in\n    patterns: ['*.nc']\n")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", "validate", "-c", str(config)],
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning:" not in proc.stdout  # *.nc takes nothing a Zarr store writes
