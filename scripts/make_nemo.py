"""Make a series of NEMO-like NetCDF files from a real NEMO output file.

Usage: python scripts/make_nemo.py OUTDIR --files N [--grid T] [--start-year 1]
                                   [--size small|large] [--nx NX --ny NY] [--source FILE]

File i is the source file (by default the GYRE yearly mean in examples/data/nemo-gyre) with
``time_counter``, ``time_centered`` and their bounds moved to year ``start_year + i`` of the
file's own calendar (360 days a year for GYRE), named like the source with the dates changed
(``nemo4.0-GYRE_1y_00020101_00021230_grid_T.nc``). Everything else the source carries is kept:
variables, attributes, dtypes, fill values, chunking, compression, the unlimited time
dimension and the time units and calendar. The float fields along time get a small
seeded perturbation (the same every run) so that each year differs from the others and a
misplaced or duplicated step is visible; ``--no-perturb`` keeps the source's values.

``--size large`` refines the horizontal grid 32 times in x and y (the same basin on a finer
grid, its chunks grown alike; about 40 MB a file for grid T) for throughput benchmarks;
``--nx``/``--ny`` choose the grid size directly.

Each file is written under a hidden temporary name and renamed into place, as rsync does,
so a watcher never takes a half-written file. A file already there with the same bytes is
left alone (its mtime too), so running the same command again changes nothing and a
pipeline watching OUTDIR repeats no job.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import cftime
import netCDF4
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Real GYRE output (NEMO 4.0, grids T and U), from the xnemogcm project's test data (MIT
# licence, examples/data/nemo-gyre/LICENSE-xnemogcm); kept in the repository so a fresh
# checkout can make its sample data.
DATA = ROOT / "examples" / "data" / "nemo-gyre"
LARGE_FACTOR = 32
TIME_VARIABLES = ("time_counter", "time_centered")
_DATES = re.compile(r"_(\d{4})(\d{4})_(\d{4})(\d{4})_")


def default_source(grid: str = "T") -> Path:
    return DATA / f"nemo4.0-GYRE_1y_00010101_00011230_grid_{grid}.nc"


def make_series(
    outdir: str | Path,
    n: int,
    *,
    source: str | Path | None = None,
    grid: str = "T",
    start_year: int = 1,
    size: str = "small",
    nx: int | None = None,
    ny: int | None = None,
    perturb: bool = True,
) -> list[Path]:
    """Write ``n`` yearly files into ``outdir`` (created if missing); return their paths
    in time order."""
    src = Path(source) if source is not None else default_source(grid)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    factor = LARGE_FACTOR if size == "large" else 1
    with netCDF4.Dataset(src) as nc:
        src_nx, src_ny = len(nc.dimensions["x"]), len(nc.dimensions["y"])
        src_year = _first_year(nc)
    shape = (ny or src_ny * factor, nx or src_nx * factor)
    paths = []
    for i in range(n):
        year = start_year + i
        dest = out / _renamed(src.name, src_year, year)
        _write_year(src, dest, years=year - src_year, shape=shape, perturb=perturb, seed=year)
        paths.append(dest)
    return paths


def _first_year(nc: netCDF4.Dataset) -> int:
    tc = nc.variables["time_counter"]
    return int(cftime.num2date(tc[0], tc.units, tc.calendar).year)


def _renamed(name: str, old_year: int, new_year: int) -> str:
    """The source's file name with its date range moved to ``new_year``."""
    renamed = _shift_dates(name, new_year - old_year)
    if renamed == name and new_year != old_year:  # no dates in the name: add the year
        stem, dot, ext = name.rpartition(".")
        renamed = f"{stem}_{new_year:04d}{dot}{ext}"
    return renamed


def _shift_dates(text: str, years: int) -> str:
    """``text`` with the years of its first ``_YYYYMMDD_YYYYMMDD_`` range moved by ``years``."""

    def move(m: re.Match[str]) -> str:
        y1, md1, y2, md2 = m.groups()
        return f"_{int(y1) + years:04d}{md1}_{int(y2) + years:04d}{md2}_"

    return _DATES.sub(move, text, count=1)


def _write_year(
    src: Path, dest: Path, *, years: int, shape: tuple[int, int], perturb: bool, seed: int
) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    rng = np.random.default_rng(seed) if perturb else None
    with netCDF4.Dataset(src) as s, netCDF4.Dataset(tmp, "w", format=s.data_model) as d:
        d.setncatts({k: s.getncattr(k) for k in s.ncattrs()})
        if "name" in s.ncattrs():
            d.setncattr("name", _shift_dates(s.getncattr("name"), years))
        sizes = {"y": shape[0], "x": shape[1]}
        for name, dim in s.dimensions.items():
            d.createDimension(name, None if dim.isunlimited() else sizes.get(name, len(dim)))
        for var in s.variables.values():
            _copy_variable(s, d, var, years=years, shape=shape, rng=rng)
    if dest.is_file() and filecmp.cmp(tmp, dest, shallow=False):
        tmp.unlink()  # the same bytes are there: a new mtime would make a new file version
        return
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _copy_variable(
    s: netCDF4.Dataset,
    d: netCDF4.Dataset,
    var: netCDF4.Variable,
    *,
    years: int,
    shape: tuple[int, int],
    rng: np.random.Generator | None,
) -> None:
    """``var`` of ``s`` into ``d``, defined alike; times moved by ``years``, fields on the
    (y, x) grid of ``shape`` and, given ``rng``, perturbed."""
    name = var.name
    filters = var.filters() or {}
    chunking = var.chunking()
    chunks = None
    if chunking != "contiguous":  # the source's chunks, as large a part of the finer grid
        new = [len(d.dimensions[dim]) or 1 for dim in var.dimensions]
        old = [len(s.dimensions[dim]) or 1 for dim in var.dimensions]
        chunks = [-(-c * n // o) for c, n, o in zip(chunking, new, old, strict=True)]
    out = d.createVariable(
        name,
        var.dtype,
        var.dimensions,
        zlib=bool(filters.get("zlib")),
        complevel=filters.get("complevel", 4),
        shuffle=bool(filters.get("shuffle")),
        chunksizes=chunks,
        contiguous=chunking == "contiguous",
        fill_value=var.getncattr("_FillValue") if "_FillValue" in var.ncattrs() else False,
    )
    out.setncatts({k: var.getncattr(k) for k in var.ncattrs() if k != "_FillValue"})
    var.set_auto_maskandscale(False)
    out.set_auto_maskandscale(False)
    data = np.asarray(var[...])
    if (parent := name.removesuffix("_bounds")) in TIME_VARIABLES:
        units = s.variables[parent]
        data = _shift_years(data, units.units, units.calendar, years)
    elif {"y", "x"} <= set(var.dimensions):
        data = _refine(data, var.dimensions, shape, name)
        fill = var.getncattr("_FillValue") if "_FillValue" in var.ncattrs() else None
        if rng is not None and "time_counter" in var.dimensions and data.dtype.kind == "f":
            valid = data != fill if fill is not None else np.ones(data.shape, bool)
            noise = rng.normal(0.0, 0.01, data.shape).astype(data.dtype)
            data = np.where(valid, data + noise, data)
    out[...] = data


def _shift_years(raw: np.ndarray, units: str, calendar: str, years: int) -> np.ndarray:
    dates = cftime.num2date(raw.ravel(), units, calendar)
    moved = [dt.replace(year=dt.year + years) for dt in dates]
    return np.asarray(cftime.date2num(moved, units, calendar), raw.dtype).reshape(raw.shape)


def _refine(data: np.ndarray, dims: Sequence[str], shape: tuple[int, int], name: str) -> np.ndarray:
    """``data`` on a finer (y, x) grid of ``shape`` covering the same basin: fields repeat
    each cell (the land mask keeps its shape), nav_lon/nav_lat are interpolated linearly so
    coordinates stay physical and distinct."""
    yi, xi = dims.index("y"), dims.index("x")
    if name in ("nav_lon", "nav_lat"):
        return _interpolate(_interpolate(data, yi, shape[0]), xi, shape[1])
    rows = np.arange(shape[0]) * data.shape[yi] // shape[0]
    cols = np.arange(shape[1]) * data.shape[xi] // shape[1]
    return np.take(np.take(data, rows, axis=yi), cols, axis=xi)


def _interpolate(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    old = a.shape[axis]
    pos = np.clip((np.arange(n) + 0.5) * old / n - 0.5, 0, old - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, old - 1)
    weight = np.expand_dims(pos - lo, [d for d in range(a.ndim) if d != axis])
    blend = np.take(a, lo, axis) * (1 - weight) + np.take(a, hi, axis) * weight
    return blend.astype(a.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--files", type=int, required=True, help="how many yearly files")
    parser.add_argument("--grid", default="T", choices=["T", "U", "V", "W"])
    parser.add_argument("--start-year", type=int, default=1)
    parser.add_argument("--size", default="small", choices=["small", "large"])
    parser.add_argument("--nx", type=int)
    parser.add_argument("--ny", type=int)
    parser.add_argument("--source", type=Path, help="a NEMO file to base the series on")
    parser.add_argument("--no-perturb", dest="perturb", action="store_false")
    args = parser.parse_args(argv)
    if args.files < 1:
        parser.error("--files must be at least 1")
    paths = make_series(
        args.outdir,
        args.files,
        source=args.source,
        grid=args.grid,
        start_year=args.start_year,
        size=args.size,
        nx=args.nx,
        ny=args.ny,
        perturb=args.perturb,
    )
    print(f"wrote {len(paths)} files to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
