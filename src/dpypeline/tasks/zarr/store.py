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

import numpy as np

from dpypeline.errors import ConfigError, PermanentError
from dpypeline.tasks.zarr import layout as zarrlayout
from dpypeline.tasks.zarr.layout import Compressor, source_chunks, store_chunks

if TYPE_CHECKING:
    import xarray as xr
    import zarr
    from zarr.abc.store import Store as ZarrStore

COMMITTED = "dpypeline_committed"
APPEND_DIM = "dpypeline_append_dim"
WRITTEN = "dpypeline_written"
MARKERS = (COMMITTED, APPEND_DIM, WRITTEN)
# What xarray needs to encode a variable as a store holds it. The rest of a NetCDF
# source's encoding (chunksizes, zlib, shuffle, contiguous, source …) means nothing to Zarr.
CF_ENCODING = ("dtype", "units", "calendar", "_FillValue", "missing_value", "scale_factor",
               "add_offset", "coordinates")  # fmt: skip
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

    @property
    def lock_key(self) -> str:
        """The store lock's name, the same in every process (for ``distributed.Lock``)."""
        return f"dpypeline-zarr:{self.url}"

    def open(self) -> ZarrStore:
        """The zarr store. An S3 store's client is made once per process and kept: each
        new s3fs client would open (and leak) an HTTP session of its own."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:
            return LocalStore(self.url)
        key = (self.url, json.dumps(self.storage_options, sort_keys=True, default=str))
        with _LOCKS_GUARD:
            if key not in _S3_STORES:
                from zarr.core.sync import sync

                from dpypeline.objectstore import S3FS_TRIES, keep_open

                store = FsspecStore.from_url(
                    self.url, storage_options=dict(self.storage_options or {})
                )
                store.fs.retries = S3FS_TRIES  # botocore alone retries, within the timeouts
                keep_open(store.fs, sync)  # zarr runs the client on its own event loop
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
    stores; ``location.lock_key`` names the store for such cluster-wide coordination.
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
    from zarr.core.sync import sync

    found = sync(_top_level(zstore))
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
    opened = sync(_open_arrays(zstore, names, group.metadata.zarr_format))
    arrays = {name: zarr.Array(a) for name, a in zip(names, opened, strict=True) if a is not None}
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
    from zarr.core.sync import sync

    failpoint("before_resize")

    async def each() -> None:
        resizes = []
        for name, array in state.along(dim).items():
            shape = list(array.shape)
            shape[state.dims[name].index(dim)] = length
            resizes.append(array.async_array.resize(tuple(shape)))
        await asyncio.gather(*resizes)

    sync(each())  # at once: one round trip to S3 rather than one per array


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
    import dataclasses

    import zarr
    from zarr.core.group import AsyncGroup, ConsolidatedMetadata
    from zarr.core.sync import sync

    metadata = state.group.metadata
    if consolidated:
        members = {name: array.metadata for name, array in state.arrays.items()}
        metadata = dataclasses.replace(
            metadata,
            consolidated_metadata=ConsolidatedMetadata(metadata=members),  # type: ignore[arg-type]
        )
    group = zarr.Group(AsyncGroup(metadata=metadata, store_path=state.group.store_path))
    state.group = group.update_attributes(dict(attrs))
    if not consolidated and state.zarr_format == 2:
        sync(state.zstore.delete(".zmetadata"))


def write_new(
    ds: xr.Dataset,
    zstore: ZarrStore,
    state: StoreState | None,
    zarr_format: int,
    *,
    layout: Layout,
    attrs: Mapping[str, Any],
) -> None:
    """Write ``ds`` as a new store with group attributes ``ds.attrs | attrs``, replacing
    ``state``'s arrays (a crashed creation) if given; encodings by :func:`new_encoding`.
    Every variable is written in one dask computation, so all cores work on it."""
    if state is not None:  # arrays first: until the group goes, the store is recognisable
        for array in state.arrays:
            del state.group[array]
    out = ds.copy()
    out.encoding = {}
    for name in list(out.variables):
        var = out.variables[name]
        with _about(str(name), var):
            encoding = new_encoding(str(name), var, layout, zarr_format)
            if var.chunks is not None:
                var = var.chunk(dict(zip(var.dims, encoding["chunks"], strict=True)))
        var.encoding = encoding
        out[name] = var
    out.attrs = {k: v for k, v in ds.attrs.items() if k not in MARKERS} | dict(attrs)
    try:
        out.to_zarr(zstore, mode="w", consolidated=False, zarr_format=zarr_format)
    except (ValueError, TypeError):
        _name_the_culprit(out, zarr_format)
        with _about(None, None):
            raise


def _name_the_culprit(ds: xr.Dataset, zarr_format: int) -> None:
    """Find which variable of a dataset that failed to write is the cause, by writing
    each one's metadata alone to memory, and raise the PermanentError that names it."""
    import xarray as xr
    from zarr.storage import MemoryStore

    for name, var in ds.variables.items():
        with _about(str(name), var):
            one = (
                xr.Dataset({name: var}) if name not in var.dims else xr.Dataset(coords={name: var})
            )
            one.to_zarr(MemoryStore(), mode="w", compute=False, zarr_format=zarr_format)
    with _about(None, None):
        xr.Dataset(attrs=ds.attrs).to_zarr(MemoryStore(), mode="w", zarr_format=zarr_format)


@dataclass(frozen=True)
class Layout:
    """What decides a new store's arrays: chunk sizes from ``to_zarr``'s ``chunks:`` (by
    dimension, -1 whole), the append or region dimension, and the codec."""

    along: str | None = None
    chunks: Mapping[str, int] = field(default_factory=dict)
    compressor: Compressor = field(default_factory=Compressor)


def new_encoding(name: str, var: xr.Variable, layout: Layout, zarr_format: int) -> dict[str, Any]:
    """A new array's encoding: the source's CF encoding (units, calendar, dtype, fill
    value …), chunks by the store's policy (:func:`dpypeline.tasks.zarr.layout.store_chunks`:
    never the file's own chunks) and the layout's codec."""
    enc = {k: var.encoding[k] for k in CF_ENCODING if k in var.encoding}
    if "dtype" in var.encoding and "_FillValue" not in var.encoding:
        enc["_FillValue"] = None  # the source file had none: do not invent one
    fill, missing = enc.get("_FillValue"), enc.get("missing_value")
    if fill is not None and missing is not None and not np.array_equal(fill, missing, True):
        del enc["missing_value"]  # xarray refuses both; the data are masked (NaN) already
    itemsize = np.dtype(enc.get("dtype", var.dtype)).itemsize
    enc["chunks"] = store_chunks(
        name,
        [str(d) for d in var.dims],
        var.shape,
        itemsize,
        along=layout.along,
        overrides=layout.chunks,
        source=source_chunks(var),
    )
    if np.dtype(enc.get("dtype", var.dtype)).kind not in "OUS":  # text keeps zarr's codec
        enc |= layout.compressor.encoding(zarr_format, itemsize)
    return enc


def read_along_source(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every variable larger than a store chunk made lazy along the file's own
    chunks (where it was opened without dask), so that writing reads each chunk of the file
    once and never holds a whole large variable in memory; a contiguous variable, which
    can be read in any slices at no extra cost, is read in slices of the store's chunks."""
    out = ds.copy()
    for name, var in ds.variables.items():
        if var.chunks is not None or var.nbytes <= zarrlayout.TARGET_CHUNK_BYTES:
            continue
        chunks = source_chunks(var)
        if not chunks:
            chunks = dict(zip(map(str, var.dims), new_encoding(
                str(name), var, Layout(), 2)["chunks"], strict=True))  # fmt: skip
        out[name] = var.chunk({d: chunks.get(str(d), -1) for d in var.dims})
    return out


def open_lazy(state: StoreState) -> xr.Dataset:
    """The store as xarray decodes it, every variable lazy (no index is loaded): the
    variables' dtypes and encodings for the checks and for encoding new data. From the
    consolidated metadata when it lists the same arrays (shapes may be stale there: data
    are read from ``state.arrays``), else from the arrays themselves."""
    import xarray as xr

    def open_(consolidated: bool) -> xr.Dataset:
        return xr.open_zarr(
            state.zstore,
            consolidated=consolidated,
            chunks=None,
            zarr_format=state.zarr_format,
            create_default_indexes=False,
            decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        )

    try:
        ds = open_(consolidated=True)
        if set(map(str, ds.variables)) == set(state.arrays):
            return ds
    except (FileNotFoundError, KeyError, ValueError):  # no consolidated metadata
        pass
    return open_(consolidated=False)


def encode_like(var: xr.Variable, stored: xr.Variable) -> xr.Variable:
    """``var`` encoded as the store encodes ``stored`` (units, calendar, dtype, fill
    value); lazily if it is a dask array larger than a chunk may be, else in memory."""
    from xarray.conventions import encode_cf_variable

    v = var.copy(deep=False)
    if v.chunks is not None and v.nbytes <= zarrlayout.TARGET_CHUNK_BYTES:
        # read at once: for a small variable dask's per-task cost is most of the work
        # (encoding alone computes its first element to look for cftime dates)
        v = v.compute(scheduler="synchronous")
    v.encoding = {k: stored.encoding[k] for k in CF_ENCODING if k in stored.encoding}
    v.encoding.pop("coordinates", None)  # a dataset-level matter, not this variable's
    return encode_cf_variable(v)


def raw(var: xr.Variable, stored: xr.Variable) -> np.ndarray:
    return np.asarray(encode_like(var, stored).values)


def write_arrays(
    variables: list[tuple[str, xr.Variable, xr.Variable]],
    state: StoreState,
    *,
    dim: str,
    start: int,
) -> None:
    """Each ``(name, var, stored)``: ``var`` encoded like the store's ``stored``, into array
    ``name`` from ``start`` along ``dim``, all in one dask computation (so every core works,
    and each file chunk is read once: one dask task per store chunk, which gathers the file
    chunks it holds). Alignment was checked, so every chunk is written whole, never read
    back."""
    sources, targets, regions = [], [], []
    for name, var, stored in variables:
        array = state.arrays[name]
        where = _region(state, name, dim, start, var.sizes[dim])
        with _about(name, var):
            encoded = encode_like(var, stored)
            if encoded.chunks is None:
                array[where] = encoded.values
                continue
            sources.append(encoded.data.rechunk(array.chunks))
        targets.append(array)
        regions.append(where)
    if sources:
        import dask.array

        with _about(None, None):
            dask.array.store(sources, targets, regions=regions, lock=False)  # type: ignore[arg-type]


@contextmanager
def _about(name: str | None, var: xr.Variable | None) -> Iterator[None]:
    """Errors that say the data do not fit the store (xarray's and zarr's ValueError and
    TypeError: the same every time) as a PermanentError naming the variable, its chunks
    as read and what to set."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if name is None:
            what = "the dataset"
        else:
            chunks = source_chunks(var) if var is not None else {}
            what = f"variable {name} (chunks as read: {chunks or 'none'})"
        detail = " ".join(str(exc).split())[:300]
        raise PermanentError(
            f"{what} cannot be written to the Zarr store: {type(exc).__name__}: {detail}."
            " Check open_dataset's `chunks:` and to_zarr's `chunks:`/`compressor:`, or fix"
            " the variable with a task before to_zarr"
        ) from exc


def same(
    var: xr.Variable, stored: xr.Variable, state: StoreState, name: str, *,
    dim: str | None = None, start: int = 0,
) -> bool:  # fmt: skip
    """Whether ``var`` is what the store holds (from ``start`` along ``dim``), compared as
    stored, NaN equal to NaN."""
    new = raw(var, stored)
    old = np.asarray(state.arrays[name][_region(state, name, dim, start, var.sizes.get(dim, 0))])
    nan = new.dtype.kind in "fc" and old.dtype.kind in "fc"
    return new.shape == old.shape and bool(np.array_equal(new, old, equal_nan=nan))


def decode_values(values: np.ndarray, stored: xr.Variable) -> list[str]:
    """Raw values of ``stored`` as a reader sees them (dates for times), for messages."""
    import xarray as xr

    attrs = {k: stored.encoding[k] for k in ("units", "calendar") if k in stored.encoding}
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    var = xr.conventions.decode_cf_variable(
        "v", xr.Variable("i", values, attrs), decode_times=coder
    )
    return [str(v) for v in var.values]


def _region(
    state: StoreState, name: str, dim: str | None, start: int, size: int
) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) if d == dim else slice(None) for d in state.dims[name])
