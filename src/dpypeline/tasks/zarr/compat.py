"""zarr-python's internals that the Zarr task relies on, in one place.

Two things zarr 3 does not offer publicly (checked with 3.1): running a store's coroutine
on the event loop zarr keeps for its stores (listing a store's top level in one request,
deleting a key, closing a kept S3 client), and a group whose next metadata write carries
consolidated metadata made from the arrays in hand, rather than from reading the whole
store back. When an upgrade of zarr moves them, this module and its test
(``tests/test_zarr_compat.py``) are what changes; nothing else imports ``zarr.core``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import zarr

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on zarr's event loop, where its stores' clients live."""
    from zarr.core.sync import sync

    return sync(coroutine)


def consolidating(group: zarr.Group, arrays: Mapping[str, zarr.Array] | None) -> zarr.Group:
    """``group``, as a handle whose next metadata write (``update_attributes``) also
    writes consolidated metadata listing ``arrays`` as they are now; with ``arrays``
    None, ``group`` itself."""
    if arrays is None:
        return group
    import zarr
    from zarr.core.group import ConsolidatedMetadata

    members = {name: array.metadata for name, array in arrays.items()}
    metadata = dataclasses.replace(
        group.metadata,
        consolidated_metadata=ConsolidatedMetadata(metadata=members),  # type: ignore[arg-type]
    )
    return zarr.Group(zarr.AsyncGroup(metadata=metadata, store_path=group.store_path))
