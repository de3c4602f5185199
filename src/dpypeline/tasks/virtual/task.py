"""The ``virtualize`` task: one file's chunk references committed into an Icechunk
repository, exactly once in effect, in the order the files came.

Each file is one Icechunk commit on the branch (readers see whole files only; a crash
before the commit leaves nothing; after it, the job's commit is found again and not
repeated: :func:`dpypeline.tasks.repository.find_commit`). Before a file goes in it is
checked against the repository (:mod:`.checks`): a file that would read differently
through the repository's encodings is refused, never silently wrong. Its steps are placed
by their coordinate values: after the repository's last step (append), or, when they are
there already (a new version of the file, or the file again under another job), over the
same steps, so the new references replace the old ones. Anything else (a file before the
end that is not in the repository, or one that overlaps it in part) is refused, and the
commit order holds the files behind it.

Every reference carries the time its file was last written: a file changed or replaced
afterwards makes reads of its steps fail with Icechunk's error naming the file, instead
of returning the new bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpypeline.commits import Commit, commits
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.pipeline import LocalPath
from dpypeline.tasks import repository as ir
from dpypeline.tasks.virtual import checks, containers
from dpypeline.tasks.virtual.sources import Source, locate
from dpypeline.tasks.zarr.store import failpoint

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

DEFAULT_NATIVE_BELOW = "4KiB"
APPEND_DIM_ATTR = "dpypeline_append_dim"


def _resource(kwargs: Mapping[str, Any]) -> Commit | None:
    """Files go into one repository one at a time; an append repository's in queue order."""
    store = kwargs.get("store")
    if not isinstance(store, str):
        return None
    if store.startswith(("s3://", "s3a://")):
        url = "s3://" + store.split("://", 1)[1].strip("/")  # as repository.locate has it
    else:
        try:
            url = ir.locate(store).url
        except ConfigError:
            return None  # virtualize refuses it itself, with the reason
    return Commit(url, ordered=kwargs.get("append_dim") is not None)


@dataclass(frozen=True)
class _File:
    """A file read as references, ready to commit."""

    source: Source
    vds: xr.Dataset
    dim: str
    grid: dict[str, str]


@commits(_resource)
def virtualize(
    source: str,
    store: LocalPath,
    *,
    append_dim: str | None = None,
    region: str | None = None,
    objectstore: str | None = None,
    native_below: str | int = DEFAULT_NATIVE_BELOW,
    context: Any = None,
) -> str:
    """Commit the references of the file ``source`` (a local path, or the ``s3://`` URL
    ``upload_file`` returns) into the Icechunk repository ``store`` (a local path or
    ``s3://bucket/prefix``); return the repository's URL.

    ``append_dim``: append the file's steps along this dimension; the first file creates
    the repository. ``region``: the repository already has the whole coordinate along
    this dimension (a template); the file's steps replace the steps with their coordinate
    values. ``objectstore``: the ``objectstores:`` entry that reaches an s3:// repository
    or source. ``native_below``: variables smaller than this per file (``4KiB``: bounds,
    time_centered) are stored in the repository rather than referenced, as are the index
    coordinates (time_counter, deptht): a reference costs a request, more than they weigh.
    Logs ``virtual_appended``, ``virtual_replaced`` or ``virtual_replayed``.
    """
    if (append_dim is None) == (region is None):
        raise ConfigError("virtualize: set exactly one of append_dim (append) or region (template)")
    from dpypeline.tasks.upload import parse_size

    below = parse_size(native_below)
    dim = str(append_dim or region)
    place = ir.locate(store, objectstore, context)
    file = _read(source, objectstore, context, dim, below)
    with ir.classified(place, "writing the virtual repository"):
        repo = ir.open_repository(place, create=region is None)
        repo = containers.with_containers(repo, [file.source.container])
        event = _commit(repo, file, region is not None, context)
    if (log := getattr(context, "log", None)) is not None:
        log.info(event.pop("event"), store=place.url, **event)
    return place.url


def _read(source: str, objectstore: str | None, context: Any, dim: str, below: int) -> _File:
    from dpypeline.tasks.virtual.sources import reading

    creds = settings = None
    if source.startswith("s3://"):
        from dpypeline.objectstore import load_credentials

        if objectstore is None:
            raise ConfigError(
                f"virtualize: {source} is on an object store: give it the `objectstore:` that"
                " reaches it"
            )
        bucket = ir.locate(f"s3://{source[5:].partition('/')[0]}", objectstore, context)
        creds, settings = load_credentials(*bucket.s3()), bucket.s3()[1]
    with reading(source, objectstore):
        root = getattr(context, "root", None)
        src = locate(source, root=root, credentials=creds, settings=settings)
        vds = src.open(native_below=below)
        if dim not in vds.dims or dim not in vds.variables:
            raise PermanentError(
                f"{src.display} has no steps along a coordinate {dim!r} (dimensions:"
                f" {dict(vds.sizes)}): check append_dim or region, or the file"
            )
        grid = checks.grid_digests(src.raw(checks.fixed_variables(vds, dim)))
    return _File(src, vds, dim, grid)


def _commit(repo: Any, file: _File, template: bool, context: Any) -> dict[str, Any]:
    src, vds, dim = file.source, file.vds, file.dim
    job = ir.FileCommit.of(context) if context is not None else None
    if (
        job is not None
        and job.job_id is not None
        and (done := ir.find_commit(repo, job.job_id, ordered=not template)) is not None
    ):
        return {"event": "virtual_replayed", "file": src.display, "snapshot": done}
    session = repo.writable_session(ir.BRANCH)
    steps = vds[dim].values
    group = _group(session)
    if group is None or not list(group.array_keys()):
        if template:
            raise PermanentError(f"no template in the repository to write {src.display} into")
        vds.vz.to_icechunk(session.store, last_updated_at=src.modified)
        event = "virtual_appended"
    else:
        checks.check(vds, group, dim, src.display, file.grid)
        place = _place(_stored_steps(session, dim), steps, src.display, dim, template)
        if place is None:
            vds.vz.to_icechunk(session.store, append_dim=dim, last_updated_at=src.modified)
            event = "virtual_appended"
        else:
            # the grid stored natively is the same (checked); its references are
            # rewritten with the rest, so no step keeps pointing into the old version
            native = [n for n, v in vds.variables.items() if dim not in v.dims and not _virtual(v)]
            vds.drop_vars(native).vz.to_icechunk(
                session.store, region={dim: place}, last_updated_at=src.modified
            )
            event = "virtual_replaced"
    group = _group(session)
    assert group is not None
    group.attrs[checks.GRID_ATTR] = checks.mapping(group.attrs.get(checks.GRID_ATTR)) | file.grid
    group.attrs[APPEND_DIM_ATTR] = dim
    containers.record(group, src)
    job = job or ir.FileCommit(job_id=None, path=src.display, size=src.size)
    failpoint("virtual_before_commit")
    snapshot = ir.commit(session, job)
    failpoint("virtual_after_commit")
    return {"event": event, "file": src.display, "steps": len(steps), "snapshot": snapshot}


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


def _place(
    stored: np.ndarray, steps: np.ndarray, where: str, dim: str, template: bool
) -> slice | None:
    """None to append; else the slice of the stored steps that the file's steps replace."""
    import numpy as np

    if not template and (len(stored) == 0 or steps[0] > stored[-1]):
        if not all(a < b for a, b in itertools.pairwise(steps)):
            raise PermanentError(f"{where}: its {dim!r} values are not increasing")
        return None
    found = [int(i) for i in np.flatnonzero(np.isin(stored, steps))]
    if len(found) == len(steps) and found == list(range(found[0], found[0] + len(steps))):
        return slice(found[0], found[0] + len(steps))
    if template:
        raise PermanentError(
            f"{where}: its steps along {dim!r} ({steps[0]} … {steps[-1]}) are not all on the"
            " template's axis, as one run of steps: check the file, or the template"
        )
    if found:
        raise PermanentError(
            f"{where}: its steps along {dim!r} ({steps[0]} … {steps[-1]}) overlap the"
            " repository's only in part: remove the overlapping steps from the file, or"
            " skip it (dpypeline skip JOB_ID)"
        )
    raise PermanentError(
        f"{where}: its steps along {dim!r} ({steps[0]} … {steps[-1]}) come before the"
        f" repository's last step ({stored[-1]}) and are not in it: an append repository"
        " takes files in order; skip this file (dpypeline skip JOB_ID), or rebuild the"
        " repository from it on"
    )
