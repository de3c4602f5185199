"""Tasks are plugins: short names are entry points of the ``dpypeline.tasks`` group, so an
installed package adds tasks a config names as it names the built-ins."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import dpypeline, env_for_subprocess, write_config
from dpypeline import cli
from dpypeline.errors import ConfigError
from dpypeline.pipeline import Task, registered_tasks, resolve_task

BUILT_IN = {"clean_dataset", "create_bucket", "open_dataset", "to_zarr", "upload_file"}


def _install(site: Path, dist: str, module: str, source: str, entry_points: str) -> None:
    """A distribution installed as pip leaves one: its package and its ``.dist-info``."""
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    importlib.invalidate_caches()
    sys.modules.pop(module, None)  # one of an earlier test's sites


TASKS_SOURCE = '''
    def scale(value, *, factor, offset=0.0, context=None):
        """Multiply by *factor*, then add *offset*."""
        return value * factor + offset
'''


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_the_built_in_tasks_are_registered_as_entry_points() -> None:
    table = registered_tasks()
    assert set(table) >= BUILT_IN
    assert {table[name].distribution for name in BUILT_IN} == {"dpypeline"}
    assert table["to_zarr"].target == "dpypeline.tasks.zarr.to_zarr:to_zarr"


def test_an_installed_package_adds_a_task_usable_by_short_name(site: Path) -> None:
    _install(
        site,
        "oceantools",
        "oceantools",
        TASKS_SOURCE,
        "[dpypeline.tasks]\nscale = oceantools:scale\n",
    )
    assert registered_tasks()["scale"].distribution == "oceantools"
    task = Task("scale", factor=3, offset=1)
    assert task(2) == 7
    assert task.name == "scale"


def test_a_config_names_an_installed_task_and_validate_imports_it(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(
        site,
        "oceantools",
        "oceantools",
        TASKS_SOURCE,
        "[dpypeline.tasks]\nscale = oceantools:scale\n",
    )
    (tmp_path / "in").mkdir()
    config = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "cache"),
            "watch": [{"path": str(tmp_path / "in"), "patterns": ["*.nc"]}],
            "jobs": [{"name": "j", "tasks": [{"task": "scale", "with": {"factor": 2}}]}],
        },
    )
    assert cli.main(["validate", "-c", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert str(site / "oceantools" / "__init__.py") in json.dumps(shown)


def test_dpypeline_tasks_lists_every_registered_task_with_its_parameters(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(
        site,
        "oceantools",
        "oceantools",
        TASKS_SOURCE,
        "[dpypeline.tasks]\nscale = oceantools:scale\n",
    )
    assert cli.main(["tasks", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert BUILT_IN | {"scale"} <= set(rows)
    assert rows["scale"]["from"] == "oceantools"
    assert rows["scale"]["summary"] == "Multiply by *factor*, then add *offset*."
    assert rows["scale"]["parameters"] == [
        {"name": "factor", "required": True},
        {"name": "offset", "default": 0.0},
    ]
    store = {p["name"]: p for p in rows["to_zarr"]["parameters"]}["store"]
    assert store == {"name": "store", "required": True}


def test_a_task_that_cannot_be_imported_is_listed_with_why(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(
        site,
        "broken",
        "brokentasks",
        "raise RuntimeError('no such library')\n",
        "[dpypeline.tasks]\nbad = brokentasks:bad\n",
    )
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "bad  (brokentasks:bad, from broken)" in out
    assert "cannot be imported: RuntimeError: no such library" in out
    assert "to_zarr  (dpypeline.tasks.zarr.to_zarr:to_zarr, from dpypeline)" in out


def test_a_short_name_two_packages_register_is_refused_naming_both(site: Path) -> None:
    _install(
        site, "first", "firsttasks", TASKS_SOURCE, "[dpypeline.tasks]\nscale = firsttasks:scale\n"
    )
    _install(
        site,
        "second",
        "secondtasks",
        TASKS_SOURCE,
        "[dpypeline.tasks]\nscale = secondtasks:scale\n",
    )
    with pytest.raises(
        ConfigError, match=r"first \(firsttasks:scale\), second \(secondtasks:scale\)"
    ):
        resolve_task("scale")
    assert resolve_task("secondtasks.scale")(1, factor=2) == 2  # the dotted path still works


def test_an_unknown_short_name_points_at_dpypeline_tasks() -> None:
    with pytest.raises(ImportError, match="`dpypeline tasks` lists the registered ones"):
        resolve_task("no_such_task")


def test_the_tasks_command_runs_as_a_program(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _install(
        site,
        "oceantools",
        "oceantools",
        TASKS_SOURCE,
        "[dpypeline.tasks]\nscale = oceantools:scale\n",
    )
    env = env_for_subprocess()
    env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}".rstrip(":")
    proc = dpypeline("tasks", env=env)
    assert "scale  (oceantools:scale, from oceantools)" in proc.stdout
    assert "with: factor  (required)" in proc.stdout
