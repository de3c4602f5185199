"""The ``to_zarr`` task: one file's dataset into a Zarr store, exactly once in effect.

Two modes. *Append* (``append_dim``): the file's steps go after the store's last step; the
first file creates the store. *Region* (``region``): the store is a template that already
has the whole coordinate along the dimension (:func:`create_template`); each file's steps
are located by their coordinate values and written into that slice, so files may arrive
in any order.

Each write is one sequence under the store's lock (:func:`dpypeline.tasks.zarr.store.store_lock`):
read the committed state afresh, cut off what a crashed write left, check the file against
the store (variables, dimensions, dtypes, and the values of the variables without the
dimension, such as nav_lat), place its steps, check chunk alignment, write, commit
(:class:`dpypeline.tasks.zarr.write.Write`). The
crash-consistency protocol is described in :mod:`dpypeline.tasks.zarr.store`. When the file's
steps are already in the store (a replay after a crash, or ``dpypeline retry``), the
``overlap`` policy decides. A file that overlaps stored steps only in part, or comes before
the end of an append store without being in it, is refused: every refusal is a
PermanentError whose message says what differs and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from dpypeline.commits import Commit, commits
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.pipeline import LocalPath
from dpypeline.tasks.zarr import encoding as ze
from dpypeline.tasks.zarr import store as zs
from dpypeline.tasks.zarr.layout import Compressor
from dpypeline.tasks.zarr.write import Overlap, Write

if TYPE_CHECKING:
    import xarray as xr

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
    store: LocalPath,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    objectstore: str | None = None,
    storage_options: dict[str, Any] | None = None,
    zarr_format: int | None = None,
    overlap: Overlap = "replace",
    consolidated: bool = True,
    chunks: dict[str, int] | None = None,
    compressor: str | dict[str, Any] | None = None,
    icechunk: bool = False,
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
    ``icechunk``: ``store`` is an Icechunk repository (created by the first file), written
    on its branch ``main``, one commit per file; readers of the branch see whole files
    only (:mod:`dpypeline.tasks.zarr.versioned`). Zarr format 3 only; ``consolidated``
    does not apply (Icechunk serves the metadata itself).
    Logs ``zarr_appended``, ``zarr_region_written`` or ``zarr_replayed`` with the steps.
    """
    if (append_dim is None) == (region is None):
        raise ConfigError("to_zarr: set exactly one of append_dim (append) or region (template)")
    if overlap not in OVERLAPS:
        raise ConfigError(f"to_zarr: overlap must be one of {', '.join(OVERLAPS)}, not {overlap!r}")
    zarr_format = _format(zarr_format, icechunk=icechunk, storage_options=storage_options)
    dim = str(append_dim or region)
    layout = ze.Layout(dim, dict(chunks or {}), Compressor.parse(compressor))
    if dim not in ds.dims or dim not in ds.variables or not ds.sizes[dim]:
        raise PermanentError(
            f"the dataset has no steps along a coordinate {dim!r} (dimensions:"
            f" {dict(ds.sizes)}): check append_dim or region, or the file"
        )
    if icechunk:
        return _to_repository(
            ds, store, dim, layout, append=append_dim is not None, objectstore=objectstore,
            overlap=overlap, context=context,
        )  # fmt: skip
    location = zs.locate(store, _storage_options(objectstore, storage_options, context))
    with _classified(location, objectstore, context), zs.store_lock(location):
        job_id = getattr(context, "job_id", None)
        write = Write(ze.read_along_source(ds), dim, location.url, overlap, consolidated, job_id)
        zstore = location.open()
        state = zs.open_store(zstore, location.url)
        if region is not None:
            event = write.region(state)
        else:
            event = write.append(zstore, state, zarr_format, layout)
    if (log := getattr(context, "log", None)) is not None:
        log.info(event.pop("event"), store=location.url, **event)
    return location.url


def _to_repository(
    ds: xr.Dataset,
    store: str,
    dim: str,
    layout: ze.Layout,
    *,
    append: bool,
    objectstore: str | None,
    overlap: Overlap,
    context: Any,
) -> str:
    from dpypeline.tasks import repository
    from dpypeline.tasks.zarr import versioned

    place = repository.locate(store, objectstore, context)
    with repository.classified(place, "writing"), zs.store_lock(zs.Location(place.url)):
        job_id = getattr(context, "job_id", None)  # recorded with its steps (``history``)
        write = Write(ze.read_along_source(ds), dim, place.url, overlap, False, job_id)
        event = versioned.write(write, place, append=append, layout=layout, context=context)
    if (log := getattr(context, "log", None)) is not None:
        log.info(event.pop("event"), store=place.url, **event)
    return place.url


def _format(zarr_format: int | None, *, icechunk: bool, storage_options: Any) -> int:
    """The Zarr format of a new store: 2 by default, 3 for an Icechunk repository, which
    holds only that."""
    if zarr_format not in (None, 2, 3):
        raise ConfigError(f"to_zarr: zarr_format must be 2 or 3, not {zarr_format!r}")
    if not icechunk:
        return zarr_format or 2
    if zarr_format == 2:
        raise ConfigError(
            "to_zarr: an Icechunk repository holds Zarr format 3 only: remove zarr_format: 2"
            " (or set it to 3), or write a plain Zarr store (icechunk: false)"
        )
    if storage_options:
        raise ConfigError(
            "to_zarr: an Icechunk repository on S3 is reached through `objectstore:` (an"
            " entry of `objectstores:`), not storage_options"
        )
    return 3


def create_template(
    ds: xr.Dataset,
    store: LocalPath,
    dim: str,
    values: Any,
    *,
    chunks: dict[str, int] | None = None,
    zarr_format: int | None = None,
    storage_options: dict[str, Any] | None = None,
    consolidated: bool = True,
    compressor: str | dict[str, Any] | None = None,
    icechunk: bool = False,
    objectstore: str | None = None,
    context: Any = None,
) -> str:
    """Create a template store for ``to_zarr(region=dim)``; return its URL.

    ``ds`` is a sample file: the template gets its variables, attributes, encodings and
    the values of its variables without ``dim`` (nav_lat …). Along ``dim`` it gets the
    coordinate ``values`` (the whole axis, e.g. the middle of every year of a run) and no
    data: a step reads as fill values (NaN for float variables) until a file with it is
    written. ``chunks`` and ``compressor`` as for :func:`to_zarr`; along ``dim`` the
    default is the sample's number of steps. Replaces whatever Zarr store is at ``store``.
    With ``icechunk``, the template is the first commit of an Icechunk repository (S3:
    through ``objectstore``, an entry of the ``context``'s ``objectstores``).
    """
    import xarray as xr

    zarr_format = _format(zarr_format, icechunk=icechunk, storage_options=storage_options)
    axis = xr.Variable((dim,), np.asarray(values))
    along = (chunks or {}).get(dim) or ds.sizes[dim]
    layout = ze.Layout(dim, dict(chunks or {}) | {dim: along}, Compressor.parse(compressor))
    if icechunk:
        from dpypeline.tasks import repository

        place = repository.locate(store, objectstore, context)
        with repository.classified(place, "creating"), zs.store_lock(zs.Location(place.url)):
            session = repository.open_repository(place).writable_session(repository.BRANCH)
            fork = session.fork()
            _fill_template(
                ds, fork.store, place.url, axis, layout=layout, zarr_format=zarr_format,
                consolidated=False,
            )  # fmt: skip
            session.merge(fork)
            source = ds.encoding.get("source", "a sample")
            message = f"template along {dim} ({len(axis)} steps) from {source}"
            repository.commit(session, repository.FileCommit(None, message))
        return place.url
    location = zs.locate(store, storage_options)
    with zs.store_lock(location):
        _fill_template(
            ds, location.open(), location.url, axis, layout=layout, zarr_format=zarr_format,
            consolidated=consolidated,
        )  # fmt: skip
    return location.url


def _fill_template(
    ds: xr.Dataset,
    zstore: Any,
    url: str,
    axis: xr.Variable,
    *,
    layout: ze.Layout,
    zarr_format: int,
    consolidated: bool,
) -> None:
    dim = str(layout.along)
    old = zs.open_store(zstore, url)
    ze.write_new(ds, zstore, old, zarr_format, layout=layout, attrs={zs.WRITTEN: []})
    state = zs.open_store(zstore, url)
    assert state is not None
    for name in state.along(dim):
        zs.resize(state, name, dim, 0)  # drops the sample's chunks
        zs.resize(state, name, dim, len(axis))
    stored = ze.open_lazy(state)[dim].variable
    ze.write_arrays([(dim, axis, stored)], state, dim=dim, start=0)
    zs.save_group(state, {}, consolidated)


def plan_layout(
    ds: xr.Dataset,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    chunks: dict[str, int] | None = None,
    compressor: str | dict[str, Any] | None = None,
    zarr_format: int | None = None,
    icechunk: bool = False,
    **_: Any,
) -> list[dict[str, Any]]:
    """How :func:`to_zarr` with these arguments lays out a new store for ``ds``: per
    variable its dimensions, its chunks as read, the store's chunks, a chunk's size
    uncompressed and the codec (``dpypeline validate --sample``)."""
    zarr_format = _format(zarr_format, icechunk=icechunk, storage_options=None)
    layout = ze.Layout(append_dim or region, dict(chunks or {}), Compressor.parse(compressor))
    ds = ze.read_along_source(ds)
    rows = []
    for name, var in sorted(ds.variables.items(), key=lambda item: str(item[0])):
        enc = ze.new_encoding(str(name), var, layout, zarr_format)
        itemsize = np.dtype(enc.get("dtype", var.dtype)).itemsize
        rows.append(
            {
                "variable": str(name),
                "dims": dict(var.sizes),
                "read_chunks": ze.source_chunks(var),
                "store_chunks": dict(zip(map(str, var.dims), enc["chunks"], strict=True)),
                "chunk_bytes": int(np.prod(enc["chunks"])) * itemsize,
                "codec": str(layout.compressor) if "compressors" in enc else "zarr's default",
            }
        )
    return rows


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
