"""The pipeline file as data: YAML read safely, with the line of every key and item, and
``${VAR}`` expanded from the environment.

Only a ``SafeLoader`` subclass reads the file, so tags such as ``!!python/object`` are
refused, and a key given twice in one mapping is an error naming both lines. The lines
recorded here are what lets :mod:`dpypeline.config` report a problem as ``file:line: field``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import yaml

from dpypeline.errors import ConfigError

Loc = tuple[str | int, ...]
_VARIABLE = re.compile(r"\$\$|\$\{([^}]*)(\}?)")
_VARIABLE_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


class _LineDict(dict[Any, Any]):
    lines: dict[Any, int]


class _LineList(list[Any]):
    lines: list[int]


class LineLoader(yaml.SafeLoader):
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
