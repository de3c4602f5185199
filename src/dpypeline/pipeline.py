"""Jobs and tasks: what runs on a file, and how tasks are found and chained.

As in the original dpypeline, the first task of a job receives the file path (str) and
each next task receives the previous task's return value as its first argument; ``with:``
gives keyword arguments. A task that declares a ``context`` parameter also receives the
``JobContext``. Tasks are plain functions: a built-in short name (``open_dataset``) or a
dotted path (``mypkg.tasks.fix_units``); only the tasks named in a config are imported.
The core knows no task by name: short names are entry points of the group
:data:`TASK_GROUP` — dpypeline's own built-ins are registered there like any installed
package's tasks — imported by their dotted path like any user's task, and a task that
writes to a shared resource says so itself (:mod:`dpypeline.commits`).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import structlog

from dpypeline.commits import Commit, declared
from dpypeline.config.model import ObjectStoreConfig, PipelineConfig
from dpypeline.config.taskpath import make_importable, task_dirs
from dpypeline.config.trust import import_checked, refuse_process_spawning
from dpypeline.errors import ConfigError
from dpypeline.outages import disk_full_is_outage

TASK_GROUP = "dpypeline.tasks"  # entry points: short name -> "module:function"


@dataclass(frozen=True, slots=True)
class Registered:
    """A task registered under a short name by an installed distribution."""

    name: str
    target: str  # "module:function"
    distribution: str


def registered_tasks() -> dict[str, Registered]:
    """The short names installed packages register in the ``dpypeline.tasks`` entry-point
    group (dpypeline's own built-ins among them). A name registered by two distributions
    is refused where it is used: which one runs must not depend on install order."""
    found: dict[str, list[Registered]] = {}
    for ep in entry_points(group=TASK_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found.setdefault(ep.name, []).append(Registered(ep.name, ep.value, dist))
    table: dict[str, Registered] = {}
    for name, regs in found.items():
        targets = {r.target for r in regs}
        if len(targets) > 1:
            owners = ", ".join(sorted(f"{r.distribution} ({r.target})" for r in regs))
            table[name] = Registered(name, "", owners)  # ambiguous: refused by task_module
        else:
            table[name] = regs[0]
    return table


def task_module(name: str) -> tuple[str, str]:
    """(module, function) a task name refers to. Raises ImportError for a name that is
    neither a registered short name nor a dotted path, ConfigError for a short name two
    installed packages register."""
    registered = registered_tasks()
    reg = registered.get(name)
    if reg is not None and not reg.target:
        raise ConfigError(
            f"task '{name}' is registered by more than one installed package: "
            f"{reg.distribution}; name the one you mean by its dotted path"
        )
    target = reg.target if reg is not None else name
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ImportError(
            f"'{name}' is neither a registered task ({', '.join(sorted(registered))}) "
            "nor a dotted path such as mypkg.tasks.fix_units; `dpypeline tasks` lists "
            "the registered ones"
        )
    return module_name, attr


def resolve_task(name: str) -> Callable[..., Any]:
    """The function a task name refers to. Its module is checked before it is imported
    (:func:`dpypeline.config.trust.import_checked`), and a standard function that runs its
    argument as a command is refused. Raises ImportError/AttributeError with a message
    that says what was looked for, ConfigError for a module or function refused."""
    module_name, attr = task_module(name)
    module = import_checked(module_name)
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module '{module_name}' has no task '{attr}'") from None
    if not callable(func):
        raise TypeError(f"'{name}' is not callable")
    refuse_process_spawning(func, name)
    return func


def task_modules(tasks: list[Task]) -> dict[str, str]:
    """The module each task named by a config comes from, and the file it was imported
    from, in the order first named: what ``validate`` shows the operator was run."""
    modules: dict[str, str] = {}
    for task in tasks:
        name = task_module(task.name)[0]
        file = getattr(sys.modules.get(name), "__file__", None)
        modules.setdefault(name, file or "(built into Python)")
    return modules


class Task:
    """One step of a job: a function, its keyword arguments, and the commit it declares
    it makes with them (:mod:`dpypeline.commits`), if any."""

    def __init__(self, func: Callable[..., Any] | str, /, **kwargs: Any) -> None:
        self.func = resolve_task(func) if isinstance(func, str) else func
        self.kwargs = kwargs
        self.name = func if isinstance(func, str) else _qualified_name(func)
        self.commit = declared(self.func, kwargs)
        try:
            self.wants_context = "context" in inspect.signature(self.func).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            self.wants_context = False

    def __call__(self, value: Any, context: JobContext | None = None) -> Any:
        extra = {"context": context} if self.wants_context else {}
        try:
            return self.func(value, **extra, **self.kwargs)
        except TypeError as exc:
            if self._binds(value, extra):
                raise  # raised inside the task: its own failure, classified as any other
            # the call itself is wrong (an option the task does not take): every file would
            # fail the same way, so it is the config's fault, not the file's
            raise ConfigError(f"{self.name}: {exc}; fix its `with:` in the config") from exc

    def _binds(self, value: Any, extra: dict[str, Any]) -> bool:
        try:
            inspect.signature(self.func).bind(value, **extra, **self.kwargs)
        except TypeError:
            return False
        except ValueError:  # no signature to check against
            return True
        return True

    def run_setup(self, context: SetupContext) -> Any:
        if self.wants_context:
            return self.func(context=context, **self.kwargs)
        return self.func(**self.kwargs)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.kwargs!r})"


@dataclass
class Job:
    """A named chain of tasks run on every stable file."""

    name: str
    tasks: list[Task]

    def run(self, path: str, context: JobContext | None = None) -> Any:
        return self.run_tasks(0, len(self.tasks), path, context)

    def run_tasks(self, start: int, stop: int, value: Any, context: JobContext | None) -> Any:
        for task in self.tasks[start:stop]:
            with disk_full_is_outage(f"running {task.name}"):
                value = task(value, context)
        return value

    def commit_index(self) -> int | None:
        """Where the chain starts to commit: the index of its first task that declares a
        commit, or None when none does."""
        return next((i for i, task in enumerate(self.tasks) if task.commit is not None), None)

    def commit(self) -> Commit | None:
        """The resource this job commits to (its first committing task's), or None."""
        i = self.commit_index()
        return self.tasks[i].commit if i is not None else None

    def ordered_resource(self) -> str | None:
        """The resource, when it takes files in queue order only: an earlier job that
        failed holds the later ones (:mod:`dpypeline.ordering`). None for an unordered
        resource (a template store, an upload prefix) or none."""
        commit = self.commit()
        return commit.resource if commit is not None and commit.ordered else None


@dataclass
class JobCall:
    """One job on one file as a value that can be pickled to another process (a Dask
    worker): the job, the file and the context. Calling it runs the whole chain;
    ``compute`` and ``commit`` run the chain in two stages, split where it starts to
    commit (:class:`dpypeline.commits.Staged`), so executors can compute many files at
    once yet commit to one resource one at a time."""

    job: Job
    path: str
    context: JobContext

    def __call__(self) -> Any:
        return self.job.run(self.path, self.context)

    @property
    def commits_to(self) -> Commit | None:
        return self.job.commit()

    def compute(self) -> Any:
        split = self.job.commit_index()
        stop = len(self.job.tasks) if split is None else split
        return self.job.run_tasks(0, stop, self.path, self.context)

    def commit(self, value: Any) -> Any:
        split = self.job.commit_index()
        if split is None:
            return value
        return self.job.run_tasks(split, len(self.job.tasks), value, self.context)


@dataclass
class SetupContext:
    objectstores: Mapping[str, ObjectStoreConfig] = field(default_factory=dict)
    log: Any = None


@dataclass
class JobContext:
    """What a task may want to know about the job it runs in."""

    job_id: int
    attempt: int
    path: str
    relpath: str
    root: str
    job: str
    log: Any
    objectstores: Mapping[str, ObjectStoreConfig] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its logger (bound to this process's logging); a copy that
        arrives in another process gets a logger of its own there."""
        return {k: v for k, v in self.__dict__.items() if k != "log"}

    def __setstate__(self, state: dict[str, Any]) -> None:

        self.__dict__.update(state)
        self.log = structlog.stdlib.get_logger("dpypeline.task").bind(
            job_id=self.job_id, file=self.path, job=self.job, attempt=self.attempt
        )


class ConfigRelative:
    """Marks a task parameter that names a local path (``LocalPath``): given relative in a
    config file, it is relative to that file, as every other path of the config is, not to
    wherever the service was started."""


LocalPath = Annotated[str, ConfigRelative()]


def local_paths(func: Callable[..., Any], kwargs: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """*kwargs* with each ``LocalPath`` argument of *func* made absolute against *base*
    (``~`` expanded, as in the rest of the config); URLs (``s3://...``) are left alone."""
    marked = {name for name, hint in _annotations(func).items() if _is_local_path(hint, func)}
    return {
        key: os.path.normpath(base / Path(value).expanduser())
        if key in marked and isinstance(value, str) and value and "://" not in value
        else value
        for key, value in kwargs.items()
    }


def local_path_arguments(task: Task) -> dict[str, str]:
    """The task's ``LocalPath`` arguments, as it will be called with them."""
    marked = {n for n, hint in _annotations(task.func).items() if _is_local_path(hint, task.func)}
    return {k: v for k, v in task.kwargs.items() if k in marked and isinstance(v, str)}


def _annotations(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return {n: p.annotation for n, p in inspect.signature(func).parameters.items()}
    except (TypeError, ValueError):  # some builtins have no signature
        return {}


def _is_local_path(hint: Any, func: Callable[..., Any]) -> bool:
    """Whether a parameter's annotation is ``LocalPath``. Annotations are often strings
    (``from __future__ import annotations``) naming types imported only for type checkers,
    so each is evaluated on its own in the task's module, as typing.get_type_hints would,
    and one that cannot be is not a LocalPath."""
    if isinstance(hint, str):
        if "LocalPath" not in hint:
            return False
        try:
            hint = eval(hint, dict(getattr(inspect.unwrap(func), "__globals__", {})))
        except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated
            return False
    return any(isinstance(m, ConfigRelative) for m in getattr(hint, "__metadata__", ()))


def _qualified_name(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def import_tasks(config: PipelineConfig) -> tuple[list[Job], list[Task]]:
    """Import every task the config names. Task modules next to the config file are
    importable (the config's directory is put on ``sys.path``). Raises ConfigError naming
    the field and line of each task that cannot be imported."""
    make_importable(task_dirs(config))
    problems: list[str] = []

    def load(tc: Any, *loc: str | int) -> Task | None:
        try:
            func = resolve_task(tc.task)
            task = Task(func, **local_paths(func, tc.with_, config.base_dir))
            task.name = tc.task
            return task
        except Exception as exc:  # noqa: BLE001 - any import-time failure of user code is a config problem
            problems.append(f"{config.where(*loc, 'task')}: cannot import task: {exc}")
            return None

    jobs = []
    for j, jc in enumerate(config.jobs):
        tasks = [load(tc, "jobs", j, "tasks", t) for t, tc in enumerate(jc.tasks)]
        jobs.append(Job(jc.name, [t for t in tasks if t is not None]))
    setup = [load(tc, "setup", s) for s, tc in enumerate(config.setup)]
    if problems:
        raise ConfigError("\n".join(problems))
    return jobs, [t for t in setup if t is not None]
