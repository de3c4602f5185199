"""A virtual repository's references as kerchunk (parquet or JSON), for readers without
Icechunk: xarray with fsspec's reference filesystem reads them.

Icechunk keeps a reference's byte range in its manifests but does not hand it out, so the
export reads the files the current snapshot points to again, as the task did, and refuses
any that changed since its commit (the export would otherwise point at bytes the
repository would refuse to serve).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from dpypeline.errors import PermanentError
from dpypeline.tasks.virtual import repository as vr
from dpypeline.tasks.virtual.sources import locate

if TYPE_CHECKING:
    import xarray as xr

    from dpypeline.credentials import Credentials

APPEND_DIM_ATTR = "dpypeline_append_dim"
Format = Literal["parquet", "json"]


def export_references(
    store: str,
    out: str | Path,
    *,
    fmt: Format = "parquet",
    credentials: Credentials | None = None,
    branch: str = "main",
) -> int:
    """Write the references of ``branch``'s latest snapshot of ``store`` to ``out``;
    return how many files they point into."""
    import xarray as xr
    import zarr

    repo = vr.open_repository(store, credentials, [], create=False)
    session = repo.readonly_session(branch=branch)
    group = zarr.open_group(session.store, mode="r", zarr_format=3)
    dim = group.attrs.get(APPEND_DIM_ATTR)
    if not isinstance(dim, str):
        raise PermanentError(f"{vr.normalise(store)} is not a repository virtualize wrote")
    recorded = _recorded(repo, branch)
    parts = []
    for url in sorted(set(session.all_virtual_chunk_locations())):
        source = _source(url, credentials)
        when = recorded.get(source.display)
        if when is None or source.modified > when:
            raise PermanentError(
                f"{source.display} changed after it was referenced (the repository refuses"
                " to read it): let dpypeline take the new version in, then export again"
            )
        parts.append(source.open())
    if not parts:
        raise PermanentError(f"{vr.normalise(store)} holds no references yet")
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


def _recorded(repo: Any, branch: str) -> dict[str, datetime]:
    """Per file, its mtime when its latest commit referenced it."""
    found: dict[str, datetime] = {}
    for snapshot in repo.ancestry(branch=branch):
        meta = snapshot.metadata or {}
        path, mtime = meta.get("path"), meta.get("mtime")
        if isinstance(path, str) and isinstance(mtime, str) and path not in found:
            found[path] = datetime.fromisoformat(mtime)
    return found
