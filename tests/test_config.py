"""The pipeline file: what it accepts, and errors that name the file, line and field."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from dpypeline.config.durations import parse_duration
from dpypeline.config.model import (
    ClusterConfig,
    PipelineConfig,
    TaskConfig,
    config_from_dict,
    load_config,
)
from dpypeline.errors import ConfigError

# The example of SPEC section 4, with the watch directory filled in per test.
SPEC_EXAMPLE = """\
name: nemo-ingest                 # default: the config file's stem
cache_dir: /var/lib/dpypeline     # default: $CACHE_DIR, else ./.dpypeline next to the config
monitor: true                     # false: process what is there, then exit

watch:
  - path: {watch}
    patterns: ["**/ORCA*-N06_*m*T.nc"]   # globs relative to path; ** crosses directories
    ignore_patterns: ["*.tmp", ".*"]
    case_sensitive: true
    mode: auto                    # auto | inotify | poll
    poll_interval: 30s
    settle: 2s                    # unchanged this long after close/rename before it is taken
    rescan_interval: 10m          # safety-net full scan; 0 disables

executor:
  kind: serial                    # serial | dask
  # dask only:
  address: null                   # existing scheduler, e.g. tcp://10.0.0.5:8786
  cluster:                        # or start one (default dask.distributed.LocalCluster)
    class: dask_jobqueue.SLURMCluster
    options: {{cores: 8, memory: 64GB, queue: par-single, walltime: "04:00:00"}}
    scale: {{jobs: 4}}
  workers_per_event: 1

retry:
  max_attempts: 5
  backoff: {{initial: 10s, factor: 2, max: 10m}}
  job_timeout: 2h

objectstores:                     # named S3 endpoints
  jasmin:
    credentials: ${{CREDENTIALS_DIRECTORY}}/s3.json

setup:                            # run once at start, before any job (e.g. make the bucket)
  - task: create_bucket
    with: {{objectstore: jasmin, bucket: nemo-n06}}

jobs:                             # every stable file runs every job
  - name: to-object-store
    tasks:
      - task: open_dataset        # a built-in name, or a dotted path: mypkg.tasks.fix_units
        with: {{chunks: {{time_counter: 1}}}}
      - task: clean_dataset
        with: {{missing_value: 1.0e20}}
      - task: to_zarr
        with: {{objectstore: jasmin, store: s3://nemo-n06/n06_T.zarr, append_dim: time_counter}}

logging: {{format: auto, level: info}}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(watch: Path, extra: str = "") -> str:
    jobs = "jobs:\n  - name: a\n    tasks:\n      - task: open_dataset\n"
    return f"watch:\n  - path: {watch}\n{jobs}{extra}"


def load_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def test_spec_example_parses_into_typed_values(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE.format(watch=inbox))
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": "/run/credentials/x"})

    assert config.name == "nemo-ingest"
    assert config.cache_dir == Path("/var/lib/dpypeline")
    assert config.source == path
    (watch,) = config.watch
    assert watch.path == inbox
    assert watch.patterns == ["**/ORCA*-N06_*m*T.nc"]
    assert (watch.poll_interval, watch.settle, watch.rescan_interval) == (30.0, 2.0, 600.0)
    assert config.executor.cluster == ClusterConfig.model_validate(
        {
            "class": "dask_jobqueue.SLURMCluster",
            "options": {
                "cores": 8,
                "memory": "64GB",
                "queue": "par-single",
                "walltime": "04:00:00",
            },
            "scale": {"jobs": 4},
        }
    )
    assert config.retry.backoff.max == 600.0
    assert config.retry.job_timeout == 7200.0
    assert config.objectstores["jasmin"].credentials == Path("/run/credentials/x/s3.json")
    assert config.setup == [
        TaskConfig(task="create_bucket", with_={"objectstore": "jasmin", "bucket": "nemo-n06"})
    ]
    tasks = config.jobs[0].tasks
    assert [t.task for t in tasks] == ["open_dataset", "clean_dataset", "to_zarr"]
    assert tasks[0].with_ == {"chunks": {"time_counter": 1}}
    assert tasks[1].with_ == {"missing_value": 1.0e20}
    assert (config.logging.format, config.logging.level) == ("auto", "info")


def test_defaults_name_from_stem_and_cache_dir_next_to_config(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox), name="nemo.yaml")
    config = load_config(path, environ={})

    assert config.name == "nemo"
    assert config.cache_dir == tmp_path / ".dpypeline"
    assert config.monitor is True
    assert config.retention == 30 * 86400
    assert config.executor.kind == "serial"
    assert config.retry.max_attempts == 5
    assert config.watch[0].ignore_patterns == [".*", "*.tmp", "*.part"]


def test_cache_dir_comes_from_environment_when_not_in_file(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox))
    assert load_config(path, environ={"CACHE_DIR": "/srv/state"}).cache_dir == Path("/srv/state")
    assert load_config(path, environ={"CACHE_DIR": ""}).cache_dir == tmp_path / ".dpypeline"


def test_relative_paths_are_relative_to_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "conf" / "in").mkdir(parents=True)
    path = write(tmp_path, minimal(Path("in"), "cache_dir: state\n"), name="conf/p.yaml")
    config = load_config(path, environ={})
    assert config.watch[0].path == tmp_path / "conf" / "in"
    assert config.cache_dir == tmp_path / "conf" / "state"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2), ("10m", 600), ("2h", 7200), ("1d", 86400), ("0", 0),
     ("1.5", 1.5), (" 3 s ", 3), (0, 0), (1.5, 1.5), (45, 45)],
)  # fmt: skip
def test_durations_accept_units_and_plain_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "", "2x", "-1s", "1h30m", "s", "nan", True, -3])
def test_durations_reject_anything_else_with_the_accepted_forms(text: object) -> None:
    with pytest.raises(ValueError, match=r"not a duration: .*500ms, 2s, 10m, 2h"):
        parse_duration(text)  # type: ignore[arg-type]


def test_zero_job_timeout_means_none(tmp_path: Path, inbox: Path) -> None:
    for value in ("0", "null"):
        path = write(tmp_path, minimal(inbox, f"retry: {{job_timeout: {value}}}\n"))
        assert load_config(path, environ={}).retry.job_timeout is None


def test_log_level_accepts_upper_case(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox, "logging: {level: WARNING}\n"))
    assert load_config(path, environ={}).logging.level == "warning"


def test_unknown_top_level_key_names_file_line_and_allowed_keys(
    tmp_path: Path, inbox: Path
) -> None:
    path = write(tmp_path, "monitr: false\n" + minimal(inbox))
    message = load_error(path, environ={})
    assert message.startswith("pipeline.yaml:1: monitr: unknown key (allowed: name, cache_dir,")
    assert "source" not in message


def test_unknown_nested_key_names_line_and_dotted_path(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox) + "        retries: 3\n")
    assert load_error(path, environ={}) == (
        "pipeline.yaml:7: jobs[0].tasks[0].retries: unknown key (allowed: task, with)"
    )


def test_source_is_not_a_yaml_key(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox, "source: /etc/x.yaml\n"))
    assert load_error(path, environ={}).startswith("pipeline.yaml:7: source: unknown key")


def test_bad_duration_names_line_field_and_accepted_forms(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox).replace("\njobs", "\n    settle: 5 minutes\njobs"))
    assert load_error(path, environ={}) == (
        "pipeline.yaml:3: watch[0].settle: "
        "not a duration: '5 minutes' (use e.g. 500ms, 2s, 10m, 2h)"
    )


def test_missing_watch_directory_names_line_and_field(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    path = write(tmp_path, minimal(missing))
    assert load_error(path, environ={}) == (
        f"pipeline.yaml:2: watch[0].path: watch directory does not exist: {missing} "
        "(create it or fix watch[0].path)"
    )


def test_watch_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path / "pipeline.yaml"))
    assert "watch[0].path: watch path is not a directory" in load_error(path, environ={})


def test_duplicate_yaml_key_is_an_error_with_both_lines(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox) + "jobs: []\n")
    assert load_error(path, environ={}) == (
        "pipeline.yaml:7: invalid YAML: duplicate key 'jobs' (first on line 3)"
    )


def test_duplicate_key_in_flow_mapping_is_an_error(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox, "retry: {max_attempts: 2, max_attempts: 3}\n"))
    assert "duplicate key 'max_attempts'" in load_error(path, environ={})


def test_merge_keys_may_be_overridden(tmp_path: Path, inbox: Path) -> None:
    text = minimal(
        inbox, "executor: {<<: {kind: serial, workers_per_event: 2}, workers_per_event: 3}\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    assert config.executor.workers_per_event == 3


def test_duplicate_job_names_point_at_the_second_one(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox) + "  - name: a\n    tasks: [{task: to_zarr}]\n")
    assert load_error(path, environ={}).startswith(
        "pipeline.yaml:7: jobs[1].name: duplicate job name 'a' (also jobs[0].name)"
    )


def test_environment_variables_expand_with_defaults_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    text = minimal(
        Path("${ROOT}/in"),
        "name: ${NAME:-fallback}\nsetup:\n  - task: x\n"
        '    with: {cost: $$5, n: "${N}", e: "${E:-}"}\n',
    )
    config = load_config(write(tmp_path, text), environ={"ROOT": str(tmp_path), "N": "7"})
    assert config.watch[0].path == tmp_path / "in"
    assert config.name == "fallback"
    assert config.setup[0].with_ == {"cost": "$5", "n": "7", "e": ""}


def test_unset_variable_names_variable_field_and_line(tmp_path: Path, inbox: Path) -> None:
    path = write(
        tmp_path, minimal(inbox, "objectstores:\n  s3:\n    credentials: ${CREDS}/s.json\n")
    )
    message = load_error(path, environ={})
    assert message.startswith(
        "pipeline.yaml:9: objectstores.s3.credentials: environment variable CREDS is not set"
    )


def test_python_object_tags_are_refused_and_never_run(tmp_path: Path, inbox: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    message = load_error(path, environ={})
    assert message.startswith("pipeline.yaml:1: invalid YAML:")
    assert "python/object/apply:os.system" in message
    assert not marker.exists()


def test_all_validation_errors_are_reported_together(tmp_path: Path, inbox: Path) -> None:
    text = (
        f"watch:\n  - path: {inbox}\n    mode: fast\n    poll_interval: soon\n"
        "retry: {max_attempts: 0}\njobs:\n  - name: 'bad name'\n    tasks: []\n"
    )
    lines = load_error(write(tmp_path, text), environ={}).splitlines()
    assert [line.split(": ")[0:2] for line in lines] == [
        ["pipeline.yaml:3", "watch[0].mode"],
        ["pipeline.yaml:4", "watch[0].poll_interval"],
        ["pipeline.yaml:5", "retry.max_attempts"],
        ["pipeline.yaml:7", "jobs[0].name"],
        ["pipeline.yaml:8", "jobs[0].tasks"],
    ]


def test_missing_required_key_points_at_its_parent(tmp_path: Path, inbox: Path) -> None:
    path = write(
        tmp_path, minimal(inbox).replace("      - task: open_dataset\n", "      - with: {}\n")
    )
    assert load_error(path, environ={}) == (
        "pipeline.yaml:6: jobs[0].tasks[0].task: required key is missing"
    )


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nwatch: [\njobs: : :\n")
    assert load_error(path).startswith("pipeline.yaml:3: invalid YAML: ")


def test_empty_or_non_mapping_file_is_a_clear_error(tmp_path: Path) -> None:
    assert "pipeline.yaml: the file is empty" in load_error(write(tmp_path, "# nothing\n"))
    assert "must be a mapping" in load_error(write(tmp_path, "- a\n- b\n"))


def test_missing_file_says_how_to_name_one(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.yaml") == (
        f"config file not found: {tmp_path / 'nope.yaml'} (pass -c FILE or set DPYPELINE_CONFIG)"
    )


def test_line_of_and_where_on_a_nested_task(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE.format(watch=inbox))
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": "/run/c"})

    assert config.line_of("jobs", 0, "tasks", 1, "task") == 43
    assert config.line_of("jobs", 0, "tasks", 1) == 43
    assert config.line_of("jobs", 0, "tasks", 1, "with") == 44
    assert config.line_of("jobs", 0, "tasks", 1, "with_", "missing_value") == 44
    assert config.line_of("jobs", 0, "tasks", 1, "with", "not-there") == 44
    assert config.line_of("executor", "cluster", "class_") == 20
    assert config.line_of() == 1
    assert config.where("jobs", 0, "tasks", 1, "task") == "pipeline.yaml:43: jobs[0].tasks[1].task"


def test_config_from_dict_has_no_lines(tmp_path: Path, inbox: Path) -> None:
    config = config_from_dict(
        {"watch": [{"path": "inbox"}], "jobs": [{"name": "j", "tasks": [{"task": "m.f"}]}]},
        base_dir=tmp_path,
        environ={},
    )
    assert isinstance(config, PipelineConfig)
    assert config.watch[0].path == inbox
    assert config.source is None
    assert config.line_of("jobs", 0, "tasks", 0, "task") is None
    assert config.where("jobs", 0, "tasks", 0, "task") == "jobs[0].tasks[0].task"
    with pytest.raises(ConfigError, match=r"^jobs\[0\]\.tasks: List should have at least 1 item"):
        config_from_dict({"watch": [{"path": "."}], "jobs": [{"name": "j", "tasks": []}]})
    with pytest.raises(ConfigError, match=r"^the config must be a mapping of keys"):
        config_from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_cluster_scale_is_a_fixed_size_or_adaptive_bounds(tmp_path: Path, inbox: Path) -> None:
    ok = write(tmp_path, minimal(inbox) + "executor: {kind: dask, cluster: {scale: {jobs: 4}}}\n")
    cluster = load_config(ok, environ={}).executor.cluster
    assert cluster is not None
    assert cluster.scale == {"jobs": 4}
    path = write(
        tmp_path, minimal(inbox) + "executor:\n  cluster: {scale: {jobs: 2, maximum: 4}}\n"
    )
    assert load_error(path, environ={}) == (
        "pipeline.yaml:8: executor.cluster.scale: give either a fixed size or adaptive bounds,"
        " not both"
    )
    path = write(tmp_path, minimal(inbox) + "executor:\n  cluster: {scale: {nodes: 2}}\n")
    assert "executor.cluster.scale: unknown key nodes (fixed size: jobs" in load_error(
        path, environ={}
    )


def test_task_modules_next_to_the_config_import_in_the_service_and_on_workers_alike(
    tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from dpypeline.config.taskpath import task_dirs
    from dpypeline.executors.dask import TaskPath
    from dpypeline.pipeline import import_tasks

    monkeypatch.setattr(sys, "path", list(sys.path))
    home = tmp_path / "deploy"
    home.mkdir()
    (home / "nexttoconfig.py").write_text("def clean(path):\n    return path\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the service runs is not where tasks are
    path = home / "pipeline.yaml"
    path.write_text(
        f"watch: [{{path: {inbox}}}]\njobs: [{{name: j, tasks: [{{task: nexttoconfig.clean}}]}}]\n"
    )
    config = load_config(path)
    assert task_dirs(config) == [str(home)]
    [job], _ = import_tasks(config)
    assert job.tasks[0].name == "nexttoconfig.clean"
    import_tasks(config)
    worker = TaskPath(task_dirs(config))  # what the service hands each Dask worker
    worker.setup(None)
    worker.setup(None)  # a restarted worker
    assert sys.path[0] == str(home)
    assert sys.path.count(str(home)) == 1
    in_code = {"watch": [{"path": str(inbox)}], "jobs": [{"name": "j", "tasks": [{"task": "x"}]}]}
    assert task_dirs(config_from_dict(in_code)) == []


# --- bounds: what a few hundred bytes may make the loader build ------------------------------


def aliased(levels: int, fan: int) -> str:
    """A flow list of anchors, each aliasing the one before *fan* times: a few hundred
    bytes that expand to more than ``fan ** (levels + 1)`` values."""
    anchors = [f"&l0 [{', '.join(['x'] * fan)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(anchors)}]"


def with_value(inbox: Path, value: str) -> str:
    """A valid config whose one task is given *value* (load_config does not check it)."""
    return (
        f"watch: [{{path: {inbox}}}]\njobs:\n  - name: a\n    tasks:\n"
        f"      - task: open_dataset\n        with: {{table: {value}}}\n"
    )


def test_aliases_that_expand_past_the_value_budget_are_refused_before_expansion(
    tmp_path: Path, inbox: Path
) -> None:
    text = with_value(inbox, aliased(3, 20))  # 20**4 = 160000 values from 500 bytes
    assert len(text) < 1000
    message = load_error(write(tmp_path, text))
    assert message.startswith("pipeline.yaml: the document is too large once its aliases")
    assert "more than 100000 values or 8388608 characters" in message
    assert "write out what the aliases repeat" in message
    within = load_config(write(tmp_path, with_value(inbox, aliased(2, 20)), "within.yaml"))
    assert len(within.jobs[0].tasks[0].with_["table"][2]) == 20  # 8000 values: fine


def test_a_long_string_repeated_by_aliases_is_refused_by_its_characters(
    tmp_path: Path, inbox: Path
) -> None:
    long = "${HOME}" + "x" * 100_000  # a variable: each expanded copy is a new string
    aliases = ", ".join(["*s"] * 100)
    text = with_value(inbox, f'[&s "{long}", [{aliases}]]')
    message = load_error(write(tmp_path, text))
    assert message.startswith("pipeline.yaml: the document is too large once its aliases")


def test_an_anchor_that_contains_its_own_alias_is_named_by_its_line(
    tmp_path: Path, inbox: Path
) -> None:
    text = minimal(inbox, "x:\n  - &loop [1, *loop]\n")
    message = load_error(write(tmp_path, text))
    assert message == (
        "pipeline.yaml:8: this anchor contains an alias of itself, which would repeat"
        " without end: remove that alias"
    )


def test_a_config_file_over_one_mib_is_refused_before_it_is_read(
    tmp_path: Path, inbox: Path
) -> None:
    path = write(tmp_path, minimal(inbox) + "# " + "x" * (1 << 20) + "\n")
    message = load_error(path)
    assert message.startswith(f"config file {path} is larger than 1048576 bytes")
    assert "check that -c (or DPYPELINE_CONFIG) names the config file" in message


def test_nesting_too_deep_for_the_parser_is_a_config_error(tmp_path: Path, inbox: Path) -> None:
    path = write(tmp_path, minimal(inbox, "x: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert load_error(path) == "pipeline.yaml: nested too deeply to be a pipeline's config"


# --- trust: who may change what the service runs --------------------------------------------

NOBODY = 65534  # a user other than the one running the tests, who is root


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.chmod(0o664), ["can be written by its group (mode 0664)", "chmod go-w"]),
        (lambda p: p.chmod(0o646), ["can be written by others (mode 0646)", "chmod go-w"]),
        (lambda p: os.chown(p, NOBODY, -1), ["belongs to nobody, not to", "`chown root "]),
    ],
    ids=["group-writable", "world-writable", "another user's"],
)
def test_a_config_that_others_can_change_is_refused_with_the_command_that_fixes_it(
    tmp_path: Path, inbox: Path, change: Callable[[Path], None], expected: list[str]
) -> None:
    path = write(tmp_path, minimal(inbox))
    change(path)
    message = load_error(path)
    assert message.startswith(f"config file {path} ")
    assert "runs as the service's user" in message
    for fragment in expected:
        assert fragment in message
    assert message.endswith(f" {path}`")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.chmod(0o664), "can be written by its group (mode 0664)"),
        (lambda p: os.chown(p, NOBODY, -1), "belongs to nobody"),
    ],
    ids=["group-writable", "another user's"],
)
def test_a_task_module_that_others_can_change_is_refused_before_it_runs(
    tmp_path: Path,
    inbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Path], None],
    expected: str,
) -> None:
    from dpypeline.pipeline import import_tasks

    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"shared_{uuid.uuid4().hex}"  # a module no earlier test imported
    marker = tmp_path / "imported"
    module = tmp_path / f"{name}.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\ndef clean(path):\n    return path\n")
    change(module)
    path = write(tmp_path, minimal(inbox).replace("open_dataset", f"{name}.clean"))
    with pytest.raises(ConfigError) as info:
        import_tasks(load_config(path))
    assert str(info.value).startswith(
        f"pipeline.yaml:6: jobs[0].tasks[0].task: cannot import task: task module {module} "
    )
    assert expected in str(info.value)
    assert not marker.exists()  # refused before a line of it ran
    assert name not in sys.modules


@pytest.mark.parametrize("task", ["os.system", "subprocess.run", "posix.system", "eval"])
def test_standard_functions_that_run_a_file_name_as_a_command_are_refused_as_tasks(
    tmp_path: Path, inbox: Path, task: str
) -> None:
    from dpypeline.pipeline import import_tasks

    task = "builtins.eval" if task == "eval" else task
    path = write(tmp_path, minimal(inbox).replace("open_dataset", task))
    with pytest.raises(ConfigError) as info:
        import_tasks(load_config(path))
    assert str(info.value) == (
        f"pipeline.yaml:6: jobs[0].tasks[0].task: cannot import task: '{task}' runs its"
        " argument as a command, a program or Python code, and a task's first argument is"
        " the name of the file that arrived: file names would run as code. Write a task"
        " function that builds the command itself (a list of arguments, no shell) and name"
        " that function instead"
    )


def test_merge_keys_that_double_at_each_level_are_refused_before_they_are_merged(
    tmp_path: Path, inbox: Path
) -> None:
    levels = ["  m0: &m0 {a: 1}"]
    levels += [f"  m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, 18)]
    path = write(tmp_path, minimal(inbox, "x:\n" + "\n".join(levels) + "\n"))
    message = load_error(path)
    assert message.startswith("pipeline.yaml: the document is too large once its aliases")


def test_a_cluster_class_from_a_module_others_can_change_is_refused_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpypeline.executors.cluster import cluster_class

    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"sharedcluster_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    module = tmp_path / f"{name}.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\nclass Cluster:\n    pass\n")
    module.chmod(0o664)
    with pytest.raises(ConfigError) as info:
        cluster_class(f"{name}.Cluster")
    assert str(info.value).startswith(
        f"executor.cluster.class: cannot import '{name}.Cluster': module of the cluster class"
        f" {module} can be written by its group (mode 0664)"
    )
    assert not marker.exists()
