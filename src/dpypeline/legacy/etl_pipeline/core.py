"""``Task``, ``Job`` and ``ETLPipeline`` as the original dpypeline defined them, and as
this dpypeline's engine runs them.

``Task`` and ``Job`` are this dpypeline's own task and job (the service runs them, retries
them, records them in the ledger) with the original's fields and methods: ``Task(function,
args, kwargs)`` with ``run``, ``Job(name, tasks)`` with ``add_task``, ``remove_task`` and
``run``. How a task's own ``args``/``kwargs`` meet what it is called with is decided in one
place, :func:`task_arguments`, for ``Task.run`` and for the service alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpypeline import pipeline
from dpypeline.errors import ConfigError

logger = logging.getLogger(__name__)


def task_arguments(
    task: Task, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments *task*'s function is called with, when the
    task is run with *args* and *kwargs*: as in the original, the task's own ``args`` come
    first and the call's after them (so the previous task's result follows ``args``), and
    the call's keyword arguments override the task's own."""
    return (*tuple(task.args), *args), {**task.kwargs, **kwargs}


class Task(pipeline.Task):
    """``Task(function, args=(), kwargs={})``, frozen and compared by value as the
    original's dataclass was. ``function`` may also be a dotted path
    (``mypkg.tasks.fix_units``)."""

    args: Any
    function: Callable[..., Any]

    def __init__(
        self,
        function: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        kwargs = {} if kwargs is None else kwargs
        super().__init__(function, **kwargs)  # the commit it declares depends on them
        set_ = object.__setattr__
        set_(self, "kwargs", kwargs)  # the very dict given, as the original kept it
        set_(self, "args", args)
        set_(self, "function", self.func)
        set_(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot assign to field '{name}'")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field '{name}'")

    def _fields(self) -> tuple[Any, Any, Any]:
        return (self.function, self.args, self.kwargs)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Task)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())  # a dict of kwargs makes it unhashable, as it was

    def __repr__(self) -> str:
        return f"Task(function={self.function!r}, args={self.args!r}, kwargs={self.kwargs!r})"

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function with the task's own arguments and these (:func:`task_arguments`)."""
        logger.debug(f"Running task {self.function} with args {args} and kwargs {kwargs}")
        call_args, call_kwargs = task_arguments(self, args, kwargs)
        return self.function(*call_args, **call_kwargs)

    def __call__(self, value: Any, context: pipeline.JobContext | None = None) -> Any:
        """How the service runs the task on a file (or on the previous task's result)."""
        extra = {"context": context} if self.wants_context else {}
        call_args, call_kwargs = task_arguments(self, (value,), extra)
        try:
            return self.function(*call_args, **call_kwargs)
        except TypeError as exc:
            if _binds(self.function, call_args, call_kwargs):
                raise  # raised inside the task: its own failure
            raise ConfigError(f"{self.name}: {exc}; fix the Task's args or kwargs") from exc


def _binds(func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to check against
        return True
    return True


@dataclass
class Job(pipeline.Job):
    """``Job(name="", tasks=[])``: the first task gets what the job is run with (the
    file's path, when the service runs it), each next one the previous task's result."""

    name: str = field(default_factory=str)
    tasks: list[pipeline.Task] = field(default_factory=list)

    def add_task(self, task: pipeline.Task) -> None:
        self.tasks.append(task)

    def remove_task(self, index: int, task: pipeline.Task | None = None) -> pipeline.Task:
        """Removes and returns the task at ``index``. As in the original, ``task`` is
        compared with the ``Task`` class itself, so an instance given there is ignored."""
        if task is Task:
            return self.tasks.pop(self.tasks.index(task))  # type: ignore[arg-type]
        return self.tasks.pop(index)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the chain in this process, as the original did: ``job.run(path)``. The
        service runs it through ``run_tasks``, with the job's context."""
        logger.debug(f"Running job {self.name}.")
        result = _run(self.tasks[0], args, kwargs)
        for task in self.tasks[1:]:
            result = _run(task, (result,), {})
        return result


def _run(task: pipeline.Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(task, Task):
        return task.run(*args, **kwargs)
    return task.func(*args, **task.kwargs, **kwargs)  # a task of today's API


class ETLPipeline:
    """The base of the original's pipelines: a list of jobs, and ``produce_jobs(event)``
    that a subclass defines to run them on an event (a file's path)."""

    def __init__(self, jobs: list[Job] | None = None) -> None:
        self._jobs: list[Job] = jobs if jobs is not None else []

    @property
    def jobs(self) -> list[Job]:
        return self._jobs

    def add_job(self, job: Job) -> list[Job]:
        self._jobs.append(job)
        return self._jobs

    def remove_job(self, index: int, job: Job | None = None) -> Any:
        """Removes and returns the job at ``index``; ``job`` is ignored, as it was."""
        if job is Job:
            return self._jobs.pop(self._jobs.index(job))  # type: ignore[arg-type]
        return self._jobs.pop(index)

    def produce_jobs(self, event: Any) -> Any:
        raise NotImplementedError("produce_jobs must be implemented.")


__all__ = ["ETLPipeline", "Job", "Task", "task_arguments"]
