"""Zarr stores that stay correct through replays, crashes and concurrent jobs.

The store-level pieces of the ``to_zarr`` task (``dpypeline.tasks.zarr.to_zarr``), as plain
functions: where a store is (:func:`locate`), the lock that keeps writers apart
(:func:`store_lock`), the store's state read afresh under it (:func:`open_store`), and the
crash-consistency protocol:

- The group attribute ``dpypeline_committed`` is the number of complete steps along the
  append dimension, written last (:func:`commit`). Steps ``[0, committed)`` are the truth;
  anything beyond them in any array is the leftover of a write that died, and
  :func:`repair` cuts every array back to ``committed`` before the next write.
- A store with ``dpypeline_append_dim`` but no ``dpypeline_committed`` died while being
  created: :func:`write_new` deletes its arrays (the group last, so the store stays
  recognisable until then) and creates it again.
- Region writes into a template overwrite whole chunks in place, then record the steps in
  ``dpypeline_written``; a replay writes the same chunks again.
- Writes cover whole chunks only (:func:`misaligned`): a partial chunk would be a
  read-modify-write of a chunk that also holds committed steps. Each chunk is replaced
  atomically (a local file renamed into place, an S3 PUT): old or new, never torn.

:func:`failpoint` kills the process with SIGKILL at a named point of a write when the
environment variable ``DPYPELINE_FAILPOINT`` names it (and, if
``DPYPELINE_FAILPOINT_ONCE_FILE`` names a file, only if that file exists: it is deleted
first, so only the first run dies). It is inert unless the variable is set; the crash
tests use it to stop a write exactly between two of its steps.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dpypeline.errors import ConfigError, PermanentError
from dpypeline.tasks.zarr import compat

if TYPE_CHECKING:
    import zarr
    from zarr.abc.store import Store as ZarrStore

COMMITTED = "dpypeline_committed"
APPEND_DIM = "dpypeline_append_dim"
WRITTEN = "dpypeline_written"
COMMITS = "dpypeline_commits"  # which job appended which steps (``history``)
MARKERS = (COMMITTED, APPEND_DIM, WRITTEN, COMMITS)
# Every chunk is written, even one holding nothing but the fill value: zarr's test for
# such a chunk compares it with the fill value value by value, NaN equal to NaN, through
# masked copies of the chunk. With NEMO's 1e20 fill value that test took a fifth of an
# ORCA025 append (scripts/bench_orca.py), and a chunk that spans the horizontal grid, as
# the store's chunks do, always holds ocean.
WRITE_EMPTY_CHUNKS = True
_GROUP_METADATA = frozenset({".zgroup", ".zattrs", ".zmetadata", "zarr.json"})

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_S3_STORES: dict[tuple[str, str], ZarrStore] = {}


def failpoint(name: str) -> None:
    """Die here by SIGKILL if ``$DPYPELINE_FAILPOINT`` is ``name`` (see the module doc)."""
    if os.environ.get("DPYPELINE_FAILPOINT") != name:
        return
    once = os.environ.get("DPYPELINE_FAILPOINT_ONCE_FILE")
    if once:
        try:
            os.unlink(once)
        except FileNotFoundError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Location:
    """A store's normalised URL (an absolute path for a local store) and, for S3, the
    s3fs options to reach it (they hold the secret: never logged or shown)."""

    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        return self.url.startswith("s3://")

    def open(self) -> ZarrStore:
        """The zarr store. An S3 store's client is made once per process and kept: each
        new s3fs client would open (and leak) an HTTP session of its own."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:
            return LocalStore(self.url)
        key = (self.url, json.dumps(self.storage_options, sort_keys=True, default=str))
        with _LOCKS_GUARD:
            if key not in _S3_STORES:
                from dpypeline.objectstore import S3FS_TRIES, keep_open

                store = FsspecStore.from_url(
                    self.url, storage_options=dict(self.storage_options or {})
                )
                store.fs.retries = S3FS_TRIES  # botocore alone retries, within the timeouts
                keep_open(store.fs, compat.run)  # zarr runs the client on its own event loop
                _S3_STORES[key] = store
            return _S3_STORES[key]


def locate(store: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The :class:`Location` of a local path (``file://`` allowed) or ``s3://bucket/key``.
    s3fs's listing and instance caches are always off: a cached listing would hide what
    another writer, or a crashed attempt, left in the store."""
    if store.startswith(("s3://", "s3a://")):
        options = {**(storage_options or {}), "use_listings_cache": False}
        options["skip_instance_cache"] = True
        return Location("s3://" + store.split("://", 1)[1].strip("/"), options)
    if store.startswith("file://"):
        store = store.removeprefix("file://")
    elif "://" in store:
        raise ConfigError(f"to_zarr: store must be a local path or s3://bucket/key, not {store!r}")
    return Location(os.path.abspath(os.path.expanduser(store)))


@contextmanager
def store_lock(location: Location) -> Iterator[None]:
    """Hold the store's lock for a whole read-check-write-commit sequence.

    Two appends that interleave would both see the same committed length and write the
    same steps. Within a process, a ``threading.Lock`` per store URL serialises the jobs of
    a threaded executor; for a local store an ``flock`` on ``STORE.lock`` beside it also
    keeps other processes out. Across the machines of a Dask cluster the dask executor never
    runs two writes to one store at once (``dpypeline.executors.dask``), which also covers S3
    stores.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(location.url, threading.Lock())
    with lock:
        if location.remote:
            yield
            return
        os.makedirs(os.path.dirname(location.url), exist_ok=True)
        fd = os.open(location.url + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


@dataclass
class StoreState:
    """An open store: its group, arrays and their dimension names."""

    zstore: ZarrStore
    group: zarr.Group
    arrays: dict[str, zarr.Array]
    dims: dict[str, tuple[str, ...]]

    @property
    def zarr_format(self) -> int:
        return int(self.group.metadata.zarr_format)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def along(self, dim: str) -> dict[str, zarr.Array]:
        """The arrays that have dimension ``dim``."""
        return {n: a for n, a in self.arrays.items() if dim in self.dims[n]}

    def length(self, name: str, dim: str) -> int:
        return int(self.arrays[name].shape[self.dims[name].index(dim)])


def open_store(zstore: ZarrStore, url: str) -> StoreState | None:
    """The store's state, read afresh: never from consolidated metadata, which may be
    stale, and with one listing rather than zarr's probing of every member. None where a
    new store may be created: nothing there yet, or a group without arrays. Anything else
    that is not a Zarr group is refused, never overwritten."""
    import zarr

    found = compat.run(_top_level(zstore))
    try:
        group = zarr.open_group(zstore, mode="r+", use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError derives from it
        if set(found) - _GROUP_METADATA:
            raise PermanentError(
                f"{url} exists and is not a Zarr store ({', '.join(sorted(found)[:5])} …):"
                " choose another store, or remove it"
            ) from None
        return None
    names = sorted(set(found) - _GROUP_METADATA)
    opened = compat.run(_open_arrays(zstore, names, group.metadata.zarr_format))
    config = {"write_empty_chunks": WRITE_EMPTY_CHUNKS}
    arrays = {
        name: zarr.Array(a.with_config(config))
        for name, a in zip(names, opened, strict=True)
        if a is not None
    }
    if not arrays:
        return None
    dims = {name: array_dims(a) for name, a in arrays.items()}
    return StoreState(zstore, group, arrays, dims)


async def _top_level(zstore: ZarrStore) -> list[str]:
    return [key async for key in zstore.list_dir("")]


async def _open_arrays(zstore: ZarrStore, names: list[str], fmt: Literal[2, 3]) -> list[Any]:
    """The arrays ``names``, opened at once (one round trip to S3 rather than one per
    array); None for a name that is not an array (a subgroup, a stray file: not ours)."""
    from zarr.api.asynchronous import open_array

    async def one(name: str) -> Any:
        try:
            return await open_array(store=zstore, path=name, mode="r+", zarr_format=fmt)
        except FileNotFoundError:
            return None

    return list(await asyncio.gather(*map(one, names)))


def array_dims(array: zarr.Array) -> tuple[str, ...]:
    """Dimension names as xarray records them (``dimension_names`` in Zarr 3,
    ``_ARRAY_DIMENSIONS`` in Zarr 2)."""
    names: Any = getattr(array.metadata, "dimension_names", None)
    names = names or array.attrs.get("_ARRAY_DIMENSIONS") or ()
    return tuple(str(n) for n in names)


def committed_length(state: StoreState, dim: str) -> int:
    """The number of complete steps along ``dim``: the commit marker or, for a store
    written by something else, the common length of its arrays."""
    if COMMITTED in state.attrs:
        return int(state.attrs[COMMITTED])
    lengths = {name: state.length(name, dim) for name in state.along(dim)}
    if len(set(lengths.values())) > 1:
        raise PermanentError(
            f"the arrays of the store differ in length along {dim} ({lengths}) and it"
            " has no dpypeline commit marker, so which steps are complete is unknown: repair"
            " it by hand, or write to a new store"
        )
    return next(iter(lengths.values()), 0)


def repair(state: StoreState, dim: str, committed: int) -> dict[str, int]:
    """Cut every array back to ``committed`` steps along ``dim``, deleting the chunks a
    crashed write left beyond. Returns the arrays cut, with the lengths they had."""
    cut = {}
    for name in state.along(dim):
        length = state.length(name, dim)
        if length < committed:
            raise PermanentError(
                f"array {name!r} has {length} steps along {dim} but the commit marker says"
                f" {committed} are complete: the store was changed by something else; repair"
                " it by hand, or write to a new store"
            )
        if length > committed:
            resize(state, name, dim, committed)
            cut[name] = length
    return cut


def resize(state: StoreState, name: str, dim: str, length: int) -> None:
    array = state.arrays[name]
    shape = list(array.shape)
    shape[state.dims[name].index(dim)] = length
    array.resize(tuple(shape))


def grow(state: StoreState, dim: str, length: int) -> None:
    """Resize every array along ``dim`` to ``length`` (failpoint ``before_resize`` first)."""
    failpoint("before_resize")

    async def each() -> None:
        resizes = []
        for name, array in state.along(dim).items():
            shape = list(array.shape)
            shape[state.dims[name].index(dim)] = length
            resizes.append(array.async_array.resize(tuple(shape)))
        await asyncio.gather(*resizes)

    compat.run(each())  # at once: one round trip to S3 rather than one per array


def misaligned(state: StoreState, dim: str, start: int, stop: int, length: int) -> dict[str, int]:
    """The arrays whose chunks along ``dim`` the write ``[start, stop)`` would cut, with
    their chunk size. A write may end inside a chunk only where the array ends
    (``length``): that chunk holds nothing else."""
    bad = {}
    for name, array in state.along(dim).items():
        size = int(array.chunks[state.dims[name].index(dim)])
        if start % size or (stop % size and stop != length):
            bad[name] = size
    return bad


def commit(state: StoreState, attrs: Mapping[str, Any], consolidated: bool) -> None:
    """The commit point of a write: the markers (failpoint ``before_commit`` first)."""
    failpoint("before_commit")
    save_group(state, attrs, consolidated)


def save_group(state: StoreState, attrs: Mapping[str, Any], consolidated: bool) -> None:
    """Update the group's attributes and, in the same write, its consolidated metadata
    (what readers open the store with), made from the arrays as this write left them
    rather than by reading the whole store back. Without ``consolidated``, a consolidated
    copy left from earlier is removed, so that no reader is served a stale one."""
    members = state.arrays if consolidated else None
    state.group = compat.consolidating(state.group, members).update_attributes(dict(attrs))
    if not consolidated and state.zarr_format == 2:
        compat.run(state.zstore.delete(".zmetadata"))
