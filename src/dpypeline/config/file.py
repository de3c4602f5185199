"""The pipeline file as data: YAML read safely, with the line of every key and item, and
``${VAR}`` expanded from the environment.

Only a ``SafeLoader`` subclass reads the file, so tags such as ``!!python/object`` are
refused, and a key given twice in one mapping is an error naming both lines. The lines
recorded here are what lets :mod:`dpypeline.config.model` report a problem as ``file:line: field``.

The file is bounded before anything is built from it: it must be at most
:data:`MAX_BYTES` long, and the document it composes to at most :data:`MAX_VALUES` values
(:data:`MAX_TEXT` characters) once every alias is expanded, since a few hundred bytes of
aliases of aliases expand to billions. A file that others can change is refused
(:mod:`dpypeline.config.trust`): what the config names runs as the service's user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dpypeline.config.trust import refuse_foreign_writers
from dpypeline.errors import ConfigError

Loc = tuple[str | int, ...]
_VARIABLE = re.compile(r"\$\$|\$\{([^}]*)(\}?)")
_VARIABLE_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


MAX_BYTES = 1 << 20  # a config of several pipelines is a few KiB
MAX_VALUES = 100_000  # keys, items and scalars, every alias expanded; a config has hundreds
MAX_TEXT = 8 << 20  # characters of all scalars, every alias expanded


def read_config(path: Path, *, check_writers: bool = True) -> bytes:
    """The bytes of the config file *path*, read only if it is at most :data:`MAX_BYTES`
    long and (with *check_writers*) no one but the service's user or root can change it.
    Raises OSError as ``open`` does, ConfigError for a file refused."""
    with open(path, "rb") as stream:
        st = os.fstat(stream.fileno())
        if check_writers:
            refuse_foreign_writers(path, st, "config file")
        data = stream.read(MAX_BYTES + 1)  # a device or pipe has no size to check first
    if len(data) > MAX_BYTES:
        size = f"{st.st_size} bytes" if st.st_size > MAX_BYTES else "more"
        raise ConfigError(
            f"config file {path} is larger than {MAX_BYTES} bytes ({size}), far more than a"
            " pipeline needs: check that -c (or DPYPELINE_CONFIG) names the config file"
        )
    return data


class _TooLarge(yaml.YAMLError):
    """The document would expand past the bounds; said by :func:`yaml_errors`."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document too large once its aliases are expanded, after
    composing it (linear in the file) and before anything is constructed from it."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        values, text = _expanded_size(node) if node is not None else (0, 0)
        if values > MAX_VALUES or text > MAX_TEXT:
            raise _TooLarge(
                f"the document is too large once its aliases are expanded (more than"
                f" {MAX_VALUES} values or {MAX_TEXT} characters; a pipeline's config has a"
                " few hundred values): write out what the aliases repeat, with fewer"
                " aliases of aliases"
            )
        return node


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(values, characters) of the document at *root* with every alias expanded, each
    capped just past its bound. A node is counted once however often it is aliased, so
    this takes time linear in the file. Raises _TooLarge for an alias inside its own
    anchor (a document that never ends)."""
    sizes: dict[int, tuple[int, int]] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            ancestors.discard(id(node))
            values, text = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            for child in children:
                values += sizes[id(child)][0]
                text += sizes[id(child)][1]
            sizes[id(node)] = (min(values, MAX_VALUES + 1), min(text, MAX_TEXT + 1))
        elif id(node) in ancestors:
            raise _TooLarge(
                "this anchor contains an alias of itself, which would repeat without end:"
                " remove that alias",
                node.start_mark.line + 1,
            )
        elif id(node) not in sizes:
            ancestors.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _LineDict(dict[Any, Any]):
    lines: dict[Any, int]


class _LineList(list[Any]):
    lines: list[int]


class LineLoader(BoundedLoader):
    """SafeLoader that remembers where each key and item is and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys from a `<<` merge may be overridden; that is the point
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if first is not None:
                    problem = f"duplicate key {key!r} (first on line {first})"
                    raise yaml.constructor.ConstructorError(
                        None, None, problem, key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


@contextmanager
def yaml_errors(name: str) -> Iterator[None]:
    """PyYAML's errors while reading the file ``name`` as a ConfigError naming its line."""
    try:
        yield
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{name}{line}: invalid YAML: {exc.problem}") from None
    except _TooLarge as exc:
        line = f":{exc.line}" if exc.line is not None else ""
        raise ConfigError(f"{name}{line}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a pipeline's config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> Any:
    data = _LineDict()
    yield data
    data.update(loader.construct_mapping(node))
    data.lines = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> Any:
    data = _LineList()
    yield data
    data.extend(loader.construct_sequence(node))
    data.lines = [item.start_mark.line + 1 for item in node.value]


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
# YAML 1.1 (PyYAML) reads `1.0e20` as a string; the fill values in task options need floats.
LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def expand(value: Any, loc: Loc, env: Expansion) -> Any:
    """Plain dicts/lists with ``${VAR}`` expanded; records line numbers on the way down."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(value, _LineDict):
                env.lines[(*loc, key)] = value.lines[key]
            out[key] = expand(item, (*loc, key), env)
        return out
    if isinstance(value, list):
        for index, line in enumerate(getattr(value, "lines", [])):
            env.lines[(*loc, index)] = line
        return [expand(item, (*loc, index), env) for index, item in enumerate(value)]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: env.substitute(match, loc), value)
    return value


class Expansion:
    """Expansion state: the variables, the lines recorded so far and the problems found."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[Loc, str]] = []

    def substitute(self, match: re.Match[str], loc: Loc) -> str:
        if match[0] == "$$":
            return "$"
        spec = _VARIABLE_NAME.fullmatch(match[1])
        if not match[2] or spec is None:
            hint = "write ${NAME}, ${NAME:-default}, or $$ for a literal $"
            self.problems.append((loc, f"bad variable reference {match[0]!r} ({hint})"))
            return match[0]
        name, default = spec[1], spec[2]
        if self.environ.get(name) or (default is None and name in self.environ):
            return self.environ[name]
        if default is not None:
            return default
        hint = f"set it, or give a default: ${{{name}:-value}}"
        self.problems.append((loc, f"environment variable {name} is not set ({hint})"))
        return match[0]
