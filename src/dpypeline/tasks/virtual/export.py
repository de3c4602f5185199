"""A virtual repository's references as kerchunk (parquet or JSON), for readers without
Icechunk: xarray with fsspec's reference filesystem reads them.

Icechunk keeps a reference's byte range in its manifests but does not hand it out, so the
export reads the files the current snapshot points to again, as the task did, and refuses
any that changed since its commit (the export would otherwise point at bytes the
repository would refuse to serve).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from dpypeline.errors import PermanentError
from dpypeline.tasks import repository as ir
from dpypeline.tasks.virtual import containers
from dpypeline.tasks.virtual.sources import locate

if TYPE_CHECKING:
    import xarray as xr

    from dpypeline.config.credentials import Credentials
    from dpypeline.config.model import ObjectStoreConfig

Format = Literal["parquet", "json"]


def export_references(
    store: str,
    out: str | Path,
    *,
    fmt: Format = "parquet",
    objectstore: str | None = None,
    objectstores: Mapping[str, ObjectStoreConfig] | None = None,
    branch: str = ir.BRANCH,
) -> int:
    """Write the references of ``branch``'s latest snapshot of ``store`` to ``out``;
    return how many files they point into. ``objectstore`` (an entry of
    ``objectstores``) reaches an s3:// repository and the objects it references."""
    import argparse

    import xarray as xr
    import zarr

    from dpypeline.tasks.virtual.task import APPEND_DIM_ATTR

    place = ir.locate(store, objectstore, argparse.Namespace(objectstores=objectstores or {}))
    with ir.classified(place, "reading the virtual repository"):
        repo = ir.open_repository(place, create=False)
        session = repo.readonly_session(branch=branch)
        group = zarr.open_group(session.store, mode="r", zarr_format=3)
        locations = sorted(set(session.all_virtual_chunk_locations()))
    dim = group.attrs.get(APPEND_DIM_ATTR)
    if not isinstance(dim, str):
        raise PermanentError(f"{place.url} is not a repository virtualize wrote")
    creds = None
    if objectstore is not None and objectstores:
        from dpypeline.objectstore import load_credentials

        creds = load_credentials(objectstore, objectstores[objectstore])
    recorded = containers.recorded(group.attrs)
    parts = []
    for url in locations:
        source = _source(url, creds)
        when = recorded.get(source.url)
        if when is None or source.modified > when:
            raise PermanentError(
                f"{source.display} changed after it was referenced (the repository refuses"
                " to read it): let dpypeline take the new version in, then export again"
            )
        parts.append(source.open())
    if not parts:
        raise PermanentError(f"{place.url} holds no references yet")
    parts.sort(key=lambda vds: vds[dim].values[0])
    combined = xr.concat(
        parts, dim=dim, data_vars="minimal", coords="minimal", compat="override",
        combine_attrs="override",
    )  # fmt: skip
    combined.attrs = dict(group.attrs)
    _write(combined, Path(out), fmt)
    return len(parts)


def _write(vds: xr.Dataset, out: Path, fmt: Format) -> None:
    import shutil

    import ujson

    refs = vds.vz.to_kerchunk(format="dict")
    _unfilled(refs["refs"])
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if fmt == "json":
        out.write_text(ujson.dumps(refs))
        return
    from kerchunk.df import refs_to_dataframe

    refs_to_dataframe(refs, str(out))


def _unfilled(refs: dict[str, Any]) -> None:
    """Zarr v2 readers take an array's ``fill_value`` for a ``_FillValue``: an array
    whose variable has none (deptht_bounds) must say null, or its zeros read as NaN."""
    import json

    for key in [k for k in refs if k.endswith("/.zarray")]:
        attrs = json.loads(refs[key.removesuffix(".zarray") + ".zattrs"])
        if "_FillValue" not in attrs:
            meta = json.loads(refs[key])
            meta["fill_value"] = None
            refs[key] = json.dumps(meta)


def _source(url: str, credentials: Credentials | None) -> Any:
    if url.startswith("file://"):
        return locate(unquote(urlparse(url).path))
    return locate(url, credentials=credentials)
