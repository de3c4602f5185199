"""``Job`` and ``Task`` as the original dpypeline spelled them: ``Task(function=, args=,
kwargs=)`` and ``Job(name=)`` with ``add_task``. They are this dpypeline's own job and task,
so they run the same way: ``args`` first, then the file's path (the first task) or the
previous task's result (each next one), then ``kwargs``, as the original called them."""

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
        # the original's order: the task's own args first, then the previous result
        if self.wants_context:
            return self.func(*self.args, value, context=context, **self.kwargs)
        return self.func(*self.args, value, **self.kwargs)


class Job(pipeline.Job):
    """A named chain of tasks; ``add_task`` appends one."""

    def __init__(self, name: str, tasks: Iterable[pipeline.Task] | None = None) -> None:
        super().__init__(name, list(tasks or ()))

    def add_task(self, task: pipeline.Task) -> None:
        self.tasks.append(task)


__all__ = ["Job", "Task"]
