"""The ``to_zarr`` task: one file's dataset into a Zarr store, exactly once in effect.

Two modes. *Append* (``append_dim``): the file's steps go after the store's last step; the
first file creates the store. *Region* (``region``): the store is a template that already
has the whole coordinate along the dimension (:func:`create_template`); each file's steps
are located by their coordinate values and written into that slice, so files may arrive
in any order.

Each write is one sequence under the store's lock (:func:`dpypeline.tasks.zarr.store.store_lock`):
read the committed state afresh, cut off what a crashed write left, check the file against
the store (variables, dimensions, dtypes, and the values of the variables without the
dimension, such as nav_lat), place its steps, check chunk alignment, write, commit. The
crash-consistency protocol is described in :mod:`dpypeline.tasks.zarr.store`. When the file's
steps are already in the store (a replay after a crash, or ``dpypeline retry``), the
``overlap`` policy decides. A file that overlaps stored steps only in part, or comes before
the end of an append store without being in it, is refused: every refusal is a
PermanentError whose message says what differs and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dpypeline.commits import Commit, commits
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.tasks.zarr import store as zs
from dpypeline.tasks.zarr.layout import Compressor
from dpypeline.tasks.zarr.store import StoreState, failpoint

if TYPE_CHECKING:
    import xarray as xr

Overlap = Literal["replace", "skip", "forbid"]
OVERLAPS = ("replace", "skip", "forbid")


def _store(kwargs: Mapping[str, Any]) -> Commit | None:
    """Writes to one store commit one at a time; an append store's in queue order (a
    template store's in any)."""
    store = kwargs.get("store")
    if not isinstance(store, str):
        return None
    try:
        url = zs.locate(store).url
    except ConfigError:
        return None  # to_zarr refuses it itself, with the reason
    return Commit(url, ordered=kwargs.get("append_dim") is not None)


@commits(_store)
def to_zarr(
    ds: xr.Dataset,
    store: str,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    objectstore: str | None = None,
    storage_options: dict[str, Any] | None = None,
    zarr_format: int = 2,
    overlap: Overlap = "replace",
    consolidated: bool = True,
    chunks: dict[str, int] | None = None,
    compressor: str | dict[str, Any] | None = None,
    context: Any = None,
) -> str:
    """Write ``ds`` into the Zarr store ``store`` (a local path or ``s3://bucket/key``);
    return the store's URL.

    ``append_dim``: append along this dimension, creating the store with the first file.
    ``region``: the dimension along which to locate the file's steps in a template store.
    ``objectstore``: the ``objectstores:`` entry that reaches an s3:// store (or give s3fs
    ``storage_options`` directly). ``zarr_format``: 2, the default, because zarr-python 2
    and most other tools JASMIN users read Zarr with read only that (zarr-python 3 reads
    both); or 3. It applies when a store is created; an existing store keeps its format.
    ``overlap``: when the file's steps are already in the store, ``replace`` writes them
    again (the default: a replay after a crash), ``skip`` leaves them if identical and
    refuses a file that differs, ``forbid`` refuses. ``consolidated``: keep consolidated
    metadata, so readers open the store in one request and see only committed steps.
    ``chunks``: chunk sizes of a new store by dimension, ``-1`` for the whole dimension;
    the default is one step along ``append_dim`` and the other dimensions whole, the
    largest halved until a chunk holds at most 64 MiB (:mod:`dpypeline.tasks.zarr.layout`). The
    file's own chunks are how it is read, never how the store is laid out: each chunk of
    the file is read once and the data re-chunked as they are written. ``compressor``: the
    codec of a new store's arrays, a name (``blosc-zstd``, ``blosc-lz4``, ``blosc-zlib``,
    ``zstd``, ``zlib``, ``none``) or ``{codec, level, shuffle}``; the default is
    ``{codec: blosc-zstd, level: 3, shuffle: byte}``. An existing store keeps its chunks
    and codecs, whatever these say.
    Logs ``zarr_appended``, ``zarr_region_written`` or ``zarr_replayed`` with the steps.
    """
    if (append_dim is None) == (region is None):
        raise ConfigError("to_zarr: set exactly one of append_dim (append) or region (template)")
    if overlap not in OVERLAPS:
        raise ConfigError(f"to_zarr: overlap must be one of {', '.join(OVERLAPS)}, not {overlap!r}")
    if zarr_format not in (2, 3):
        raise ConfigError(f"to_zarr: zarr_format must be 2 or 3, not {zarr_format!r}")
    dim = str(append_dim or region)
    layout = zs.Layout(dim, dict(chunks or {}), Compressor.parse(compressor))
    if dim not in ds.dims or dim not in ds.variables or not ds.sizes[dim]:
        raise PermanentError(
            f"the dataset has no steps along a coordinate {dim!r} (dimensions:"
            f" {dict(ds.sizes)}): check append_dim or region, or the file"
        )
    location = zs.locate(store, _storage_options(objectstore, storage_options, context))
    with _classified(location, objectstore, context), zs.store_lock(location):
        write = _Write(zs.read_along_source(ds), dim, location.url, overlap, consolidated)
        zstore = location.open()
        state = zs.open_store(zstore, location.url)
        if region is not None:
            event = write.region(state)
        else:
            event = write.append(zstore, state, zarr_format, layout)
    if (log := getattr(context, "log", None)) is not None:
        log.info(event.pop("event"), store=location.url, **event)
    return location.url


@dataclass
class _Write:
    """One file's write into one store, under the store's lock."""

    ds: xr.Dataset
    dim: str
    url: str
    overlap: Overlap
    consolidated: bool
    state: StoreState = field(init=False)
    stored: xr.Dataset = field(init=False)  # the store as xarray decodes it, lazily

    def append(
        self, zstore: Any, state: StoreState | None, zarr_format: int, layout: zs.Layout
    ) -> dict[str, Any]:
        ds, dim, n = self.ds, self.dim, self.ds.sizes[self.dim]
        info: dict[str, Any] = {"steps": [0, n], **_span(ds, dim)}
        if state is None or (zs.APPEND_DIM in state.attrs and zs.COMMITTED not in state.attrs):
            attrs = {zs.APPEND_DIM: dim}
            zs.write_new(ds, zstore, state, zarr_format, layout=layout, attrs=attrs)
            created = zs.open_store(zstore, self.url)
            assert created is not None
            zs.commit(created, {zs.COMMITTED: n}, self.consolidated)
            return {"event": "zarr_appended", "created": True} | info
        if state.attrs.get(zs.APPEND_DIM, dim) != dim:
            raise PermanentError(
                f"{self.url} is appended along {state.attrs[zs.APPEND_DIM]!r}, not {dim!r}:"
                " fix append_dim"
            )
        committed = zs.committed_length(state, dim)
        if repaired := zs.repair(state, dim, committed):
            info["repaired"] = repaired
        self.check(state)
        start = self.place_append(committed)
        info["steps"] = [start, start + n]
        if start < committed:
            self.check_alignment(start, committed)
            return self.replay(start, write_index=True) | info
        self.check_alignment(start, start + n)
        zs.grow(state, dim, start + n)
        self.write_arrays(start, write_index=True)
        zs.commit(state, {zs.APPEND_DIM: dim, zs.COMMITTED: start + n}, self.consolidated)
        return {"event": "zarr_appended"} | info

    def region(self, state: StoreState | None) -> dict[str, Any]:
        if state is None or self.dim not in state.arrays:
            raise PermanentError(
                f"{self.url} is not a template with a {self.dim} coordinate: create it first"
                " (dpypeline.tasks.zarr.to_zarr.create_template), or use append_dim"
            )
        written = [(int(a), int(b)) for a, b in state.attrs.get(zs.WRITTEN, [])]
        if zs.COMMITTED in state.attrs:  # an append store, used as a template
            zs.repair(state, self.dim, int(state.attrs[zs.COMMITTED]))
            written.append((0, int(state.attrs[zs.COMMITTED])))
        self.check(state)
        length = state.length(self.dim, self.dim)
        start, stop = self.locate(length, template=True)
        self.check_alignment(start, length)
        info = {"steps": [start, stop], **_span(self.ds, self.dim)}
        covered = sum(max(0, min(stop, b) - max(start, a)) for a, b in _merge(written))
        if covered == stop - start:
            return self.replay(start, write_index=False) | info
        if covered:
            raise PermanentError(
                f"{_steps(self.ds, self.dim)} of the file overlap steps already written to"
                f" {self.url} only in part: a file must cover whole steps written before, or none"
            )
        self.write_arrays(start, write_index=False)
        regions = [list(r) for r in _merge([*written, (start, stop)])]
        zs.commit(state, {zs.WRITTEN: regions}, self.consolidated)
        return {"event": "zarr_region_written"} | info

    def replay(self, start: int, *, write_index: bool) -> dict[str, Any]:
        """The file's steps are already in the store: apply the overlap policy."""
        n = self.ds.sizes[self.dim]
        what = f"{_steps(self.ds, self.dim)} of the file are already in {self.url}"
        what += f" (steps {start}..{start + n - 1})"
        if self.overlap == "forbid":
            raise PermanentError(
                f"{what}; overlap=forbid refuses to write them again. If the file was"
                " corrected, set overlap: replace"
            )
        if self.overlap == "skip":
            if differ := [n for n in _along(self.ds, self.dim) if not self.same(n, start)]:
                raise PermanentError(
                    f"{what} with different values of {', '.join(differ)}; overlap=skip keeps"
                    " the store as it is. To overwrite them, set overlap: replace"
                )
            action = "skipped_identical"
        else:
            self.write_arrays(start, write_index=write_index)
            action = "replaced"
        zs.save_group(self.state, {}, self.consolidated)  # if the last attempt died before it
        return {"event": "zarr_replayed", "action": action}

    def write_arrays(self, start: int, *, write_index: bool) -> None:
        """The data variables first (in one computation), then the other variables along
        the dimension, then (in append mode) its coordinate: a reader that finds the
        coordinate finds the data."""
        names = [n for n in _along(self.ds, self.dim) if n != self.dim]
        data = [n for n in names if n in self.ds.data_vars]
        groups = [data, [n for n in names if n not in data]]
        for i, group in enumerate(groups):
            if i == 1 and data:
                failpoint("between_arrays")
            self._write(group, start)
        failpoint("before_coordinate")
        if write_index:
            self._write([self.dim], start)

    def _write(self, names: list[str], start: int) -> None:
        variables = [(n, self.ds[n].variable, self.stored[n].variable) for n in names]
        zs.write_arrays(variables, self.state, dim=self.dim, start=start)

    def same(self, name: str, start: int | None = None) -> bool:
        var, stored = self.ds[name].variable, self.stored[name].variable
        dim = self.dim if start is not None else None
        return zs.same(var, stored, self.state, name, dim=dim, start=start or 0)

    def check(self, state: StoreState) -> None:
        """Open the store as xarray decodes it and check that the file matches it."""
        self.state, self.stored = state, zs.open_lazy(state)
        ds, stored, dim = self.ds, self.stored, self.dim
        mine, theirs = set(map(str, ds.variables)), set(map(str, stored.variables))
        problems = []
        if extra := sorted(mine - theirs):
            problems.append(f"variables not in the store: {', '.join(extra)}")
        if missing := sorted(theirs - mine):
            problems.append(f"variables missing from the file: {', '.join(missing)}")
        for name in sorted(mine & theirs):
            a, b = ds[name].variable, stored[name].variable
            if a.dims != b.dims:
                problems.append(f"{name} has dimensions {a.dims}, the store's {b.dims}")
            elif _dtype(a) != _dtype(b):
                problems.append(f"{name} is {_dtype(a)}, the store's is {_dtype(b)}")
        for d, size in ds.sizes.items():
            if d != dim and d in stored.sizes and size != stored.sizes[d]:
                problems.append(f"dimension {d} has {size} points, the store's {stored.sizes[d]}")
        fixed = [n for n in sorted(mine & theirs) if dim not in ds[n].dims]
        if not problems and (differ := [n for n in fixed if not self.same(n)]):
            problems.append(f"values of {', '.join(differ)} differ from the store's")
        if problems:
            raise PermanentError(
                f"the file does not match {self.url}: {'; '.join(problems)}. Every file written"
                " to one store must have the same variables, dimensions and dtypes, and the"
                f" same values of the variables without {dim} (nav_lat, nav_lon, depth …):"
                " write this file to another store, or fix it with a task before to_zarr"
            )

    def place_append(self, committed: int) -> int:
        """Where the file's steps go: at ``committed`` if they all come after the last step
        (one value read), else where they already are (a replay)."""
        if committed == 0:
            return 0
        first = zs.raw(self.ds[self.dim].variable, self.stored[self.dim].variable)[0]
        if first > np.asarray(self.state.arrays[self.dim][committed - 1]):
            return committed
        return self.locate(committed, template=False)[0]

    def locate(self, length: int, *, template: bool) -> tuple[int, int]:
        """The slice of the store's first ``length`` steps whose coordinate values are
        exactly the file's, in order."""
        ds, dim, url = self.ds, self.dim, self.url
        new = zs.raw(ds[dim].variable, self.stored[dim].variable)
        if np.any(np.diff(new) <= 0):
            raise PermanentError(f"the file's {dim} values are not increasing: fix the file")
        old = np.asarray(self.state.arrays[dim][:length])
        index = {v: i for i, v in enumerate(old.tolist())}
        found = [index.get(v) for v in new.tolist()]
        if found[0] is not None and found == list(range(found[0], found[0] + len(found))):
            return found[0], found[0] + len(found)
        if any(i is not None for i in found):
            raise PermanentError(
                f"{_steps(ds, dim)} of the file overlap the steps of {url} only in part: a"
                " file must cover whole steps already written, or none"
            )
        first, last = zs.decode_values(old[[0, -1]], self.stored[dim].variable)
        if template:
            raise PermanentError(
                f"{_steps(ds, dim)} of the file are not in the template {url} ({dim} from"
                f" {first} to {last}): extend the template, or check the file's {dim}"
            )
        raise PermanentError(
            f"{_steps(ds, dim)} of the file come before the last step of {url} ({last}) but"
            " are not in it: append mode only adds steps after the last one. To write files"
            f" in any order or fill gaps, create a template store with the whole {dim} axis"
            f" (create_template) and write with region: {dim}"
        )

    def check_alignment(self, start: int, length: int) -> None:
        stop = start + self.ds.sizes[self.dim]
        if bad := zs.misaligned(self.state, self.dim, start, stop, length):
            sizes = ", ".join(f"{n}: {c}" for n, c in bad.items())
            raise PermanentError(
                f"writing steps {start}..{stop - 1} along {self.dim} of {self.url} would rewrite"
                f" part of a chunk that also holds other steps (steps per chunk: {sizes}), which"
                " a crash could leave half written. Each write must fill whole chunks: write"
                " files whose number of steps is a multiple of the chunk, or create the store"
                f" with chunks of 1 step (to_zarr `chunks: {{{self.dim}: 1}}`)"
            )


def create_template(
    ds: xr.Dataset,
    store: str,
    dim: str,
    values: Any,
    *,
    chunks: dict[str, int] | None = None,
    zarr_format: int = 2,
    storage_options: dict[str, Any] | None = None,
    consolidated: bool = True,
    compressor: str | dict[str, Any] | None = None,
) -> str:
    """Create a template store for ``to_zarr(region=dim)``; return its URL.

    ``ds`` is a sample file: the template gets its variables, attributes, encodings and
    the values of its variables without ``dim`` (nav_lat …). Along ``dim`` it gets the
    coordinate ``values`` (the whole axis, e.g. the middle of every year of a run) and no
    data: a step reads as fill values (NaN for float variables) until a file with it is
    written. ``chunks`` and ``compressor`` as for :func:`to_zarr`; along ``dim`` the
    default is the sample's number of steps. Replaces whatever Zarr store is at ``store``.
    """
    import xarray as xr

    location = zs.locate(store, storage_options)
    axis = xr.Variable((dim,), np.asarray(values))
    along = (chunks or {}).get(dim) or ds.sizes[dim]
    layout = zs.Layout(dim, dict(chunks or {}) | {dim: along}, Compressor.parse(compressor))
    with zs.store_lock(location):
        zstore = location.open()
        old = zs.open_store(zstore, location.url)
        zs.write_new(
            ds,
            zstore,
            old,
            zarr_format,
            layout=layout,
            attrs={zs.WRITTEN: []},
        )
        state = zs.open_store(zstore, location.url)
        assert state is not None
        for name in state.along(dim):
            zs.resize(state, name, dim, 0)  # drops the sample's chunks
            zs.resize(state, name, dim, len(axis))
        stored = zs.open_lazy(state)[dim].variable
        zs.write_arrays([(dim, axis, stored)], state, dim=dim, start=0)
        zs.save_group(state, {}, consolidated)
    return location.url


def plan_layout(
    ds: xr.Dataset,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    chunks: dict[str, int] | None = None,
    compressor: str | dict[str, Any] | None = None,
    zarr_format: int = 2,
    **_: Any,
) -> list[dict[str, Any]]:
    """How :func:`to_zarr` with these arguments lays out a new store for ``ds``: per
    variable its dimensions, its chunks as read, the store's chunks, a chunk's size
    uncompressed and the codec (``dpypeline validate --sample``)."""
    layout = zs.Layout(append_dim or region, dict(chunks or {}), Compressor.parse(compressor))
    ds = zs.read_along_source(ds)
    rows = []
    for name, var in sorted(ds.variables.items(), key=lambda item: str(item[0])):
        enc = zs.new_encoding(str(name), var, layout, zarr_format)
        itemsize = np.dtype(enc.get("dtype", var.dtype)).itemsize
        rows.append(
            {
                "variable": str(name),
                "dims": dict(var.sizes),
                "read_chunks": zs.source_chunks(var),
                "store_chunks": dict(zip(map(str, var.dims), enc["chunks"], strict=True)),
                "chunk_bytes": int(np.prod(enc["chunks"])) * itemsize,
                "codec": str(layout.compressor) if "compressors" in enc else "zarr's default",
            }
        )
    return rows


def _dtype(var: xr.Variable) -> str:
    """The dtype, with every kind of decoded time (datetime64 or cftime) as "datetime"."""
    if var.dtype.kind == "M" or " since " in str(var.encoding.get("units")):
        return "datetime"
    if var.dtype.kind == "O" and var.size:
        import cftime

        if isinstance(var[(0,) * var.ndim].values[()], cftime.datetime):
            return "datetime"
    return str(var.dtype)


def _along(ds: xr.Dataset, dim: str) -> list[str]:
    return [str(n) for n, v in ds.variables.items() if dim in v.dims]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _span(ds: xr.Dataset, dim: str) -> dict[str, str]:
    values = ds[dim].values
    return {"first": str(values[0]), "last": str(values[-1])}


def _steps(ds: xr.Dataset, dim: str) -> str:
    span = _span(ds, dim)
    if span["first"] == span["last"]:
        return f"the step {dim}={span['first']}"
    return f"the steps {dim}={span['first']} to {span['last']}"


def _storage_options(
    objectstore: str | None, storage_options: dict[str, Any] | None, context: Any
) -> dict[str, Any] | None:
    if objectstore is None:
        return storage_options
    if storage_options:
        raise ConfigError("to_zarr: set objectstore or storage_options, not both")
    if (stores := getattr(context, "objectstores", None)) is None:
        raise ConfigError("to_zarr: objectstore needs the job's context (run it in a pipeline)")
    from dpypeline.objectstore import storage_options as options

    return options(stores, objectstore)


def _classified(
    location: zs.Location, objectstore: str | None, context: Any
) -> AbstractContextManager[None]:
    """Failures as dpypeline errors: S3's (an outage: Unavailable; credentials:
    PermanentError), and a full disk under a local store (an outage of that disk)."""
    if not location.remote:
        from dpypeline.outages import disk_full_is_outage

        return disk_full_is_outage("writing the Zarr store", location.url)
    from dpypeline.objectstore import classify_errors

    config = (getattr(context, "objectstores", None) or {}).get(objectstore)
    return classify_errors(f"writing {location.url}", objectstore=objectstore, config=config)
