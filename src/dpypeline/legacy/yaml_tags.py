"""The original dpypeline's tagged YAML (``!Akita``, ``!Job``, ``!Task``, ...), read as data.

The original built Python objects straight from tags. Here the tags are only names: a
``SafeLoader`` subclass turns each known tag into a :class:`Tagged` record (its tag, its
keys, their lines), which :mod:`dpypeline.legacy.config` maps to the new config. No
object of the file's choosing is ever constructed: ``!!python/object...`` and any tag not
listed in :data:`TAGS` stop the read at that line, before anything runs.

What the original resolved is resolved the same way: anchors and aliases, and a key given
twice in one mapping (its example 1 sets ``event_consumer`` twice): the last one wins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpypeline.config.file import BoundedLoader, read_config, yaml_errors
from dpypeline.errors import ConfigError

TAGS = (
    "!Akita",
    "!Job",
    "!Task",
    "!ThreadPipeline",
    "!BasicPipeline",
    "!ConsumerSerial",
    "!ConsumerParallel",
    "!DaskClient",
    "!ObjectStoreS3",
    "!Method",
)
_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


@dataclass
class Tagged:
    """One tagged mapping of the file: ``!Job {name: ..., tasks: [...]}`` as plain data."""

    tag: str  # without the "!": "Job"
    fields: dict[str, Any]
    line: int
    lines: dict[str, int]  # the line of each key
    anchor: str | None = None


class _TagLoader(BoundedLoader):
    """SafeLoader that reads the original's tags as :class:`Tagged` and refuses all others;
    bounded as the new form's loader is (file size, aliases expanded)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.anchor_names: dict[int, str] = {}  # id(node) -> its anchor
        self.duplicates: list[tuple[str, int, int]] = []  # (key, first line, last line)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        node = super().compose_node(parent, index)
        if not isinstance(event, yaml.AliasEvent) and getattr(event, "anchor", None):
            self.anchor_names[id(node)] = event.anchor
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((str(key), seen[key], line))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _construct_tagged(loader: _TagLoader, node: yaml.Node) -> Tagged:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{line}: {node.tag} must be a mapping of keys")
    fields = loader.construct_mapping(node, deep=True)
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    anchor = loader.anchor_names.get(id(node))
    return Tagged(node.tag.lstrip("!"), fields, line, lines, anchor)


def _refuse(loader: _TagLoader, node: yaml.Node) -> Any:
    line = node.start_mark.line + 1
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    if tag.startswith("!!python/"):
        what = (
            "a Python object; the file is read as data and never builds objects. Name a"
            " function by its dotted path in a !Task's `function:` instead"
        )
    else:
        what = (
            f"a tag dpypeline does not know (it reads {', '.join(TAGS)}). Remove it and"
            " what refers to it, convert the rest with `dpypeline migrate`, and write that"
            " part in the new form: see docs/migrating.md"
        )
    raise ConfigError(f"{line}: {tag} is refused: {what}")


for _tag in TAGS:
    _TagLoader.add_constructor(_tag, _construct_tagged)
_TagLoader.add_constructor(None, _refuse)  # None: any other tag
# as config.py does: `1e20` is a number (YAML 1.1 would read it as a string)
_TagLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def is_tagged(path: str | os.PathLike[str]) -> bool:
    """Whether the file uses tags (the original's form). Only composes: nothing is built."""
    try:
        root = yaml.compose(read_config(Path(path)), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError, ConfigError, RecursionError):
        return False  # load_config reports it
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if not node.tag.startswith("tag:yaml.org,2002:") or "python/" in node.tag:
            return True
        if isinstance(node, yaml.MappingNode):
            pending += [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value
    return False


def parse(
    path: str | os.PathLike[str], *, check_writers: bool = True
) -> tuple[Any, list[tuple[str, int, int]]]:
    """The file's document, its tags as :class:`Tagged`, and the keys it gives twice
    (key, first line, last line). ConfigError names the file and line of a problem.
    *check_writers*: refuse a file others can change (it is to be run, not converted)."""
    source = Path(path)
    try:
        text = read_config(source, check_writers=check_writers)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    with yaml_errors(source.name):  # outside: its errors name the file already
        loader = _TagLoader(text)
        try:
            return loader.get_single_data(), loader.duplicates
        except ConfigError as exc:  # a refused tag: its line, in this file
            raise ConfigError(f"{source.name}:{exc}") from None
        finally:
            loader.dispose()
