"""The original dpypeline's tagged YAML: run as it is with ``dpypeline -i``, converted by
``dpypeline migrate``, and never a way to build objects.

The fixtures in ``tests/legacy_yaml/`` re-write the original's example 1 (GSOD station
CSVs, TEMP °F -> °C; serial, and parallel with its duplicate ``event_consumer`` key) and
an example-2-style file (``!ObjectStoreS3``, ``!Method create_bucket``). They are run as
its README says: from the example's directory, with ``CACHE_DIR`` set relative to it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import s3fs
import yaml

from conftest import ROOT, TESTS, env_for_subprocess
from dpypeline.errors import ConfigError
from dpypeline.legacy.config import read
from s3server import S3Server

FIXTURES = TESTS / "legacy_yaml"
GSOD = ROOT / "examples" / "data" / "gsod-2023"
STATIONS = sorted(GSOD.glob("*.csv"))[:5]


def _example(work: Path, name: str) -> Path:
    """The original's example directory: the YAML, its task module, and 2023/ of CSVs."""
    (work / "2023").mkdir(parents=True)
    for csv in STATIONS:
        shutil.copy(csv, work / "2023" / csv.name)
    shutil.copy(FIXTURES / "example_1_tasks.py", work)
    shutil.copy(FIXTURES / name, work)
    return work / name


def _dpypeline(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**env_for_subprocess(), "CACHE_DIR": "cache_temp"}  # as the original's README
    return subprocess.run(
        [sys.executable, "-m", "dpypeline", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _events(stderr: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def _logged(stdout: str, name: str) -> list[str]:
    """The plain log lines of event *name*: under `-i` on the original's file, the log goes
    to stdout as the original's did."""
    return [line for line in stdout.splitlines() if f" {name} " in f"{line} "]


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dpypeline: warning:")]


def _assert_converted(outputs: Path) -> None:
    """Every station file is there once, TEMP in °C, everything else as it was."""
    assert sorted(p.name for p in outputs.iterdir()) == [p.name for p in STATIONS]
    for csv in STATIONS:
        source, out = pd.read_csv(csv), pd.read_csv(outputs / csv.name)
        assert list(out.columns) == list(source.columns)
        expected = (source["TEMP"] - 32) * 5 / 9
        assert (out["TEMP"] - expected).abs().max() < 1e-9
        assert out["STATION"].equals(source["STATION"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["example_1_serial.yaml", "example_1_parallel.yaml"])
def test_original_example_1_yaml_runs_with_dash_i_and_a_rerun_repeats_nothing(
    tmp_path: Path, name: str
) -> None:
    config = _example(tmp_path, name)
    first = _dpypeline(tmp_path, "-i", config.name)
    assert first.returncode == 0, first.stderr  # monitor: false ends the run when done
    _assert_converted(tmp_path / "celsius_2023")
    assert len(_logged(first.stdout, "job_done")) == len(STATIONS)
    assert _events(first.stderr, "job_done") == []
    (warning,) = _warnings(first.stderr)
    assert f"dpypeline migrate {name} -o NEW.yaml" in warning
    assert (tmp_path / "cache_temp").is_dir()  # CACHE_DIR, relative to where it ran
    if "parallel" in name:  # the last event_consumer wins: the Dask consumer
        assert _logged(first.stdout, "cluster_ready")
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "celsius_2023").iterdir()}

    again = _dpypeline(tmp_path, "-i", config.name)
    assert again.returncode == 0, again.stderr
    assert _logged(again.stdout, "job_done") == []
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "celsius_2023").iterdir()} == written


@pytest.mark.slow
def test_migrated_example_1_validates_and_gives_the_same_result(tmp_path: Path) -> None:
    original, migrated = tmp_path / "original", tmp_path / "migrated"
    config = _example(original, "example_1_serial.yaml")
    assert _dpypeline(original, "-i", config.name).returncode == 0

    _example(migrated, "example_1_serial.yaml")
    (migrated / "conf").mkdir()
    proc = _dpypeline(migrated, "migrate", "example_1_serial.yaml", "-o", "conf/pipeline.yaml")
    assert proc.returncode == 0, proc.stderr
    text = (migrated / "conf/pipeline.yaml").read_text()
    assert "!" not in text.replace("# ", "")  # no tags left
    new = yaml.safe_load(text)
    assert new["watch"][0]["path"] == "../2023/"  # relative to the new file now
    assert [t["task"] for t in new["jobs"][0]["tasks"]] == [
        "example_1_tasks.read_csv",
        "example_1_tasks.convert_fahrenheit_to_celsius",
        "example_1_tasks.write_csv",
    ]
    assert "# the original ignored nothing here" in text  # a choice made, said where
    checked = _dpypeline(migrated, "validate", "-c", "conf/pipeline.yaml")
    assert checked.returncode == 0, checked.stderr
    run = _dpypeline(migrated, "run", "-c", "conf/pipeline.yaml")
    assert run.returncode == 0, run.stderr
    assert _warnings(run.stderr) == []
    for csv in STATIONS:
        produced = (migrated / "celsius_2023" / csv.name).read_bytes()
        assert produced == (original / "celsius_2023" / csv.name).read_bytes()


@pytest.mark.slow
def test_migrated_parallel_example_keeps_the_dask_consumer_and_says_why(tmp_path: Path) -> None:
    _example(tmp_path, "example_1_parallel.yaml")
    proc = _dpypeline(tmp_path, "migrate", "example_1_parallel.yaml", "-o", "new.yaml")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "new.yaml").read_text()
    executor = yaml.safe_load(text)["executor"]
    assert executor["kind"] == "dask"
    assert executor["cluster"]["options"] == {"n_workers": 2, "threads_per_worker": 1}
    assert "sets event_consumer twice (lines 31 and 42)" in " ".join(text.split())
    checked = _dpypeline(tmp_path, "validate", "-c", "new.yaml")
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_example_2_style_yaml_creates_the_bucket_and_uploads(tmp_path: Path, s3: S3Server) -> None:
    shutil.copy(FIXTURES / "example_2_s3.yaml", tmp_path)
    s3.credentials_file(tmp_path, "credentials.json")
    (tmp_path / "inbox/1964").mkdir(parents=True)
    (tmp_path / "inbox/1964/ORCA_1m_T.nc").write_bytes(b"first file")
    (tmp_path / "inbox/1965").mkdir(parents=True)
    (tmp_path / "inbox/1965/ORCA_1y_T.nc").write_bytes(b"second file")
    (tmp_path / "inbox/notes.txt").write_bytes(b"not a pattern match")
    # monitor: false, so what the original's start-up glob took: `**` is one level there
    (tmp_path / "inbox/ORCA_top_T.nc").write_bytes(b"not one directory down")

    proc = _dpypeline(tmp_path, "-i", "example_2_s3.yaml")
    assert proc.returncode == 0, proc.stderr
    assert len(_warnings(proc.stderr)) == 1
    fs = s3fs.S3FileSystem(**s3.storage_options())
    assert sorted(fs.find("netcdf-files-repo")) == [
        "netcdf-files-repo/n06/1964/ORCA_1m_T.nc",
        "netcdf-files-repo/n06/1965/ORCA_1y_T.nc",
    ]
    assert fs.cat("netcdf-files-repo/n06/1964/ORCA_1m_T.nc") == b"first file"

    migrated = _dpypeline(tmp_path, "migrate", "example_2_s3.yaml", "-o", "new.yaml")
    assert migrated.returncode == 0, migrated.stderr
    new = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert new["objectstores"] == {"jasmin_os": {"credentials": "credentials.json"}}
    assert new["setup"] == [
        {
            "task": "create_bucket",
            "with": {"objectstore": "jasmin_os", "bucket": "netcdf-files-repo"},
        }
    ]
    checked = _dpypeline(tmp_path, "validate", "-c", "new.yaml")
    assert checked.returncode == 0, checked.stderr


REFUSED = {
    "python_object": (
        "!!python/object/apply:subprocess.call",
        "  - !!python/object/apply:subprocess.call [[touch, MARKER]]\n",
    ),
    "unknown_tag": ("!Function", "  - !Function {function: os.system, command: touch MARKER}\n"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("command", ["-i", "migrate"])
def test_python_objects_and_unknown_tags_are_refused_with_nothing_constructed(
    tmp_path: Path, case: str, command: str
) -> None:
    config = _example(tmp_path, "example_1_serial.yaml")
    tag, entry = REFUSED[case]
    text = config.read_text() + "\nsingle_run_functions:\n" + entry
    config.write_text(text)
    line = text.count("\n")  # the entry is the last line

    proc = _dpypeline(tmp_path, command, config.name)
    assert proc.returncode == 2
    assert f"example_1_serial.yaml:{line}: {tag} is refused" in proc.stderr
    assert not (tmp_path / "MARKER").exists()  # nothing was built, nothing was called
    assert not (tmp_path / "celsius_2023").exists()  # and nothing ran


def test_the_tagged_form_is_bounded_as_the_new_form_is(tmp_path: Path) -> None:
    anchors = [f"&l0 [{', '.join(['x'] * 20)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 20)}]" for i in (1, 2, 3)]
    config = tmp_path / "old.yaml"
    col = '        col_temp: "TEMP"\n'
    text = (FIXTURES / "example_1_serial.yaml").read_text()  # 20**4 values as a !Task's argument
    config.write_text(text.replace(col, f"{col}        table: [{', '.join(anchors)}]\n"))
    with pytest.raises(ConfigError, match=r"^old.yaml: the document is too large once its alias"):
        read(config)
    config.write_text(text + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=rf"^config file {config} is larger than 1048576 bytes"):
        read(config)


def test_single_run_functions_without_an_equivalent_are_named_with_what_to_do(
    tmp_path: Path,
) -> None:
    config = tmp_path / "old.yaml"
    text = (FIXTURES / "example_2_s3.yaml").read_text()
    bucket = "    bucket: &bucket netcdf-files-repo\n"
    mapper = "  - &mapper !Method\n    instance: *jasmin_os\n    method: get_mapper\n"
    config.write_text(text.replace(bucket, bucket + mapper))
    line = text[: text.index(bucket) + len(bucket)].count("\n") + 1
    with pytest.raises(ConfigError, match=rf"old.yaml:{line}: !Method get_mapper .*docs/migrating"):
        read(config)


def test_functions_from_packages_not_shipped_keep_their_dotted_paths(tmp_path: Path) -> None:
    """The original's example 2 names tasks of dpypelinetools: they are kept as written,
    and the object store handed to a task becomes its name, with a note saying so."""
    config = tmp_path / "pipeline_serial.yaml"
    text = (FIXTURES / "example_2_s3.yaml").read_text()
    text = text.replace(
        "function: dpypeline.tasks.upload.upload_file\n        objectstore: *jasmin_os",
        "function: dpypelinetools.tasks.pipeline_tasks.write_netcdf_dataset_to_bucket\n"
        "        s3fs_instance: *jasmin_os",
    )
    config.write_text(text)
    conversion = read(config)
    (task,) = conversion.data["jobs"][0]["tasks"]
    assert task["task"] == "dpypelinetools.tasks.pipeline_tasks.write_netcdf_dataset_to_bucket"
    assert task["with"]["s3fs_instance"] == "jasmin_os"
    (note,) = conversion.notes[("jobs", 0, "tasks", 0, "with", "s3fs_instance")]
    assert "was the object store itself" in note


def test_dash_i_on_a_new_format_file_works_as_before_without_a_warning(tmp_path: Path) -> None:
    _example(tmp_path, "example_1_serial.yaml")
    new = {
        "monitor": False,
        "watch": [{"path": "2023", "patterns": ["*.csv"]}],
        "jobs": [
            {
                "name": "to-celsius",
                "tasks": [
                    {"task": "example_1_tasks.read_csv"},
                    {
                        "task": "example_1_tasks.convert_fahrenheit_to_celsius",
                        "with": {"col_temp": "TEMP"},
                    },
                    {"task": "example_1_tasks.write_csv", "with": {"prefix": "celsius_2023/"}},
                ],
            }
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(new, sort_keys=False))
    proc = _dpypeline(tmp_path, "-i", "pipeline.yaml")
    assert proc.returncode == 0, proc.stderr
    assert _warnings(proc.stderr) == []
    _assert_converted(tmp_path / "celsius_2023")
