"""``Job`` and ``Task`` as the original dpypeline spelled them: ``Task(function=, args=,
kwargs=)`` and ``Job(name=)`` with ``add_task``. They are this dpypeline's own job and task,
so they run the same way: the first task gets the file's path, each next one the previous
task's result, then ``args`` and ``kwargs``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dpypeline import pipeline


class Task(pipeline.Task):
    """``function`` is a callable or a dotted path (``mypkg.tasks.fix_units``)."""

    def __init__(
        self,
        function: Callable[..., Any] | str,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(function, **(kwargs or {}))
        self.args = tuple(args or ())

    @property
    def function(self) -> Callable[..., Any]:
        return self.func

    def __call__(self, value: Any, context: pipeline.JobContext | None = None) -> Any:
        if not self.args:
            return super().__call__(value, context)
        if self.wants_context:
            return self.func(value, *self.args, context=context, **self.kwargs)
        return self.func(value, *self.args, **self.kwargs)


class Job(pipeline.Job):
    """A named chain of tasks; ``add_task`` appends one."""

    def __init__(self, name: str, tasks: Iterable[pipeline.Task] | None = None) -> None:
        super().__init__(name, list(tasks or ()))

    def add_task(self, task: pipeline.Task) -> None:
        self.tasks.append(task)


__all__ = ["Job", "Task"]
