"""Make synthetic NEMO grid_T files, as XIOS writes them, at any grid size and chunk layout.

Usage: python scripts/make_orca.py OUTDIR --files N [--grid orca025|orca12|NXxNYxNZ]
                                   [--layout namnc4|tiles|whole|contiguous|mixed] [--steps 1]
                                   [--vars thetao,so,tos,sos,zos,mldr10_1] [--start-year 1]
                                   [--calendar 360_day] [--complevel 1] [--seed 0]

The files look like the ocean output of a global NEMO run (ORCA025: 1442 x 1207 points and 75
levels; ORCA12: 4322 x 3059 x 75; or any ``NXxNYxNZ``): the names, dtypes, attributes, fill
values, time units and calendar of the GYRE file in examples/data/nemo-gyre, with the
variables of an ORCA run: thetao and so (time_counter, deptht, y, x), tos, sos, zos and
mldr10_1 (time_counter, y, x), all float32 with 1e20 on land; nav_lat and nav_lon (y, x);
deptht on NEMO's 75-level grid and its bounds; time_counter and time_centered (float64,
seconds since 1900-01-01, in the chosen calendar) with their bounds. time_counter is
unlimited, as XIOS writes it.

Each step is one monthly mean and a file holds ``--steps`` consecutive months (one by
default); file ``i`` follows file ``i - 1``, starting in January of ``--start-year``. Names
follow XIOS: ``ORCA025-TEST_1m_00010101_00010130_grid_T.nc`` (first and last day of the
file; a 360-day calendar here), ``ORCA12-TEST_...`` or ``GRID64x48x10-TEST_...``.

The ocean is made up but shaped like one: continents are smooth blobs covering about 30% of
the surface, the bottom deepens away from the coasts so that deeper levels have more land
(every level's land contains the level above's), temperature falls with depth and latitude,
salinity stays between about 34 and 36, and the fields drift smoothly from month to month.
A small seeded point noise (0.1 degC peak to peak for temperature, 0.02 for salinity: a few
1e-3 of the values, the size of real eddy-scale variability) keeps the low mantissa bits as
random as a model's, so that zlib level 1 with shuffle leaves ORCA025 thetao at about 40% of
its raw size (so about 30%, being smoother) rather than the few percent a smooth synthetic
field would compress to; most of the saving is land. The land mask depends on the seed
only, the values on the seed and the month: a layout changes how the data is stored, never
the data.

Chunk layouts (``--layout``), for the fields; nav_lat and nav_lon are always one chunk of
(y, x) as XIOS writes them, and deptht_bounds is always contiguous:

- ``namnc4``: NEMO's namnc4 default, (1, 3, ny/4, nx/4) for the 3-D fields rounded up
  ((1, 3, 302, 361) on ORCA025, as real output) and (1, ny/4, nx/4) for the 2-D ones;
- ``tiles``: full-depth tiles (1, nz, ny/4, nx/4), 2-D fields as namnc4;
- ``whole``: one chunk per step holding the whole field (1, nz, ny, nx);
- ``contiguous``: no chunks and so no compression; netCDF-4 allows contiguous storage only
  along fixed dimensions, so in this layout time_counter has a fixed length;
- ``mixed``: thetao as namnc4 but so as tiles, chunks that differ between variables.

Fields are written a few levels and chunk rows at a time (whole chunks, at most about
256 MB a write), never a whole 3-D field at once, so that an ORCA12 file takes well under
2 GB of memory, except the ``whole`` layout, whose single chunk HDF5 compresses in one go
(about three times one field: 1.7 GB for ORCA025; too much for ORCA12).

Each file is written under a hidden temporary name and renamed into place, as rsync does.
The generation parameters are kept in the ``make_orca_parameters`` global attribute; a file
that exists with the same parameters is left alone, so a re-run touches nothing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import cftime
import netCDF4
import numpy as np

GRIDS = {
    "orca025": (1442, 1207, 75),
    "orca12": (4322, 3059, 75),
    "orca0083": (4322, 3059, 75),
}
CONFIGS = {(1442, 1207, 75): "ORCA025", (4322, 3059, 75): "ORCA12"}
# Model time step by configuration, as XIOS records it in interval_operation.
TIME_STEPS = {"ORCA025": 1350, "ORCA12": 360}
LAYOUTS = ("namnc4", "tiles", "whole", "contiguous", "mixed")
VARIABLES = ("thetao", "so", "tos", "sos", "zos", "mldr10_1")
PARAMETERS = "make_orca_parameters"
VERSION = 1  # bump when the generated data changes, so that old files are rewritten
FILL = np.float32(1e20)
TIME_UNITS = "seconds since 1900-01-01 00:00:00"
WRITE_BUDGET = 256 * 2**20  # bytes of field data handed to HDF5 in one write
Complevel = Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

# (standard_name, long_name, units) as NEMO's field_def names them.
METADATA = {
    "thetao": ("sea_water_potential_temperature", "Sea Water Potential Temperature", "degC"),
    "so": ("sea_water_salinity", "Sea Water Salinity", "1e-3"),
    "tos": ("sea_surface_temperature", "sea surface temperature", "degC"),
    "sos": ("sea_surface_salinity", "sea surface salinity", "1e-3"),
    "zos": ("sea_surface_height_above_geoid", "sea surface height above geoid", "m"),
    "mldr10_1": (
        "ocean_mixed_layer_thickness_defined_by_sigma_theta",
        "Mixed Layer Depth (dsigma = 0.01 wrt 10m)",
        "m",
    ),
}
THREE_D = ("thetao", "so")
SURFACE_OF = {"tos": "thetao", "sos": "so"}
# Peak-to-peak amplitude of the point noise, in the field's units.
NOISE = {"thetao": 0.1, "tos": 0.1, "so": 0.02, "sos": 0.02, "zos": 0.005, "mldr10_1": 1.0}

# NEMO's 75-level vertical grid (double tanh, as in the ORCA025 and ORCA12 L75 namelists).
_L75 = (
    -3958.951371276829,
    103.9530096,
    2.415951269,
    15.3510137,
    7.0,
    48.02989372,
    13.0,
    100.7609285,
)


def make_files(
    outdir: str | Path,
    n: int,
    *,
    grid: str | tuple[int, int, int] = "orca025",
    layout: str = "namnc4",
    steps: int = 1,
    variables: Sequence[str] | None = None,
    start_year: int = 1,
    calendar: str = "360_day",
    complevel: int = 1,
    seed: int = 0,
    verbose: bool = False,
) -> list[Path]:
    """Write ``n`` files of ``steps`` monthly means each into ``outdir`` (created if missing)
    and return their paths in time order; files already there with the same parameters are
    kept as they are. ``grid`` is a name of GRIDS or (nx, ny, nz)."""
    shape = GRIDS[grid.lower()] if isinstance(grid, str) else tuple(grid)
    nx, ny, nz = shape
    names = tuple(variables) if variables is not None else VARIABLES
    unknown = set(names) - set(VARIABLES)
    if unknown:
        raise ValueError(f"unknown variables {sorted(unknown)}; choose from {VARIABLES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if min(nx, ny, nz) < 1 or n < 0 or steps < 1 or not 0 <= complevel <= 9:
        raise ValueError("grid sizes and steps must be positive and complevel within 0-9")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS.get((nx, ny, nz), f"GRID{nx}x{ny}x{nz}")
    ocean: Ocean | None = None  # built only when some file must be written: slow on ORCA12
    paths = []
    for index in range(n):
        months = tuple(index * steps + s for s in range(steps))
        spec = FileSpec(
            config=config,
            shape=(nx, ny, nz),
            layout=layout,
            variables=tuple(v for v in VARIABLES if v in names),
            months=months,
            start_year=start_year,
            calendar=calendar,
            complevel=cast(Complevel, complevel if layout != "contiguous" else 0),
            seed=seed,
            index=index,
        )
        dest = out / spec.file_name()
        paths.append(dest)
        if _up_to_date(dest, spec.parameters()):
            if verbose:
                print(f"kept  {dest}")
            continue
        began = time.monotonic()
        if ocean is None:
            ocean = Ocean(nx, ny, nz, seed)
        _write(dest, spec, ocean)
        if verbose:
            print(f"wrote {dest} in {time.monotonic() - began:.1f} s")
    return paths


@dataclass(frozen=True)
class FileSpec:
    """Everything that decides one file's content."""

    config: str
    shape: tuple[int, int, int]
    layout: str
    variables: tuple[str, ...]
    months: tuple[int, ...]
    start_year: int
    calendar: str
    complevel: Complevel
    seed: int
    index: int

    def parameters(self) -> str:
        nx, ny, nz = self.shape
        return json.dumps(
            {
                "version": VERSION,
                "grid": [nx, ny, nz],
                "layout": self.layout,
                "variables": list(self.variables),
                "months": list(self.months),
                "start_year": self.start_year,
                "calendar": self.calendar,
                "complevel": self.complevel,
                "seed": self.seed,
                "index": self.index,
            },
            sort_keys=True,
        )

    def month_bounds(self, month: int) -> tuple[cftime.datetime, cftime.datetime]:
        """First instants of month ``month`` (counted from January of start_year) and of
        the next one."""
        year, m = divmod(month, 12)
        nyear, nm = divmod(month + 1, 12)
        return (
            cftime.datetime(self.start_year + year, m + 1, 1, calendar=self.calendar),
            cftime.datetime(self.start_year + nyear, nm + 1, 1, calendar=self.calendar),
        )

    def file_name(self) -> str:
        first = self.month_bounds(self.months[0])[0]
        last = self.month_bounds(self.months[-1])[1] - datetime.timedelta(days=1)
        return f"{self.config}-TEST_1m_{_ymd(first)}_{_ymd(last)}_grid_T.nc"

    def chunks(self, name: str) -> tuple[int, ...] | None:
        return chunk_shape(name, self.shape, self.layout)


def chunk_shape(name: str, shape: tuple[int, int, int], layout: str) -> tuple[int, ...] | None:
    """The HDF5 chunks of field ``name`` on a grid of ``shape`` (nx, ny, nz) in ``layout``;
    None for contiguous storage."""
    nx, ny, nz = shape
    quarter = (-(-ny // 4), -(-nx // 4))
    if layout == "mixed":
        layout = "tiles" if name == "so" else "namnc4"
    if layout == "contiguous":
        return None
    if layout == "whole":
        return (1, nz, ny, nx) if name in THREE_D else (1, ny, nx)
    if name not in THREE_D:
        return (1, *quarter)
    return (1, min(3, nz) if layout == "namnc4" else nz, *quarter)


def _ymd(date: cftime.datetime) -> str:
    return f"{date.year:04d}{date.month:02d}{date.day:02d}"


def _up_to_date(dest: Path, parameters: str) -> bool:
    if not dest.exists():
        return False
    try:
        with netCDF4.Dataset(dest) as nc:
            return bool(nc.getncattr(PARAMETERS) == parameters)
    except (OSError, AttributeError):  # unreadable or not ours: write it again
        return False


def depth_levels(nz: int) -> tuple[np.ndarray, np.ndarray]:
    """Depths (m) of the nz + 1 cell faces and the nz cell centres: NEMO's L75 grid, or the
    same curve sampled at nz levels."""
    sur, a0, a1, kth, acr, kth2, acr2, a2 = _L75
    step = 75 / nz

    def depth(k: np.ndarray) -> np.ndarray:
        return (
            sur
            + a0 * k
            + a1 * acr * np.log(np.cosh((k - kth) / acr))
            + a2 * acr2 * np.log(np.cosh((k - kth2) / acr2))
        )

    faces = depth(1 + step * np.arange(nz + 1))
    centres = depth(1 + step * (np.arange(nz) + 0.5))
    faces[0] = 0.0
    return faces.astype(np.float32), centres.astype(np.float32)


class Modes:
    """A smooth random field on the grid: a sum of plane waves, periodic in x like ORCA,
    with a red spectrum; evaluated as one small matrix product."""

    def __init__(self, rng: np.random.Generator, count: int, kmax: float) -> None:
        self.kx = rng.integers(1, int(kmax) + 1, count).astype(np.float64)
        self.ky = rng.uniform(0.5, kmax, count)
        self.phase = rng.uniform(0, 2 * np.pi, count)
        amp = rng.uniform(0.5, 1.0, count) / np.hypot(self.kx, self.ky)
        self.amp = amp / np.sqrt((amp**2).sum() / 2)  # about unit standard deviation

    def __call__(self, x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> np.ndarray:
        """The field at columns ``x`` and rows ``y`` (index arrays), (len(y), len(x))."""
        ax = np.outer(2 * np.pi * x / nx, self.kx) + self.phase
        by = np.outer(np.pi * y / ny, self.ky)
        left = np.hstack([np.cos(by) * self.amp, -np.sin(by) * self.amp]).astype(np.float32)
        right = np.vstack([np.cos(ax).T, np.sin(ax).T]).astype(np.float32)
        return left @ right


class Ocean:
    """The time-invariant part of the made-up ocean on one grid: coordinates, land and
    bottom depth, and smooth patterns that the fields mix month by month. Holds five
    (ny, nx) float32 planes: about 260 MB on ORCA12."""

    LAND_FRACTION = 0.30

    def __init__(self, nx: int, ny: int, nz: int, seed: int) -> None:
        if nx * ny >= 2**32:
            raise ValueError("grid too large for the noise hash")
        self.nx, self.ny, self.nz = nx, ny, nz
        self.faces, self.depths = depth_levels(nz)
        rng = np.random.default_rng([seed, 0x4F524341])
        land = Modes(rng, 14, 5)
        self.patterns = [Modes(rng, 16, 8)(np.arange(nx), np.arange(ny), nx, ny) for _ in range(3)]
        self.lat1d = _latitudes(nx, ny)
        self.lat = self._nav_lat()
        # Where the land field is low there is land; its quantiles, on a subsample, set the
        # coast (30% land) and the abyss (the top 3% reach the deepest level).
        every = max(1, math.ceil(math.sqrt(nx * ny / 250_000)))
        sub = self._land(land, np.arange(0, nx, every), np.arange(0, ny, every))
        coast, abyss = (float(q) for q in np.quantile(sub, [self.LAND_FRACTION, 0.97]))
        height = np.clip(
            (self._land(land, np.arange(nx), np.arange(ny)) - coast) / (abyss - coast), 0, 1
        )
        deepest = float(self.faces[-1]) + 50
        self.bottom = np.where(height > 0, 20 + (deepest - 20) * height**0.45, 0).astype(np.float32)

    def _land(self, modes: Modes, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        antarctica = 3 / (1 + np.exp((self.lat1d[y] + 70) / 2.5))
        return modes(x, y, self.nx, self.ny) - antarctica[:, None].astype(np.float32)

    def _nav_lat(self) -> np.ndarray:
        """Mercator latitudes, bent north of 20N as the tripolar grid's are."""
        lon = np.radians(self.nav_lon()[0])
        north = np.clip((self.lat1d - 20) / 70, 0, None)[:, None]
        lat = self.lat1d[:, None] - 8 * north * np.sin(lon)[None, :] ** 2
        return lat.astype(np.float32)

    def nav_lon(self) -> np.ndarray:
        period = max(self.nx - 2, 1)  # ORCA grids repeat two columns at the east-west seam
        lon = (73 + np.arange(self.nx) * 360 / period + 180) % 360 - 180
        return np.broadcast_to(lon.astype(np.float32), (self.ny, self.nx))


def _latitudes(nx: int, ny: int) -> np.ndarray:
    """Row latitudes of an isotropic Mercator grid from 77S, as ORCA's south."""
    south = np.arcsinh(np.tan(np.radians(-77.01)))
    top = np.arcsinh(np.tan(np.radians(89.5)))
    step = min(2 * np.pi / max(nx - 2, 1), (top - south) / ny)
    return np.degrees(np.arctan(np.sinh(south + step * np.arange(ny))))


class FieldMaker:
    """One variable's values for one month on a window of the grid, level by level."""

    def __init__(
        self, ocean: Ocean, name: str, *, month: int, seed: int, ys: slice, xs: slice
    ) -> None:
        self.ocean, self.name, self.month, self.seed = ocean, name, month, seed
        self.ys, self.xs = ys, xs
        lat = np.radians(ocean.lat[ys, xs])
        p1, p2, p3 = (p[ys, xs] for p in ocean.patterns)
        drift = 2 * np.pi * month / 37
        a, b = np.float32(np.cos(drift)), np.float32(np.sin(drift))
        winter = np.float32(np.cos(2 * np.pi * (month % 12 - 1.5) / 12))  # Feb north, Aug south
        self.bottom = ocean.bottom[ys, xs]
        cos2 = np.cos(lat) ** 2
        if name in ("thetao", "tos"):
            self.surface = -1.8 + 29.5 * cos2 - 2.5 * winter * np.sin(lat) * (1 - cos2 / 2)
            self.deep = 0.2 + 1.8 * cos2
            self.anomaly = 1.5 * (a * p1 + b * p2)
            self.scales = (700.0, 250.0)
        elif name in ("so", "sos"):
            self.surface = 34.0 + 1.8 * np.exp(-(((np.abs(lat) - 0.44) / 0.3) ** 2))
            self.deep = np.float32(34.7) + 0 * lat
            self.anomaly = 0.25 * (a * p3 + b * p1)
            self.scales = (400.0, 300.0)
        elif name == "zos":
            south = np.exp(-(((lat + 1.05) / 0.2) ** 2))
            self.surface = 0.5 * cos2 - 1.1 * south + 0.4 * (a * p2 - b * p3)
        else:  # mldr10_1
            convection = np.exp(-(((np.abs(lat) - 1.05) / 0.18) ** 2))
            depth = 12 + 40 * np.sin(lat) ** 2 + 20 * np.abs(p3)
            depth += 400 * np.maximum(0, winter * np.sign(lat)) * convection
            self.surface = np.minimum(depth, self.bottom)

    def level(self, k: int) -> np.ndarray:
        """float32 values at level ``k`` (the surface for 2-D fields), 1e20 on land."""
        z = float(self.ocean.depths[k])
        if self.name in ("zos", "mldr10_1"):
            values = self.surface
        else:
            decay, anomaly_decay = self.scales
            values = self.deep + (self.surface - self.deep) * np.float32(math.exp(-z / decay))
            values = values + self.anomaly * np.float32(math.exp(-z / anomaly_decay))
            if self.name in ("thetao", "tos"):
                values = np.maximum(values, np.float32(-1.9))
        values = values.astype(np.float32)
        noise = _noise(self._key(k), self.ys, self.xs, self.ocean.nx)
        noise *= np.float32(NOISE[self.name])
        values += noise
        values[self.bottom < z] = FILL
        return values

    def _key(self, k: int) -> int:
        name = SURFACE_OF.get(self.name, self.name)  # tos is thetao's top level, as in NEMO
        text = f"{self.seed}/{self.month}/{name}/{k}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


_M32 = 0xFFFFFFFF


def _noise(key: int, ys: slice, xs: slice, nx: int) -> np.ndarray:
    """Uniform noise in [-0.5, 0.5) at each point of the window: a hash of the point's
    index, so the same whatever the window."""
    rows = np.arange(ys.start, ys.stop, dtype=np.uint32) * np.uint32(nx)
    cols = np.arange(xs.start, xs.stop, dtype=np.uint32)
    h = rows[:, None] + cols[None, :]
    h *= np.uint32((key & _M32) | 1)
    h ^= np.uint32(key >> 32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    h >>= np.uint32(8)
    noise = h.astype(np.float32)
    noise *= np.float32(2**-24)
    noise -= np.float32(0.5)
    return noise


def _write(dest: Path, spec: FileSpec, ocean: Ocean) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            _define(nc, spec, ocean)
            for name in spec.variables:
                for step, month in enumerate(spec.months):
                    _write_field(nc.variables[name], spec, ocean, step=step, month=month)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _define(nc: netCDF4.Dataset, spec: FileSpec, ocean: Ocean) -> None:
    """Dimensions, coordinates and empty fields, with XIOS's names and attributes."""
    nx, ny, nz = spec.shape
    stem = spec.file_name().removesuffix(".nc")
    contiguous = spec.layout == "contiguous"
    nc.setncatts(
        {
            "name": stem,
            "description": "ocean T grid variables",
            "title": "ocean T grid variables",
            "Conventions": "CF-1.6",
            # Fixed, and the uuid drawn from the parameters: the same parameters, the same bytes.
            "timeStamp": "1900-Jan-01 00:00:00 GMT",
            "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, spec.parameters())),
            PARAMETERS: spec.parameters(),
        }
    )
    nc.createDimension("axis_nbounds", 2)
    nc.createDimension("x", nx)
    nc.createDimension("y", ny)
    nc.createDimension("deptht", nz)
    nc.createDimension("time_counter", len(spec.months) if contiguous else None)
    compress = spec.complevel > 0
    for name, standard, long_name, units in (
        ("nav_lat", "latitude", "Latitude", "degrees_north"),
        ("nav_lon", "longitude", "Longitude", "degrees_east"),
    ):
        var = nc.createVariable(
            name,
            "f4",
            ("y", "x"),
            chunksizes=(ny, nx),
            zlib=compress,
            complevel=spec.complevel,
            shuffle=compress,
        )
        var.setncatts({"standard_name": standard, "long_name": long_name, "units": units})
    nc["nav_lat"][:] = ocean.lat
    nc["nav_lon"][:] = ocean.nav_lon()

    deptht = nc.createVariable("deptht", "f4", ("deptht",), chunksizes=(nz,))
    deptht.setncatts(
        {
            "name": "deptht",
            "long_name": "Vertical T levels",
            "units": "m",
            "positive": "down",
            "bounds": "deptht_bounds",
        }
    )
    deptht[:] = ocean.depths
    bounds = nc.createVariable("deptht_bounds", "f4", ("deptht", "axis_nbounds"), contiguous=True)
    bounds.setncattr("units", "m")
    bounds[:] = np.stack([ocean.faces[:-1], ocean.faces[1:]], axis=1)

    edges = np.array([[*spec.month_bounds(m)] for m in spec.months])
    seconds = cftime.date2num(edges, TIME_UNITS, spec.calendar).astype(np.float64)
    for name, axis in (("time_centered", {}), ("time_counter", {"axis": "T"})):
        var = nc.createVariable(
            name,
            "f8",
            ("time_counter",),
            contiguous=contiguous,
            chunksizes=None if contiguous else (1,),
        )
        var.setncatts(
            {
                **axis,
                "standard_name": "time",
                "long_name": "Time axis",
                "calendar": spec.calendar,
                "units": TIME_UNITS,
                "time_origin": TIME_UNITS.removeprefix("seconds since "),
                "bounds": f"{name}_bounds",
            }
        )
        var[:] = seconds.mean(axis=1)
        edge = nc.createVariable(
            f"{name}_bounds",
            "f8",
            ("time_counter", "axis_nbounds"),
            contiguous=contiguous,
            chunksizes=None if contiguous else (1, 2),
        )
        edge[:] = seconds

    dt = TIME_STEPS.get(spec.config, 3600)
    for name in spec.variables:
        standard, long_name, units = METADATA[name]
        dims = (
            ("time_counter", "deptht", "y", "x") if name in THREE_D else ("time_counter", "y", "x")
        )
        chunks = spec.chunks(name)
        var = nc.createVariable(
            name,
            "f4",
            dims,
            fill_value=FILL,
            chunksizes=chunks,
            contiguous=chunks is None,
            zlib=compress and chunks is not None,
            complevel=spec.complevel,
            shuffle=compress and chunks is not None,
        )
        var.setncatts(
            {
                "standard_name": standard,
                "long_name": long_name,
                "units": units,
                "online_operation": "average",
                "interval_operation": f"{dt} s",
                "interval_write": "1 month",
                "cell_methods": f"time: mean (interval: {dt} s)",
                "missing_value": FILL,
                "coordinates": "time_centered nav_lat nav_lon",
            }
        )
        var.set_auto_maskandscale(False)


def _write_field(
    var: netCDF4.Variable, spec: FileSpec, ocean: Ocean, *, step: int, month: int
) -> None:
    """One step of a field, in writes of whole chunks along depth and y."""
    name = var.name
    for zs, ys, xs in _write_units(spec, name):
        maker = FieldMaker(ocean, name, month=month, seed=spec.seed, ys=ys, xs=xs)
        if name not in THREE_D:
            var[step, ys, xs] = maker.level(0)
            continue
        block = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), np.float32)
        for k in range(zs.start, zs.stop):
            block[k - zs.start] = maker.level(k)
        var[step, zs, ys, xs] = block


def _write_units(spec: FileSpec, name: str) -> Iterator[tuple[slice, slice, slice]]:
    """Windows (levels, rows, columns) that together cover the field, each made of whole
    chunks: a chunk's levels by a chunk row, or single chunks when a row is too big."""
    nx, ny, nz = spec.shape
    chunks = spec.chunks(name)
    if name not in THREE_D:
        yield slice(0, 1), slice(0, ny), slice(0, nx)
        return
    if chunks is None:
        cz, cy, cx = 1, ny, nx
    else:
        cz, cy, cx = chunks[1:]
    if cz * cy * nx * 4 <= WRITE_BUDGET:
        cx = nx
    for z0 in range(0, nz, cz):
        for y0 in range(0, ny, cy):
            for x0 in range(0, nx, cx):
                yield (
                    slice(z0, min(z0 + cz, nz)),
                    slice(y0, min(y0 + cy, ny)),
                    slice(x0, min(x0 + cx, nx)),
                )


def parse_grid(text: str) -> tuple[int, int, int]:
    """``orca025``, ``orca12`` (or ``orca0083``) or ``NXxNYxNZ``."""
    if text.lower() in GRIDS:
        return GRIDS[text.lower()]
    try:
        nx, ny, nz = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a grid: {text!r} (orca025, orca12 or NXxNYxNZ)"
        ) from None
    return nx, ny, nz


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--files", type=int, required=True, help="how many files")
    parser.add_argument(
        "--grid", type=parse_grid, default="orca025", help="orca025, orca12 or NXxNYxNZ"
    )
    parser.add_argument("--layout", default="namnc4", choices=LAYOUTS)
    parser.add_argument("--steps", type=int, default=1, help="monthly means per file")
    parser.add_argument("--vars", default=",".join(VARIABLES), help="comma-separated fields")
    parser.add_argument("--start-year", type=int, default=1)
    parser.add_argument("--calendar", default="360_day", help="360_day, gregorian, noleap, ...")
    parser.add_argument("--complevel", type=int, default=1, choices=range(10), metavar="0-9")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.files < 1 or args.steps < 1:
        parser.error("--files and --steps must be at least 1")
    try:
        paths = make_files(
            args.outdir,
            args.files,
            grid=args.grid,
            layout=args.layout,
            steps=args.steps,
            variables=[v for v in args.vars.split(",") if v],
            start_year=args.start_year,
            calendar=args.calendar,
            complevel=args.complevel,
            seed=args.seed,
            verbose=True,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{len(paths)} files in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
