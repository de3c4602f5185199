"""The zarr internals the Zarr task relies on (``dpypeline.tasks.zarr.compat``) still do
what it needs, in both Zarr formats: a zarr upgrade that moves them fails here first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore

from dpypeline.tasks.zarr import compat


async def _listing(store: LocalStore) -> list[str]:
    return sorted([key async for key in store.list_dir("")])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_stores_coroutine_runs_on_zarrs_loop_and_returns_its_value(
    tmp_path: Path, zarr_format: int
) -> None:
    store = LocalStore(str(tmp_path / "s.zarr"))
    group = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    group.create_array("a", shape=(2,), dtype="i4")
    group_key = ".zgroup" if zarr_format == 2 else "zarr.json"
    assert group_key in compat.run(_listing(store))
    assert "a" in compat.run(_listing(store))
    assert compat.run(store.exists(group_key))
    compat.run(store.delete(group_key))
    assert group_key not in compat.run(_listing(store))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_groups_next_write_carries_consolidated_metadata_of_the_arrays_in_hand(
    tmp_path: Path, zarr_format: int
) -> None:
    path = str(tmp_path / "s.zarr")
    xr.Dataset({"v": ("t", np.arange(3.0))}).to_zarr(
        path, mode="w", consolidated=False, zarr_format=zarr_format
    )
    store = LocalStore(path)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    array = zarr.open_array(store, path="v", mode="r+", zarr_format=zarr_format)
    array.resize((5,))  # as a write grows an array: the metadata in hand says 5 steps
    compat.consolidating(group, {"v": array}).update_attributes({"marker": 5})
    reread = zarr.open_group(path, mode="r", use_consolidated=True)
    consolidated = reread.metadata.consolidated_metadata
    assert consolidated is not None
    assert consolidated.metadata["v"].shape == (5,)
    assert reread.attrs["marker"] == 5
    with xr.open_zarr(path, consolidated=True) as ds:
        assert ds.sizes["t"] == 5
        assert ds.attrs["marker"] == 5


def test_without_arrays_the_group_is_left_as_it_is(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    assert compat.consolidating(group, None) is group
