"""NetCDF input: ``open_dataset`` and ``clean_dataset``, the first tasks of an ingest job.

``open_dataset`` turns "this file is not NetCDF" (empty, truncated, text) into a
:class:`PermanentError` that names the file, so a bad upload ends ``dead`` with a reason at
once instead of being retried. ``clean_dataset`` is the original dpypeline's missing/fill
value handling, made safe for ``to_zarr``.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from dpypeline.errors import ConfigError, PermanentError

if TYPE_CHECKING:
    import xarray as xr

ENGINES = ("netcdf4", "h5netcdf")


class _LibraryLock:
    """The process's lock around the HDF5 and netCDF-C libraries, which are not
    thread-safe. xarray locks only part of what it asks of them (not the metadata it reads
    while opening a file): concurrent opens in threads fail with "HDF error" or crash the
    process. Opening and every later read of data (xarray's ``lock``) hold this lock.
    Reentrant, since xarray takes it again inside an open; pickled (dask ships tasks), it
    is the receiving process's lock."""

    _lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> tuple[type[_LibraryLock], tuple[()]]:
        return (_LibraryLock, ())


_LIBRARY_LOCK = _LibraryLock()

# The values reading already made NaN, by the name of the dask array read: a dask array's
# name is a hash of how it was made, so a task that changes the data (a sentinel written
# back) makes a new name. ``clean_dataset`` skips its pass over data still as read when
# they are masked for its ``missing_value`` already. Bounded: a service reads for months.
_MASKED_ON_READ: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
_MASKED_ON_READ_MAX = 4096
_MASKED_ON_READ_LOCK = threading.Lock()  # files are opened in threads side by side


def _note_masked_on_read(ds: xr.Dataset) -> None:
    """Record, for each float data variable read into dask, the values that decoding
    turned into NaN: its ``_FillValue`` and ``missing_value`` where they have the data's
    own dtype (not when the variable is packed: the comparison was on packed values)."""
    for da in ds.data_vars.values():
        enc = da.encoding
        name = getattr(da.data, "name", None)
        if name is None or da.chunks is None or da.dtype.kind != "f":
            continue
        if "scale_factor" in enc or "add_offset" in enc or enc.get("dtype", da.dtype) != da.dtype:
            continue
        values = tuple(  # of another dtype, the value may not be the one compared
            v
            for key in ("_FillValue", "missing_value")
            for v in np.ravel(enc.get(key, np.array([], dtype=da.dtype)))
            if v.dtype == da.dtype
        )
        if values:
            with _MASKED_ON_READ_LOCK:
                _MASKED_ON_READ[name] = values
                _MASKED_ON_READ.move_to_end(name)
                while len(_MASKED_ON_READ) > _MASKED_ON_READ_MAX:
                    _MASKED_ON_READ.popitem(last=False)


def _masked_on_read(da: xr.DataArray, target: np.ndarray) -> bool:
    """Whether ``da`` holds data as read, where values equal to ``target`` are NaN already."""
    values = _MASKED_ON_READ.get(getattr(da.data, "name", None) or "", ())
    return any(v == target for v in values)  # values of the data's dtype, as recorded


def open_dataset(
    path: str,
    *,
    engine: str | None = None,
    chunks: dict[str, int] | None = None,
    use_cftime: bool | None = None,
    **kwargs: Any,
) -> xr.Dataset:
    """Open a NetCDF file lazily with xarray.

    ``engine``: ``netcdf4`` or ``h5netcdf`` (needs h5py); None lets xarray choose.
    ``chunks``: dask chunks, e.g. ``{time_counter: 1}``; None reads with numpy.
    ``use_cftime``: None decodes times of standard calendars to numpy datetime64 and keeps
    every other calendar (NEMO's ``360_day``, ``noleap`` …) as cftime objects; True always
    uses cftime. Times keep their ``units`` and ``calendar`` encoding, which ``to_zarr``
    writes back unchanged. Other keyword arguments go to :func:`xarray.open_dataset`.

    A missing file raises FileNotFoundError (the worker skips files that vanished). A file
    that is empty, truncated or not NetCDF at all raises PermanentError naming the file.
    """
    import xarray as xr

    if engine is not None and engine not in ENGINES:
        raise ConfigError(
            f"open_dataset: engine must be one of {', '.join(ENGINES)}, not {engine!r}"
        )
    if os.stat(path).st_size == 0:
        raise PermanentError(f"{path} is empty (0 bytes), not NetCDF: re-send the file")
    kwargs.setdefault("decode_times", xr.coders.CFDatetimeCoder(use_cftime=use_cftime))
    kwargs.setdefault("lock", _LIBRARY_LOCK)
    try:
        with _LIBRARY_LOCK:
            ds = xr.open_dataset(path, engine=engine, chunks=chunks, **kwargs)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except PermissionError as exc:
        raise PermanentError(
            f"{path} cannot be read (permission denied): fix its permissions, then"
            " `dpypeline retry` the job"
        ) from exc
    except ImportError as exc:
        raise ConfigError(f"open_dataset: engine {engine!r} is not usable here: {exc}") from exc
    except TypeError as exc:  # an option no engine takes: every file would fail the same way
        raise ConfigError(
            f"open_dataset: {exc}; fix the task's `with:` (`dpypeline validate` lists the"
            " options it takes)"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        # netCDF4 says "NetCDF: Unknown file format" / "HDF error" (truncated HDF5), h5py
        # "file signature not found" / "truncated file", xarray's engine guess ValueError.
        detail = (str(exc).splitlines() or [""])[0].replace(f": {path!r}", "")
        exc.__suppress_context__ = True  # a miss of xarray's file cache: no news to anyone
        raise PermanentError(
            f"{path} is not readable NetCDF ({detail}); it may be truncated or not NetCDF at"
            " all: re-send the file"
        ) from exc
    _note_masked_on_read(ds)
    return ds


def _check_open_options(
    engine: str | None = None,
    chunks: dict[str, int] | None = None,
    use_cftime: bool | None = None,
    **kwargs: Any,
) -> dict[str, str]:
    """What ``dpypeline validate`` can tell before any file arrives: the engine exists and
    is installed here, and every other option is one that :func:`xarray.open_dataset` or
    the engine's backend takes (xarray passes what it does not know on to the backend,
    which refuses it only when a file is opened)."""
    import xarray as xr

    installed = xr.backends.list_engines()
    if engine is not None and engine not in ENGINES:
        return {
            "engine": f"open_dataset: engine must be one of {', '.join(ENGINES)}, not {engine!r}"
        }
    if engine is not None and engine not in installed:
        return {"engine": f"open_dataset: engine {engine!r} is not installed here"}
    engines = [engine] if engine is not None else [e for e in ENGINES if e in installed]
    known = _parameters(xr.open_dataset)
    taken = {e: _parameters(installed[e].open_dataset) for e in engines}
    problems = {}
    for option in kwargs:
        if option in known or any(option in names for names in taken.values()):
            continue
        which = f"the {engine} engine" if engine is not None else " or ".join(engines)
        options = sorted(known | set().union(*taken.values()))
        problems[option] = (
            f"open_dataset: neither xarray.open_dataset nor {which} takes {option!r}"
            f" (they take: engine, chunks, use_cftime, {', '.join(options)})"
        )
    return problems


def _parameters(func: Any) -> set[str]:
    """The keyword parameters *func* takes by name (not its file argument, not **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(func).parameters.values())[1:]
    return {p.name for p in params if p.kind in kinds}


open_dataset.check_options = _check_open_options  # type: ignore[attr-defined]


def clean_dataset(
    ds: xr.Dataset,
    *,
    missing_value: float | None = None,
    fill_value: float | None = None,
    threshold: float | None = None,
) -> xr.Dataset:
    """Missing and fill values as the original dpypeline handled them, for float data
    variables only (coordinates and integer, boolean, text or time variables are left alone).

    - ``missing_value``: values equal to it become NaN (compared in the variable's own dtype,
      so ``1.0e20`` matches NEMO's float32 ``1e20``).
    - ``threshold``: as in the original, a tolerance around ``missing_value``: values with
      ``|x - missing_value| < threshold`` become NaN too. It needs ``missing_value``.
    - ``fill_value``: the ``_FillValue`` NaN is written as in the output (None keeps the
      source's, e.g. NEMO's ``1e20``).

    The ``missing_value`` attribute and encoding are removed from the variables touched:
    missing values are NaN once decoded, and a ``missing_value`` that differs from the
    ``_FillValue`` makes xarray's writers raise. Returns a new dataset; ``ds`` is unchanged.
    """
    if threshold is not None and missing_value is None:
        raise ConfigError("clean_dataset: threshold is a tolerance around missing_value; set both")
    if threshold is not None and not threshold > 0:
        raise ConfigError(f"clean_dataset: threshold must be positive, not {threshold}")
    out = ds.copy()
    for name, da in ds.data_vars.items():
        if da.dtype.kind != "f":
            continue
        cleaned = da.copy(deep=False)
        if missing_value is not None:
            target = np.asarray(missing_value, dtype=da.dtype)
            if threshold is not None:
                cleaned = cleaned.where(abs(da - target) >= threshold)
            elif not _masked_on_read(da, target):
                cleaned = cleaned.where(da != target)  # NaN compares unequal: it stays NaN
        cleaned.attrs = {k: v for k, v in da.attrs.items() if k != "missing_value"}
        cleaned.encoding = {k: v for k, v in da.encoding.items() if k != "missing_value"}
        if fill_value is not None:
            cleaned.encoding["_FillValue"] = np.asarray(fill_value, dtype=da.dtype)[()]
        out[name] = cleaned
    return out
