"""How a dataset becomes a store's arrays: a new store's encodings and chunks, a file's
variables encoded as the store holds them, and writes of whole chunks in one dask
computation. The store-level protocol (locking, committing, repairing) is in
:mod:`dpypeline.tasks.zarr.store`; the layout policy in :mod:`dpypeline.tasks.zarr.layout`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dpypeline.errors import PermanentError
from dpypeline.tasks.zarr import layout as zarrlayout
from dpypeline.tasks.zarr.layout import Compressor, source_chunks, store_chunks
from dpypeline.tasks.zarr.store import MARKERS, WRITE_EMPTY_CHUNKS, StoreState

if TYPE_CHECKING:
    import xarray as xr
    from zarr.abc.store import Store as ZarrStore

# What xarray needs to encode a variable as a store holds it. The rest of a NetCDF
# source's encoding (chunksizes, zlib, shuffle, contiguous, source …) means nothing to Zarr.
CF_ENCODING = ("dtype", "units", "calendar", "_FillValue", "missing_value", "scale_factor",
               "add_offset", "coordinates")  # fmt: skip


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
    from dpypeline.tasks import repository

    versioned = repository.is_repository_store(zstore)
    options: dict[str, Any] = {"compute": not versioned}  # versioned: metadata only, here
    try:
        out.to_zarr(
            zstore,
            mode="w",
            consolidated=False,
            zarr_format=zarr_format,
            write_empty_chunks=WRITE_EMPTY_CHUNKS,
            **options,
        )
    except (ValueError, TypeError):
        _name_the_culprit(out, zarr_format)
        with _about(None, None):
            raise
    if versioned:  # the metadata and the data in memory are written; the rest goes here
        _write_lazy(out, zstore, layout.along)


def _write_lazy(ds: xr.Dataset, zstore: ZarrStore, dim: str | None) -> None:
    """The dask-backed variables of ``ds``, into the arrays just made for them, in the
    way that keeps a repository session's changes wherever the chunks are written
    (:func:`dpypeline.tasks.repository.store_dask`)."""
    from dpypeline.tasks.zarr.store import open_store

    state = open_store(zstore, "")
    lazy = [str(n) for n, v in ds.variables.items() if v.chunks is not None]
    if state is None or not lazy:
        return
    stored = open_lazy(state)
    variables = [(n, ds[n].variable, stored[n].variable) for n in lazy]
    write_arrays(variables, state, dim=dim or "", start=0)


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
        where = _region(state, name, dim, start, var.sizes.get(dim, 0))
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

        from dpypeline.tasks import repository

        with _about(None, None):
            if not repository.store_dask(sources, targets, regions):
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
