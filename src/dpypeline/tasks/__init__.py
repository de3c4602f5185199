"""Built-in tasks, by the short names a config may use."""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "clean_dataset": "dpypeline.tasks.netcdf:clean_dataset",
    "create_bucket": "dpypeline.tasks.upload:create_bucket",
    "open_dataset": "dpypeline.tasks.netcdf:open_dataset",
    "to_zarr": "dpypeline.tasks.zarr.to_zarr:to_zarr",
    "virtualize": "dpypeline.tasks.virtual.task:virtualize",
    "upload_file": "dpypeline.tasks.upload:upload_file",
}
