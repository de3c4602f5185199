"""The ``to_zarr`` task and the store-level pieces it is built from."""
