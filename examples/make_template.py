"""Create the template store of examples/netcdf-region.yaml: the whole time axis of a run,
laid out before any file arrives, so files can be written into their own steps in any
order (the original dpypeline's template/region example).

    python examples/make_template.py inbox/nemo-region/SAMPLE_grid_T.nc output/nemo_T_region.zarr \
        --years 1 12

SAMPLE is any file of the run: the template takes its variables, attributes and grid.
Each year's step is at 1 July (mid-year of the 360-day calendar NEMO's GYRE runs use).
"""

from __future__ import annotations

import argparse

import cftime
import xarray as xr

from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import create_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample")
    parser.add_argument("store")
    parser.add_argument("--years", nargs=2, type=int, metavar=("FIRST", "LAST"), default=(1, 12))
    args = parser.parse_args()
    sample: xr.Dataset = open_dataset(args.sample)
    first, last = args.years
    axis = [cftime.Datetime360Day(year, 7, 1) for year in range(first, last + 1)]
    print(create_template(sample, args.store, "time_counter", axis))


if __name__ == "__main__":
    main()
