"""Where a virtual repository's references may point: its *virtual chunk containers*,
recorded in the repository's config so that a reader knows which locations to authorise,
and the files it references with the time each was last written (what ``export-references``
checks). The repository itself, its commits and Icechunk's failures belong to
:mod:`dpypeline.tasks.repository`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dpypeline.tasks.virtual.checks import mapping

if TYPE_CHECKING:
    import icechunk
    import zarr

    from dpypeline.tasks.virtual.sources import Container, Source

SOURCES_ATTR = "dpypeline_sources"  # URL -> when the file was last written, as referenced


def with_containers(
    repo: icechunk.Repository, containers: Iterable[Container]
) -> icechunk.Repository:
    """``repo`` with each of ``containers`` in its config, saved when one is new: a
    reference may only point into a container the repository records."""
    config = repo.config
    known = set((config.virtual_chunk_containers or {}).keys())
    new = [c for c in containers if c.prefix not in known]
    if not new:
        return repo
    for container in new:
        config.set_virtual_chunk_container(container.config())
    repo = repo.reopen(config=config)
    repo.save_config()
    return repo


def prefixes(repo: icechunk.Repository) -> list[str]:
    """The URL prefixes a reader of ``repo`` authorises (``authorize_virtual_chunk_access``)."""
    return sorted((repo.config.virtual_chunk_containers or {}).keys())


def record(group: zarr.Group, source: Source) -> None:
    """Note in the commit being made when ``source`` was last written."""
    known = mapping(group.attrs.get(SOURCES_ATTR))
    known[source.url] = source.modified.isoformat()
    group.attrs[SOURCES_ATTR] = known


def recorded(attrs: Mapping[str, Any]) -> dict[str, datetime]:
    """Per referenced file's URL, when it was last written as the repository references it."""
    return {
        url: datetime.fromisoformat(when) for url, when in mapping(attrs.get(SOURCES_ATTR)).items()
    }
