"""What a config can only be checked for outside itself, before any file arrives.

``load_config`` knows the file's shape; this module asks the world whether it will work:
each task accepts the ``with:`` it is given (bound to its signature exactly as it will be
called), the objectstores named exist and their credentials can be read, a task's own
option checks pass (``check_options``, e.g. open_dataset's engine), every pattern can
match something, and CACHE_DIR can be written. ``dpypeline validate`` and ``dpypeline
run`` both call :func:`preflight`, so what validate accepts does not make every job die,
and run refuses (exit 2) what validate refuses. Every problem names file, line and field.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpypeline.config.model import PipelineConfig, TaskConfig
from dpypeline.errors import ConfigError
from dpypeline.pipeline import Job, Task

Loc = tuple[str | int, ...]


def preflight(config: PipelineConfig, jobs: list[Job], setup: list[Task]) -> None:
    """Raise ConfigError listing every problem found (``file:line: field: what``)."""
    problems = [
        f"{config.where(*loc)}: {text}"
        for loc, text in (
            *_task_problems(config, jobs, setup),
            *_objectstore_problems(config),
            *_pattern_problems(config),
            *_cache_dir_problems(config),
        )
    ]
    if problems:
        raise ConfigError("\n".join(problems))


def _configured(config: PipelineConfig) -> Iterator[tuple[Loc, TaskConfig, bool]]:
    """(location, task config, is it a setup task) of every task of the config."""
    for j, job in enumerate(config.jobs):
        for t, tc in enumerate(job.tasks):
            yield ("jobs", j, "tasks", t), tc, False
    for s, tc in enumerate(config.setup):
        yield ("setup", s), tc, True


def _task_problems(
    config: PipelineConfig, jobs: list[Job], setup: list[Task]
) -> Iterator[tuple[Loc, str]]:
    tasks = [*(task for job in jobs for task in job.tasks), *setup]
    for (loc, tc, is_setup), task in zip(_configured(config), tasks, strict=True):
        yield from ((loc + sub, text) for sub, text in _binding_problems(task, is_setup))
        name = tc.with_.get("objectstore")
        if isinstance(name, str) and name not in config.objectstores:
            known = ", ".join(sorted(config.objectstores)) or "none"
            yield (
                (*loc, "with", "objectstore"),
                f"objectstore {name!r} is not defined under `objectstores:` (defined: {known})",
            )
        check = getattr(task.func, "check_options", None)
        if callable(check):
            for option, text in check(**task.kwargs).items():
                yield (*loc, "with", option), text


def _binding_problems(task: Task, is_setup: bool) -> Iterator[tuple[Loc, str]]:
    """The task is called as ``func(value, **with)`` (setup: ``func(**with)``), plus
    ``context=`` when it declares one; bind that call to its signature."""
    try:
        sig = inspect.signature(task.func)
    except (TypeError, ValueError):  # no signature to check (some builtins)
        return
    params = sig.parameters
    kinds = inspect.Parameter
    takes_any = any(p.kind is kinds.VAR_KEYWORD for p in params.values())
    positional = [
        n
        for n, p in params.items()
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    first = positional[0] if positional and not is_setup else None  # the file, or the value
    named = [
        n
        for n, p in params.items()
        if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        and n != first
        and not (n == "context" and task.wants_context)
    ]
    for key in task.kwargs:
        if key == first or (key == "context" and task.wants_context):
            yield ("with", key), f"{task.name}: {key!r} is given by the pipeline, not by `with:`"
        elif (key not in params or params[key].kind is kinds.POSITIONAL_ONLY) and not takes_any:
            takes = ", ".join(named) or "no options"
            yield ("with", key), f"{task.name} does not take {key!r} (it takes: {takes})"
    args = () if is_setup else (None,)
    extra = {"context": None} if task.wants_context else {}
    try:
        sig.bind(*args, **{**task.kwargs, **extra})
    except TypeError as exc:
        if "unexpected keyword" not in str(exc) and "multiple values" not in str(exc):
            yield ("with",), f"{task.name}: {exc}"


def _objectstore_problems(config: PipelineConfig) -> Iterator[tuple[Loc, str]]:
    from dpypeline.config.credentials import load_credentials

    for name, store in config.objectstores.items():
        try:
            load_credentials(name, store)
        except ConfigError as exc:
            yield ("objectstores", name, "credentials"), str(exc)


def _pattern_problems(config: PipelineConfig) -> Iterator[tuple[Loc, str]]:
    from dpypeline.watching.patterns import PathMatcher

    for w, watch in enumerate(config.watch):
        if not watch.patterns:
            yield ("watch", w, "patterns"), "no patterns: nothing would ever be taken"
        for key in ("patterns", "ignore_patterns"):
            for p, pattern in enumerate(getattr(watch, key)):
                problem = pattern_problem(pattern)
                if problem is None:
                    try:
                        PathMatcher([pattern])
                    except ValueError as exc:
                        problem = str(exc)
                if problem is not None:
                    yield ("watch", w, key, p), problem


def pattern_problem(pattern: str) -> str | None:
    """Why *pattern* (relative to its watch's path) can never match, or None."""
    if not pattern:
        return "an empty pattern matches nothing"
    if pattern.startswith("/"):
        return f"{pattern!r} is absolute; patterns are relative to the watch's path"
    if ".." in pattern.split("/"):
        return f"{pattern!r} leaves the watch's path ('..'); it can never match"
    if _unclosed_bracket(pattern):
        return f"{pattern!r} has a '[' that is never closed (a literal '[' is written '[[]')"
    return None


def _unclosed_bracket(pattern: str) -> bool:
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1  # a "]" first in a class is a literal
            close = pattern.find("]", j)
            if close < 0 or "/" in pattern[i:close]:
                return True
            i = close
        i += 1
    return False


def _cache_dir_problems(config: PipelineConfig) -> Iterator[tuple[Loc, str]]:
    """CACHE_DIR, or the nearest directory above it that exists, must take a new file: a
    real write, since a permission check says nothing of read-only mounts (or to root)."""
    path = Path(config.cache_dir)
    existing: Any = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if existing is None or not os.path.isdir(existing):
        yield ("cache_dir",), f"{path}: {existing} is not a directory"
        return
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".dpypeline-probe-"):
            pass
    except OSError as exc:
        yield ("cache_dir",), f"{path} is not writable by this user ({existing}: {exc.strerror})"
