"""Every module of the original dpypeline imports from its path here, or says what
replaced it: never a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT

ORIGINAL_SRC = ROOT.parent / "shared" / "original" / "src"
MODULES = sorted(
    ".".join(path.relative_to(ORIGINAL_SRC).with_suffix("").parts).removesuffix(".__init__")
    for path in ORIGINAL_SRC.rglob("*.py")
)


def test_the_list_is_the_original_s() -> None:
    assert "dpypeline.cli.main_cli" in MODULES
    assert "dpypeline.filesystems.object_store" in MODULES
    assert len(MODULES) > 20


@pytest.mark.parametrize("name", MODULES)
def test_each_module_of_the_original_imports_or_names_its_replacement(name: str) -> None:
    if not name.startswith("dpypeline.cli."):
        importlib.import_module(name)
        return
    with pytest.raises(ModuleNotFoundError) as raised:
        importlib.import_module(name)
    assert f"{name} was the original dpypeline's and is not in this one: " in str(raised.value)
    assert "`dpypeline " in str(raised.value)  # the command that replaced it


def test_from_import_of_the_original_command_line_names_the_replacement() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from dpypeline.cli import main_cli"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "ModuleNotFoundError: dpypeline.cli.main_cli was the original" in proc.stderr
    assert "`dpypeline -i FILE` (or `--input FILE`)" in proc.stderr
