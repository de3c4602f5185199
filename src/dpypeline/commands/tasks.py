"""``dpypeline tasks``: the tasks a config may name by short name, with their parameters.

Short names are entry points of the ``dpypeline.tasks`` group: dpypeline's built-ins and
those of every installed package that registers its own. A task's parameters are what its
``with:`` may give: every parameter after the first (the file, or the previous task's
value), but ``context``, which dpypeline passes itself.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from dpypeline.pipeline import registered_tasks, resolve_task


def describe() -> list[dict[str, Any]]:
    """Each registered task: its name, where it lives, which distribution registers it,
    its parameters (``name``, ``default`` or ``required``) and the first line of its
    docstring; a task that cannot be imported says why instead of its parameters."""
    rows = []
    for name, reg in sorted(registered_tasks().items()):
        row: dict[str, Any] = {"name": name, "target": reg.target, "from": reg.distribution}
        try:
            func = resolve_task(name)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the rest
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row["parameters"] = _parameters(func)
            row["summary"] = (inspect.getdoc(func) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(row)
    return rows


def _parameters(func: Callable[..., Any]) -> list[dict[str, Any]]:
    try:
        params = list(inspect.signature(func).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read
        return []
    out = []
    for p in params:
        if p.name == "context" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        entry: dict[str, Any] = {"name": p.name}
        if p.default is inspect.Parameter.empty:
            entry["required"] = True
        else:
            entry["default"] = p.default if _plain(p.default) else repr(p.default)
        out.append(entry)
    return out


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def cmd_tasks(as_json: bool) -> int:
    rows = describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['target']}, from {row['from']})")
        if "error" in row:
            print(f"    cannot be imported: {row['error']}")
            continue
        if row["summary"]:
            print(f"    {row['summary']}")
        for p in row["parameters"]:
            shown = "required" if p.get("required") else f"default {p['default']!r}"
            print(f"    with: {p['name']}  ({shown})")
    return 0
