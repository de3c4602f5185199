"""What an operator meets first: where commands look for the config, what the install
scripts print, and the recipes of OPERATING.md, each run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, dpypeline, env_for_subprocess, write_config

OPERATING = (ROOT / "deploy" / "OPERATING.md").read_text()


def _config(tmp_path: Path) -> dict:
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


def test_commands_without_c_find_the_config_where_the_user_installer_writes_it(
    tmp_path: Path,
) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "dpypeline").mkdir(parents=True)
    write_config(xdg / "dpypeline", _config(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def status_here() -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "dpypeline", "status", "--json"],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            env={**env_for_subprocess(), "XDG_CONFIG_HOME": str(xdg)},
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert status_here()["queued"] == 0
    # a pipeline.yaml in the current directory still comes first
    local = _config(tmp_path / "elsewhere")
    local["cache_dir"] = str(tmp_path / "local-state")
    write_config(elsewhere, local)
    assert status_here()["cache_dir"] == str(tmp_path / "local-state")


def test_jobs_says_when_its_list_is_cut_and_limit_0_lists_all(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, _config(tmp_path))
    for name in ("a.dat", "b.dat", "c.dat"):
        (tmp_path / "inbox" / name).write_bytes(b"x")
    assert dpypeline("run", "--once", "-c", str(cfg)).returncode == 0
    cut = dpypeline("jobs", "--limit", "2", "-c", str(cfg), check=True)
    assert len(cut.stdout.splitlines()) == 1 + 2
    assert "only the newest 2 shown" in cut.stderr
    every = dpypeline("jobs", "--limit", "0", "--json", "-c", str(cfg), check=True)
    assert len(json.loads(every.stdout)) == 3
    assert every.stderr == ""
    exact = dpypeline("jobs", "--limit", "3", "-c", str(cfg), check=True)
    assert len(exact.stdout.splitlines()) == 1 + 3
    assert exact.stderr == ""


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_install_scripts_help_prints_the_header_and_no_code(script: str) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, "no help printed"
    assert not [line for line in lines if "set -e" in line or line.startswith("#")], lines
    assert "--user" in proc.stdout


def test_the_user_unit_points_at_the_guide_where_the_user_installer_puts_it() -> None:
    unit = (ROOT / "systemd" / "user" / "dpypeline.service").read_text()
    [documentation] = re.findall(r"^Documentation=file:%h/(\S+)$", unit, re.MULTILINE)
    installer = (ROOT / "deploy" / "install.sh").read_text()
    # the user mode's venv under ~/.local/share, and where the guide goes inside it
    [venv] = re.findall(r"venv=\$\{XDG_DATA_HOME:-\$HOME/\.local/share\}/(\S+)", installer)
    [guide] = re.findall(r'install -m 0644 "\$here/OPERATING.md" "\$venv/(\S+)"', installer)
    assert documentation == f".local/share/{venv}/{guide}"


def test_the_journal_recipe_for_scripts_prints_only_file_names() -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed, so the recipe cannot be run")
    [recipe] = [line for line in OPERATING.splitlines() if "| jq" in line and "scripts" in line]
    jq_args = recipe.split("| jq", 1)[1].split("#", 1)[0].strip()
    entries = [
        {"MESSAGE": "service_ready", "DPYPELINE_EVENT": "service_ready"},
        {"MESSAGE": "job_done", "DPYPELINE_FILE": "/data/in/a_grid_T.nc"},
    ]
    proc = subprocess.run(
        f"jq {jq_args}",
        input="\n".join(json.dumps(e) for e in entries) + "\n",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert proc.stdout.splitlines() == ["/data/in/a_grid_T.nc"]


def test_a_per_pipeline_config_made_as_the_guide_says_has_its_own_name(tmp_path: Path) -> None:
    skeleton = (ROOT / "deploy" / "pipeline.yaml.in").read_text().replace("@NAME@", "dpypeline")
    [sed] = re.findall(r"sudo sed ('[^']+')", OPERATING)
    proc = subprocess.run(
        f"sed {sed}", input=skeleton, shell=True, capture_output=True, text=True, check=True
    )
    assert re.search(r"^name: nemo-u$", proc.stdout, re.MULTILINE)
