"""The main job at the sizes users have: ORCA025 and ORCA12 NEMO files into Zarr.

    python scripts/bench_orca.py [--quick] [--cases orca025_local_namnc4 ...] [--data DIR]
    python scripts/bench_orca.py --codecs          # the codec table of the README

(``scripts/bench.py`` runs the same cases as its ``orca*`` rows; ``orca12`` only when named:
``python scripts/bench.py --only orca12``.)

Each case appends the same synthetic XIOS-style grid_T files (scripts/make_orca.py: three
ORCA025 files of thetao, so, tos, sos, zos and mldr10_1, 1.1 GB a step uncompressed; or one
ORCA12 file of thetao, 4 GB) to a fresh store, in a child process per side so that each
side's peak RSS is its own:

- ours: the README's main job, unchanged: ``open_dataset(chunks={time_counter: 1})`` →
  ``clean_dataset(missing_value=1e20)`` → ``to_zarr(append_dim=time_counter)``;
- baseline: the hand-written ``xr.open_dataset(f, chunks={})`` re-chunked to the same store
  chunks, ``.to_zarr(append_dim=..., encoding=<the same chunks and codec>)``.

The sides alternate; the figure is seconds for all files, best of the repeats, and the
ratio ours / baseline (lower is better; the target is <= 1.1x), with both peak RSS, the
store's chunk sizes and its size against the NetCDF files'. Generated files are kept in
``--data`` (default ``$TMPDIR/dpypeline-bench-data``) and reused by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_common import Context, Result, check, workdir  # noqa: E402

T = "time_counter"
VARIABLES = ["thetao", "so", "tos", "sos", "zos", "mldr10_1"]
# case -> (grid, layout, variables, files, where)
CASES: dict[str, tuple[str, str, list[str], int, str]] = {
    "orca025_local_namnc4": ("orca025", "namnc4", VARIABLES, 3, "local"),
    "orca025_local_whole": ("orca025", "whole", VARIABLES, 3, "local"),
    "orca025_s3_namnc4": ("orca025", "namnc4", VARIABLES, 3, "s3"),
    "orca025_s3_whole": ("orca025", "whole", VARIABLES, 3, "s3"),
    "orca12": ("orca12", "namnc4", ["thetao"], 1, "local"),
    "orca025_local_icechunk": ("orca025", "namnc4", VARIABLES, 3, "local"),
    "orca025_s3_icechunk": ("orca025", "namnc4", VARIABLES, 3, "s3"),
}
# ours with icechunk: true, against ours into a plain Zarr store (not hand-written xarray)
ICECHUNK_CASES = ("orca025_local_icechunk", "orca025_s3_icechunk")
DEFAULT_CASES = [c for c in CASES if c != "orca12"]
QUICK_GRID = (48, 40, 9)  # --quick: the same layouts on a small grid,
QUICK_VARIABLES = ["thetao", "tos"]  # with one 3-D and one 2-D field
CODEC_CANDIDATES: list[Any] = [
    {"codec": "blosc-lz4", "level": 5, "shuffle": "byte"},
    {"codec": "blosc-zstd", "level": 3, "shuffle": "byte"},
    {"codec": "blosc-zstd", "level": 3, "shuffle": "bit"},
    {"codec": "zstd", "level": 3},
    {"codec": "zlib", "level": 1},
]


# -- the two sides, each run in a child process ---------------------------------------------


def ours(files: list[str], store: str, options: dict[str, Any] | None, compressor: Any) -> None:
    from dpypeline.tasks.netcdf import clean_dataset, open_dataset
    from dpypeline.tasks.zarr.to_zarr import to_zarr

    for f in files:
        ds = clean_dataset(open_dataset(f, chunks={T: 1}), missing_value=1.0e20)
        to_zarr(ds, store, append_dim=T, storage_options=options, compressor=compressor)


def icechunk(files: list[str], store: str, options: dict[str, Any] | None, compressor: Any) -> None:
    """The same job with ``icechunk: true``: one commit per file, as the service makes them
    (a job's context: its id, the file; an S3 store through an ``objectstores:`` entry)."""
    with _objectstores(options) as stores:
        _icechunk_appends(files, store, compressor, stores)


def _icechunk_appends(
    files: list[str], store: str, compressor: Any, stores: dict[str, Any]
) -> None:
    from types import SimpleNamespace

    from dpypeline.tasks.netcdf import clean_dataset, open_dataset
    from dpypeline.tasks.zarr.to_zarr import to_zarr

    for i, f in enumerate(files, 1):
        context = SimpleNamespace(
            job_id=i, path=f, relpath=Path(f).name, size=None, mtime_ns=None,
            pipeline="bench", log=None, objectstores=stores,
        )  # fmt: skip
        ds = clean_dataset(open_dataset(f, chunks={T: 1}), missing_value=1.0e20)
        to_zarr(ds, store, append_dim=T, compressor=compressor, icechunk=True,
                objectstore="bench" if stores else None, context=context)  # fmt: skip


@contextmanager
def _objectstores(options: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The ``objectstores:`` entry that reaches the moto server of ``options``, its
    credentials file removed when done."""
    if not options:
        yield {}
        return
    from dpypeline.config.model import ObjectStoreConfig

    with tempfile.TemporaryDirectory(prefix="bench-creds-") as directory:
        yield {"bench": ObjectStoreConfig(credentials=_credentials(options, Path(directory)))}


def _credentials(options: dict[str, Any], directory: Path) -> Path:
    path = directory / "s3.json"
    endpoint = options["client_kwargs"]["endpoint_url"]
    path.write_text(json.dumps({"token": options["key"], "secret": options["secret"],
                                "endpoint_url": endpoint}))  # fmt: skip
    path.chmod(0o600)
    return path


def baseline(files: list[str], store: str, options: dict[str, Any] | None, compressor: Any) -> None:
    import xarray as xr

    from dpypeline.tasks.zarr.to_zarr import plan_layout

    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    layout: dict[str, Any] = {}
    for i, f in enumerate(files):
        ds = xr.open_dataset(f, chunks={}, decode_times=coder)
        if not layout:  # the chunks and codec ours gives a new store, asked of its policy
            from dpypeline.tasks.zarr.layout import Compressor

            rows = plan_layout(ds, append_dim=T, compressor=compressor)
            layout = {r["variable"]: tuple(r["store_chunks"].values()) for r in rows}
            codec = Compressor.parse(compressor)
        encoding = {}
        for name, var in ds.variables.items():
            chunks = layout[str(name)]
            if var.chunks is not None:
                ds[name] = var.chunk(dict(zip(var.dims, chunks, strict=True)))
            itemsize = var.encoding.get("dtype", var.dtype).itemsize
            encoding[name] = {"chunks": chunks} | codec.encoding(2, itemsize)
        if i == 0:
            ds.to_zarr(store, mode="w", encoding=encoding, storage_options=options, zarr_format=2)
        else:
            ds.to_zarr(store, append_dim=T, storage_options=options)


def child(argv: list[str]) -> int:
    side, store, options, compressor, *files = argv
    fn = {"ours": ours, "baseline": baseline, "icechunk": icechunk}[side]
    start = time.perf_counter()
    fn(files, store, json.loads(options), json.loads(compressor))
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


def run_side(
    side: str,
    files: list[Path],
    store: str,
    options: dict[str, Any] | None,
    compressor: Any,
    *,
    in_process: bool = False,
) -> dict[str, float]:
    """One side in a child process: its seconds and its peak RSS (MB), from wait4.
    ``in_process`` (--quick) runs the same child's work here instead, the peak RSS being
    this process's: no interpreter and imports to start for every side."""
    argv = [sys.executable, __file__, "--child", side, store, json.dumps(options)]
    argv += [json.dumps(compressor), *map(str, files)]
    if in_process:
        return in_this_process(child, argv[3:])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    os.sync()  # the last side's store is on disk: neither side pays for the other's writeback
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    check(proc.returncode == 0, f"{side} exit code", proc.returncode)
    seconds = json.loads(out.decode().strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def in_this_process(run: Callable[[list[str]], int], argv: list[str]) -> dict[str, float]:
    """What a child given ``argv`` would print and its peak RSS, running ``run`` here."""
    import io
    import resource
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = run(argv)
    check(code == 0, f"{argv[0]} exit code", code)
    seconds = json.loads(out.getvalue().strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- stores: where they are, what they hold ---------------------------------------------------


@contextmanager
def moto_s3(s3_only: bool = False) -> Iterator[dict[str, Any]]:
    from bench_zarr import moto_s3 as server

    with server(s3_only) as options:
        yield options


def store_facts(store: str, options: dict[str, Any] | None) -> dict[str, float]:
    """The store's size on disk (or in the bucket) and its largest and smallest chunk of
    the 3-D and 2-D fields, uncompressed, in MiB."""
    import zarr

    if store.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**(options or {}))
        size = fs.du(store)
    else:
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    if store.endswith(".icechunk"):
        from types import SimpleNamespace

        from dpypeline.tasks import repository

        with _objectstores(options) as stores:
            context = SimpleNamespace(objectstores=stores)
            place = repository.locate(store, "bench" if stores else None, context)
            repo = repository.open_repository(place, create=False)
            group = zarr.open_group(repo.readonly_session(branch="main").store, mode="r")
    elif store.startswith("s3://"):
        group = zarr.open_group(store, mode="r", storage_options=options)
    else:
        group = zarr.open_group(store, mode="r")
    chunk_mib = [
        _prod(a.chunks) * a.dtype.itemsize / 2**20
        for name, a in group.arrays()
        if name in VARIABLES
    ]
    return {"bytes": float(size), "chunk_min": min(chunk_mib), "chunk_max": max(chunk_mib)}


def _prod(values: tuple[int, ...]) -> int:
    n = 1
    for v in values:
        n *= v
    return n


# -- the cases --------------------------------------------------------------------------------


def data_dir(ctx_dir: Path | None) -> Path:
    if ctx_dir is not None:
        return ctx_dir
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "dpypeline-bench-data"


def inputs(case: str, quick: bool, data: Path) -> list[Path]:
    from make_orca import make_files

    grid, layout, variables, n, _ = CASES[case]
    if quick and len(variables) > 1:
        variables = QUICK_VARIABLES
    where = data / f"{'quick' if quick else grid}-{layout}-{'-'.join(variables)}"
    if quick:  # a new store and one append: every path the full run takes
        return make_files(where, min(n, 2), grid=QUICK_GRID, layout=layout, variables=variables)
    return make_files(where, n, grid=grid, layout=layout, variables=variables)


def measure(
    case: str, quick: bool, repeats: int, work: Path, data: Path, *, s3: dict[str, Any] | None
) -> dict[str, Any]:
    files = inputs(case, quick, data)
    where = CASES[case][4]
    best: dict[str, dict[str, float]] = {}
    facts: dict[str, float] = {}
    base_facts: dict[str, float] = {}
    versioned = case in ICECHUNK_CASES
    for run in range(repeats):
        for side in ("baseline", "ours"):
            # icechunk rows: the baseline is ours into plain Zarr, ours is icechunk: true
            job = ("ours" if side == "baseline" else "icechunk") if versioned else side
            suffix = "icechunk" if job == "icechunk" else "zarr"
            if where == "s3":
                store, options = f"s3://bench-bucket/{case}-{side}-{run}.{suffix}", s3
            else:
                store, options = str(work / f"{case}-{side}-{run}.{suffix}"), None
            got = run_side(job, files, store, options, None, in_process=quick)
            if side not in best or got["seconds"] < best[side]["seconds"]:
                best[side] = {
                    **got,
                    "rss_mb": max(got["rss_mb"], best.get(side, {}).get("rss_mb", 0)),
                }
            else:
                best[side]["rss_mb"] = max(best[side]["rss_mb"], got["rss_mb"])
            if side == "ours" and run == 0:
                facts = store_facts(store, options)
            if side == "baseline" and run == 0 and versioned:
                base_facts = store_facts(store, options)
            _remove(store, options)
    netcdf = sum(f.stat().st_size for f in files)
    return {"files": len(files), "best": best, "facts": facts, "netcdf": netcdf,
            "repeats": repeats, "base_facts": base_facts}  # fmt: skip


def _remove(store: str, options: dict[str, Any] | None) -> None:
    if store.startswith("s3://"):
        import s3fs

        s3fs.S3FileSystem(**(options or {})).rm(store, recursive=True)
    else:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        Path(store + ".lock").unlink(missing_ok=True)


def result(case: str, m: dict[str, Any]) -> Result:
    ours_s, base_s = m["best"]["ours"]["seconds"], m["best"]["baseline"]["seconds"]
    ratio = ours_s / base_s
    rss, base_rss = m["best"]["ours"]["rss_mb"], m["best"]["baseline"]["rss_mb"]
    facts = m["facts"]
    rss_limit = 3000 if case == "orca12" else 1500
    r = Result(
        name=case,
        ours=ours_s,
        unit="s",
        baseline=base_s,
        baseline_unit="s (plain Zarr, same job)"
        if case in ICECHUNK_CASES
        else "s (xarray, same chunks)",
        ratio=ratio,
        ratio_kind="time",
        target=f"<= 1.1x time, RSS <= {rss_limit / 1000:.1f} GB",
        met=ratio <= 1.1 and rss <= rss_limit,
        n=m["files"],
        repeats=m["repeats"],
    )
    r.notes.append(
        f"peak RSS ours {rss:,.0f} MB, baseline {base_rss:,.0f} MB ({rss / base_rss:.2f}x)"
    )
    r.notes.append(
        f"store chunks {facts['chunk_min']:.1f}-{facts['chunk_max']:.1f} MiB; store"
        f" {facts['bytes'] / 2**20:,.0f} MiB = {facts['bytes'] / m['netcdf']:.2f}x the NetCDF"
        f" files' {m['netcdf'] / 2**20:,.0f} MiB"
    )
    if base := m.get("base_facts"):
        r.notes.append(
            f"plain Zarr store {base['bytes'] / 2**20:,.0f} MiB; the repository is"
            f" {facts['bytes'] / base['bytes']:.3f}x its size"
        )
    return r


def bench_orca(ctx: Context, case: str) -> Result:
    data = data_dir(None)
    with workdir(ctx, "orca") as work, ExitStack() as stack:
        s3 = None
        if CASES[case][4] == "s3" and ctx.quick:  # one server for every row of the run
            if "moto" not in ctx.cache:
                ctx.cache["moto"] = ctx.resources.enter_context(moto_s3(s3_only=True))
            s3 = ctx.cache["moto"]
        elif CASES[case][4] == "s3":
            s3 = stack.enter_context(moto_s3())
        m = measure(case, ctx.quick, ctx.repeats(2 if case != "orca12" else 1), work, data, s3=s3)
    return result(case, m)


def codec_table(quick: bool, data: Path, work: Path) -> list[tuple[str, float, float, float]]:
    """For each candidate codec: seconds to append the ORCA025 namnc4 files (ours), store
    size / NetCDF size, and seconds to read the whole store back."""
    import xarray as xr

    files = inputs("orca025_local_namnc4", quick, data)
    netcdf = sum(f.stat().st_size for f in files)
    rows = []
    for compressor in CODEC_CANDIDATES:
        store = str(work / "codec.zarr")
        got = run_side("ours", files, store, None, compressor)
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
        start = time.perf_counter()
        xr.open_zarr(store)[["thetao", "so"]].load()
        read = time.perf_counter() - start
        _remove(store, None)
        rows.append((json.dumps(compressor), got["seconds"], size / netcdf, read))
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT_CASES)
    parser.add_argument("--data", type=Path, default=None, help="generated files (kept)")
    parser.add_argument("--codecs", action="store_true", help="compare codecs (ORCA025)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = data_dir(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-orca-"))
    try:
        if args.codecs:
            print(f"{'codec':<58} {'write s':>8} {'size/NetCDF':>12} {'read s':>7}")
            for name, seconds, ratio, read in codec_table(args.quick, data, work):
                print(f"{name:<58} {seconds:>8.1f} {ratio:>11.2f}x {read:>7.1f}")
            return 0
        with ExitStack() as stack:
            s3 = None
            if any(CASES[c][4] == "s3" for c in args.cases):
                s3 = stack.enter_context(moto_s3())
            for case in args.cases:
                r = result(case, measure(case, args.quick, args.repeats, work, data, s3=s3))
                print(
                    f"{case}: ours {r.ours:.1f} s, baseline {r.baseline:.1f} s,"
                    f" {r.ratio:.2f}x time; {'; '.join(r.notes)}",
                    flush=True,
                )
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
