"""The ``virtualize`` task: one file's chunk references committed into an Icechunk
repository, exactly once in effect, in the order the files came.

Each file is one Icechunk commit on the branch (readers see whole files only; a crash
before the commit leaves nothing, after it the commit is found again and not repeated,
:func:`_committed`). Before a file goes in it is checked against the repository
(:mod:`.checks`): a file that would read differently through the repository's encodings
is refused, never silently wrong. Its steps are placed by their coordinate values: after
the repository's last step (append), or, when they are there already (a new version of
the file, or a replay of a file committed by another job), over the same steps, so the
new references replace the old ones. Anything else (a file before the end that is not in
the repository, or one that overlaps it in part) is refused: the commit order holds the
files behind it.

Every reference carries the time its file was last written: a file changed or replaced
afterwards makes reads of its steps fail with Icechunk's error naming the file, instead
of returning the new bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dpypeline.commits import Commit, commits
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.pipeline import LocalPath
from dpypeline.tasks.virtual import checks
from dpypeline.tasks.virtual import repository as vr
from dpypeline.tasks.virtual.export import APPEND_DIM_ATTR
from dpypeline.tasks.virtual.sources import Source, locate

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

    from dpypeline.credentials import Credentials

DEFAULT_NATIVE_BELOW = "4KiB"


def _resource(kwargs: Mapping[str, Any]) -> Commit | None:
    """Files go into one repository one at a time; an append repository's in queue order."""
    store = kwargs.get("store")
    if not isinstance(store, str):
        return None
    return Commit(vr.normalise(store), ordered=kwargs.get("append_dim") is not None)


@commits(_resource)
def virtualize(
    source: str,
    store: LocalPath,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    objectstore: str | None = None,
    native_below: str | int = DEFAULT_NATIVE_BELOW,
    branch: str = "main",
    context: Any = None,
) -> str:
    """Commit the references of the file ``source`` (a local path, or the ``s3://`` URL
    ``upload_file`` returns) into the Icechunk repository ``store`` (a local path or
    ``s3://bucket/prefix``); return the repository's URL.

    ``append_dim``: append the file's steps along this dimension; the first file creates
    the repository. ``region``: the repository is a template with the whole coordinate
    along this dimension (:func:`create_template`); the file's steps go where their
    coordinate values are. ``objectstore``: the ``objectstores:`` entry that reaches an
    s3:// repository or source. ``native_below``: variables smaller than this (per file)
    are stored in the repository rather than referenced, as are the index coordinates
    (time_counter, deptht): reading them then needs no request to the file. ``branch``:
    the Icechunk branch committed to.
    Logs ``virtual_appended``, ``virtual_replaced`` or ``virtual_replayed``.
    """
    if (append_dim is None) == (region is None):
        raise ConfigError("virtualize: set exactly one of append_dim (append) or region (template)")
    from dpypeline.tasks.upload import parse_size

    below = parse_size(native_below)
    dim = str(append_dim or region)
    creds = vr.credentials(objectstore, context)
    with vr.classified(store, objectstore, context):
        src = locate(
            source, root=getattr(context, "root", None), credentials=_source_creds(source, creds)
        )
        vds = src.open(native_below=below)
        if dim not in vds.dims or dim not in vds.variables:
            raise PermanentError(
                f"{src.display} has no steps along a coordinate {dim!r} (dimensions:"
                f" {dict(vds.sizes)}): check append_dim or region, or the file"
            )
        grid = checks.grid_digests(src.raw(checks.fixed_variables(vds, dim)))
        repo = vr.open_repository(store, creds, [src.container], create=region is None)
        event = _commit(repo, branch, vds, src, dim, grid, region is not None, context)
    if (log := getattr(context, "log", None)) is not None:
        log.info(event.pop("event"), store=vr.normalise(store), **event)
    return vr.normalise(store)


def plan_references(
    sample: str, *, native_below: str | int = DEFAULT_NATIVE_BELOW, **_: Any
) -> list[dict[str, Any]]:
    """Which of ``sample``'s variables :func:`virtualize` would reference and which it
    would store in the repository, and their size per file (``dpypeline validate
    --sample``)."""
    from dpypeline.tasks.upload import parse_size

    vds = locate(sample).open(native_below=parse_size(native_below))
    return [
        {
            "variable": str(name),
            "dims": dict(var.sizes),
            "bytes": int(var.nbytes),
            "stored": "reference" if _virtual(var) else "in the repository",
        }
        for name, var in sorted(vds.variables.items(), key=lambda item: str(item[0]))
    ]


def _source_creds(source: str, creds: Credentials | None) -> Credentials | None:
    return creds if source.startswith("s3://") else None


def _commit(
    repo: Any,
    branch: str,
    vds: xr.Dataset,
    src: Source,
    dim: str,
    grid: dict[str, str],
    template: bool,
    context: Any,
) -> dict[str, Any]:
    import zarr

    metadata = vr.commit_metadata(src, context)
    done = vr.committed(repo, branch, metadata)
    if done is not None:
        return {"event": "virtual_replayed", "file": src.display, "snapshot": done}
    session = repo.writable_session(branch)
    steps = vds[dim].values
    group = _group(session)
    if group is None or not list(group.array_keys()):
        if template:
            raise PermanentError(
                f"{vr.normalise(str(repo))}: no template to write {src.display} into"
            )
        vds.vz.to_icechunk(session.store, last_updated_at=src.modified)
        event = "virtual_appended"
    else:
        checks.check(vds, group, dim, src.display, grid)
        place = _place(_stored_steps(session, dim), steps, src.display, dim)
        if place is None:
            vds.vz.to_icechunk(session.store, append_dim=dim, last_updated_at=src.modified)
            event = "virtual_appended"
        else:
            vds = vds.drop_vars(
                [n for n, v in vds.variables.items() if dim not in v.dims and not _virtual(v)]
            )
            vds.vz.to_icechunk(session.store, region={dim: place}, last_updated_at=src.modified)
            event = "virtual_replaced"
    group = zarr.open_group(session.store, mode="r+", zarr_format=3)
    group.attrs[checks.GRID_ATTR] = dict(group.attrs.get(checks.GRID_ATTR) or {}) | grid
    group.attrs[APPEND_DIM_ATTR] = dim
    snapshot = vr.commit(session, f"virtualize {src.display}", metadata)
    return {"event": event, "file": src.display, "steps": len(steps), "snapshot": snapshot}


def _group(session: Any) -> Any:
    import zarr
    from zarr.errors import GroupNotFoundError

    try:
        return zarr.open_group(session.store, mode="r+", zarr_format=3)
    except (GroupNotFoundError, FileNotFoundError):
        return None


def _virtual(var: Any) -> bool:
    from virtualizarr.manifests import ManifestArray

    return isinstance(var.data, ManifestArray)


def _stored_steps(session: Any, dim: str) -> np.ndarray:
    import xarray as xr

    with xr.open_zarr(session.store, consolidated=False, zarr_format=3) as ds:
        return ds[dim].values


def _place(stored: np.ndarray, steps: np.ndarray, where: str, dim: str) -> slice | None:
    """None to append; else the slice of the stored steps that the file's steps replace."""
    import numpy as np

    if len(stored) == 0 or steps[0] > stored[-1]:
        if len(steps) > 1 and not all(a < b for a, b in zip(steps[:-1], steps[1:], strict=False)):
            raise PermanentError(f"{where}: its {dim!r} values are not increasing")
        return None
    found = [int(i) for i in np.flatnonzero(np.isin(stored, steps))]
    if len(found) == len(steps) and found == list(range(found[0], found[0] + len(steps))):
        return slice(found[0], found[0] + len(steps))
    if found:
        raise PermanentError(
            f"{where}: its steps along {dim!r} ({steps[0]} … {steps[-1]}) overlap the"
            " repository's only in part: remove the overlapping steps from the file, or"
            " skip it (dpypeline retry is for a file whose steps all match)"
        )
    raise PermanentError(
        f"{where}: its steps along {dim!r} ({steps[0]} … {steps[-1]}) come before the"
        f" repository's last step ({stored[-1]}) and are not in it: an append repository"
        " takes files in order; skip this file, or rebuild the repository from it on"
    )
