"""The original's tagged files: run as they are (``dpypeline -i OLD.yaml``), or written in
the new form once (``dpypeline migrate OLD.yaml [-o NEW.yaml]``).

The conversion is :mod:`dpypeline.legacy.config`'s; this module writes it out as YAML with
a comment wherever a choice was made, so the operator can review every one of them.
Paths that were relative to the working directory are rewritten relative to the new
file, which is where the new form reads them from.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from dpypeline.config.model import (
    Loc,
    PipelineConfig,
    check_watch_paths,
    config_from_dict,
    load_config,
)
from dpypeline.legacy import cache_state
from dpypeline.legacy.config import Conversion, read
from dpypeline.legacy.yaml_tags import is_tagged

HOW_TO_CONVERT = "dpypeline migrate {old} -o NEW.yaml"

_FLOW_KEYS = {"with", "patterns", "ignore_patterns", "scale", "options"}
_FLOW_WIDTH = 72
_COMMENT_WIDTH = 92


def load(path: str | os.PathLike[str]) -> tuple[PipelineConfig, dict[Loc, str]]:
    """The original's file as a validated config, paths relative to the working directory,
    and where its tasks were given an object store itself (see :mod:`.objects`)."""
    conversion = read(path)
    config = config_from_dict(
        conversion.data,
        base_dir=Path.cwd(),
        source=Path(os.path.abspath(path)),
        lines=conversion.lines,
    )
    check_watch_paths(config)
    return config, conversion.objects


def load_any(path: str) -> tuple[PipelineConfig, str | None, dict[Loc, str]]:
    """``dpypeline -i``: either form. For the original's, also the one warning to give and
    the task arguments that were object stores."""
    if not is_tagged(path):
        return load_config(path), None, {}
    warning = (
        f"{path} is in the original dpypeline's tagged form: it runs as it is, but convert"
        f" it once with `{HOW_TO_CONVERT.format(old=path)}` and run `dpypeline run -c"
        " NEW.yaml` (the choices made are written there as comments; see docs/migrating.md)"
    )
    config, objects = load(path)
    return config, warning, objects


def migrate(old: str, new: str | None) -> int:
    """Write the new form of *old* to *new* (stdout when None); exit code 0."""
    target_dir = Path(new).resolve().parent if new else Path.cwd()
    cwd = Path.cwd()

    def rebase(path: str) -> str:
        if os.path.isabs(os.path.expanduser(path)):
            return path
        moved = os.path.relpath(cwd / path, target_dir)
        return moved + "/" if path.endswith("/") and not moved.endswith("/") else moved

    # converting runs nothing: the new file is what will run, and validate checks it
    conversion = read(old, rebase=rebase if target_dir != cwd else None, check_writers=False)
    text = render(conversion, Path(old).name)
    if new is None:
        sys.stdout.write(text)
        _carry_state(config_from_dict(conversion.data, base_dir=cwd))
        return 0
    try:
        Path(new).write_text(text)
    except OSError as exc:
        print(f"dpypeline: cannot write {new}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    else:
        print(f"wrote {new}: check it with `dpypeline validate -c {new}`", file=sys.stderr)
    _carry_state(load_config(new))
    return 0


def _carry_state(config: PipelineConfig) -> None:
    """The original's state in ``$CACHE_DIR`` (its finished and queued files) into the
    ledger the new file uses, so that running it repeats nothing the original did."""
    cache = os.environ.get("CACHE_DIR")
    if not cache:
        return
    source = Path(cache).absolute()
    carried = cache_state.carry_over(config, source)
    if carried is not None:
        print(f"dpypeline: {carried.summary(source)}", file=sys.stderr)


def render(conversion: Conversion, old_name: str) -> str:
    """The config as block YAML, each note as a comment above the key it is about."""
    writer = _Writer(conversion.notes)
    writer.out += [
        f"# Converted by `dpypeline migrate` from {old_name}, the original dpypeline's tagged",
        "# form. Comments mark where a choice was made. Run: dpypeline run -c THIS_FILE",
        "# State (the ledger of done files) lives in cache_dir: not set here, so $CACHE_DIR",
        "# when set, as in the original, else .dpypeline next to this file.",
    ]
    writer.comments((), 0)
    writer.mapping(conversion.data, (), 0)
    return "\n".join(writer.out) + "\n"


class _Writer:
    """Block YAML, line by line, with the notes as comments; short lists and task
    arguments in flow style (``with: {col_temp: TEMP}``), as the README writes them."""

    def __init__(self, notes: dict[Loc, list[str]]) -> None:
        self.notes = notes
        self.out: list[str] = []

    def mapping(self, data: dict[str, Any], loc: Loc, indent: int) -> None:
        for n, (key, value) in enumerate(data.items()):
            here = (*loc, key)
            if indent == 0 and n:
                self.out.append("")
            self.comments(here, indent)
            self.entry(f"{' ' * indent}{key}:", value, here, indent)

    def entry(self, prefix: str, value: Any, loc: Loc, indent: int) -> None:
        if not isinstance(value, (dict, list)) or not value:
            self.out.append(f"{prefix} {_flow(value)}")
            return
        flow = _flow(value)
        short = len(prefix) + len(flow) < _FLOW_WIDTH
        if loc[-1] in _FLOW_KEYS and short and not self.noted_below(loc):
            self.out.append(f"{prefix} {flow}")
            return
        self.out.append(prefix)
        if isinstance(value, dict):
            self.mapping(value, loc, indent + 2)
            return
        for index, item in enumerate(value):
            here = (*loc, index)
            self.comments(here, indent + 2)
            if not (isinstance(item, dict) and item):
                self.entry(f"{' ' * (indent + 2)}-", item, here, indent + 2)
                continue
            first = len(self.out)
            self.mapping(item, here, indent + 4)
            out = self.out
            start = next(i for i in range(first, len(out)) if not out[i].lstrip().startswith("#"))
            for i in range(first, start):  # the first key's comments go above the dash
                out[i] = f"{' ' * (indent + 2)}{out[i].lstrip()}"
            out[start] = f"{' ' * (indent + 2)}- {out[start][indent + 4 :]}"

    def comments(self, loc: Loc, indent: int) -> None:
        margin = " " * indent
        for text in self.notes.get(loc, []):
            self.out += textwrap.wrap(
                text,
                _COMMENT_WIDTH,
                initial_indent=f"{margin}# ",
                subsequent_indent=f"{margin}#   ",
            )

    def noted_below(self, loc: Loc) -> bool:
        return any(key[: len(loc)] == loc and len(key) > len(loc) for key in self.notes)


def _flow(value: Any) -> str:
    text = yaml.safe_dump(
        value, default_flow_style=True, width=10**6, allow_unicode=True, sort_keys=False
    )
    return text.removesuffix("\n").removesuffix("\n...").strip()
