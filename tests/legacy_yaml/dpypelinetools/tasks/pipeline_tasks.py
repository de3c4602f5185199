"""``open_dataset``, ``clean_dataset`` and ``write_netcdf_dataset_to_bucket`` as example 2
calls them: the last gets the ``!ObjectStoreS3`` itself (``s3fs_instance``) and uses its
own method, ``write_file_to_bucket``, as task code written for the original did."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import xarray as xr


def open_dataset(path: str) -> xr.Dataset:
    return xr.open_dataset(path)


def clean_dataset(
    ds: xr.Dataset, fill_value: Any = None, missing_value: float | str = 1e20
) -> xr.Dataset:
    """Values at or beyond ``missing_value`` become NaN in the floating-point variables."""
    limit = float(missing_value)  # the original's YAML loader read 1e20 as a string
    cleaned = ds.copy()
    for name, var in ds.data_vars.items():
        if var.dtype.kind == "f":
            cleaned[name] = var.where(abs(var) < limit)
    return cleaned


def write_netcdf_dataset_to_bucket(ds: xr.Dataset, s3fs_instance: Any, bucket: str) -> None:
    name = os.path.basename(ds.encoding["source"])
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        ds.to_netcdf(local)
        s3fs_instance.write_file_to_bucket(local, bucket, name)
