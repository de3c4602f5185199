"""What a task writes to: how a task declares that it *commits* to a named resource.

A task that writes to something other jobs write to too (a Zarr store, a prefix of an
object store, a user's database) declares it with :func:`commits`: a function from the
task's keyword arguments (its ``with:``) to the :class:`Commit` that call makes, or None
when it makes none. The core never looks at which task it is, only at this declaration:

- A job's chain splits at its first committing task. The tasks before it are the job's
  *compute* stage, which an executor may run for several files at once; the committing
  task and those after it are its *commit* stage, which runs one job at a time per
  resource, earliest job first (:class:`dpypeline.ordering.CommitOrder`).
- An *ordered* resource (an append-mode store, an append-only log) takes the files in
  queue order only: a job whose earlier job of the same resource failed is held behind
  it, spending no attempt, until that one commits or is skipped
  (:func:`dpypeline.ordering.hold_for`).

A user's task declares it the same way::

    from dpypeline.commits import Commit, commits

    @commits(lambda kw: Commit(f"sqlite:{kw['database']}", ordered=True))
    def insert_rows(ds, *, database, context=None): ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Declaration = Callable[[Mapping[str, Any]], "Commit | None"]

_ATTRIBUTE = "__dpypeline_commits__"


@dataclass(frozen=True, slots=True)
class Commit:
    """A task call's write to ``resource`` (a name the same for every job that writes
    there, such as a store's normalised URL). ``ordered``: the resource takes files in
    queue order only, so a failed job holds the later ones."""

    resource: str
    ordered: bool = False


def commits(declare: Declaration) -> Callable[[F], F]:
    """Mark a task as committing to the resource ``declare(kwargs)`` names."""

    def mark(func: F) -> F:
        setattr(func, _ATTRIBUTE, declare)
        return func

    return mark


def declared(func: Callable[..., Any], kwargs: Mapping[str, Any]) -> Commit | None:
    """The commit a call of ``func`` with ``kwargs`` makes, or None (no declaration, or
    the declaration says this call writes nothing shared)."""
    declare: Declaration | None = getattr(func, _ATTRIBUTE, None)
    return declare(kwargs) if declare is not None else None


class Staged(Protocol):
    """A job on one file, as an executor sees it: it runs whole (``call()``), or, when it
    commits to a resource (``commits_to``), as ``commit(compute())``."""

    @property
    def commits_to(self) -> Commit | None: ...

    def __call__(self) -> Any: ...

    def compute(self) -> Any: ...

    def commit(self, value: Any) -> Any: ...
