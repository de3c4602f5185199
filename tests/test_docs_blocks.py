"""Every Python and shell block of README.md and docs/*.md runs as written, as a reader
would run it: from the repository root (a temporary copy of ``examples/``), with the
package installed and nothing else on the path.

A block that is not to be run here says so in an HTML comment on the line before its
fence (invisible on the rendered page):

- ``<!-- not run: REASON -->``: an illustration, a fragment, or a command this suite
  cannot run as it is (the suite itself, root, minutes of benchmarks);
- ``<!-- tested: tests/test_x.py::test_name ... -->``: another test runs what the block
  does; the named tests must exist.

Blocks in other languages (YAML, plain text) are not code that runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

RUN_LANGUAGES = {"python", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*(not run|tested):\s*(.*?)\s*-->$")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mark: str  # "", "not run" or "tested"
    note: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file in a language that runs, with the marker on
    the nearest non-blank line above each."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{doc.name}:{i + 1}: a fenced block is never closed"
        if opening.group(1) in RUN_LANGUAGES:
            above = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            mark = MARK.match(above)
            found.append(
                Block(
                    doc,
                    i + 1,
                    opening.group(1),
                    "\n".join(lines[i + 1 : end]) + "\n",
                    mark.group(1) if mark else "",
                    mark.group(2) if mark else "",
                )
            )
        i = end + 1
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
TO_RUN = [b for b in ALL if not b.mark]


def _repository_copy(tmp_path: Path) -> Path:
    """The repository root as the README's set-up leaves it: its examples, the package
    installed (on PYTHONPATH here) and nothing else importable."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", root / "examples")
    return root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_DIR", "DPYPELINE_CONFIG")}
    env["PYTHONPATH"] = str(ROOT / "src")  # the editable install's path, and only it
    return env


def run_block(block: Block, root: Path) -> subprocess.CompletedProcess[str]:
    if block.language == "python":
        (root / "block.py").write_text(block.code)
        command = [sys.executable, "block.py"]
    else:  # each line as typed at a prompt: stop at the first that fails
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    return subprocess.run(
        command, check=False, cwd=root, env=_env(), capture_output=True, text=True, timeout=120
    )


def test_the_docs_have_blocks_that_run_and_every_other_one_says_why() -> None:
    assert TO_RUN, "no runnable block found: the parser no longer sees the docs' blocks"
    for block in ALL:
        assert block.mark == "" or block.note, f"{block.where}: `{block.mark}:` needs a reason"


@pytest.mark.parametrize("block", [b for b in ALL if b.mark == "tested"], ids=lambda b: b.where)
def test_a_block_run_elsewhere_names_tests_that_exist(block: Block) -> None:
    for name in block.note.split():
        path, _, test = name.partition("::")
        assert (ROOT / path).is_file(), f"{block.where}: no {path}"
        assert re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(), re.M), (
            f"{block.where}: {path} has no {test}"
        )


@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: b.where)
def test_the_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    proc = run_block(block, _repository_copy(tmp_path))
    assert proc.returncode == 0, f"{block.where} exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{block.where}:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_readme_python_api_block_converts_every_station_file_and_only_those(
    tmp_path: Path,
) -> None:
    (block,) = [b for b in TO_RUN if b.doc.name == "README.md" and b.language == "python"]
    root = _repository_copy(tmp_path)
    proc = run_block(block, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    station_files = sorted(p.name for p in (root / "examples/data/gsod-2023").glob("*.csv"))
    assert sorted(p.name for p in (root / "output/gsod-celsius").iterdir()) == station_files
    assert "LICENCE" not in proc.stderr  # the example data's licence file is not a job
    assert '"job_dead"' not in proc.stderr

    again = run_block(block, root)  # the ledger in cache_dir: nothing is repeated
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"job_started"' not in again.stderr
