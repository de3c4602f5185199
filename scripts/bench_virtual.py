"""Zero-copy stores at ORCA025: ``virtualize`` against ``to_zarr`` on the same files.

    python scripts/bench_virtual.py [--quick] [--data DIR]

(``scripts/bench.py`` runs the same as its ``virtual_orca025`` and ``virtual_read_thetao``
rows.)

The three ORCA025 grid_T files with NEMO's namnc4 chunks that the ``orca025_local_namnc4``
row appends (scripts/make_orca.py), each side in a child process so that its peak RSS is
its own, the sides alternating:

- ``virtual_orca025``: ``virtualize(append_dim=time_counter)`` file by file into a fresh
  Icechunk repository, against the README's main job (``open_dataset`` →
  ``clean_dataset`` → ``to_zarr``) into a fresh Zarr store: seconds and peak RSS, and the
  repository's size against the NetCDF files' (target <= 1%).
- ``virtual_read_thetao``: reading all of ``thetao`` back through the references (NEMO's
  small namnc4 chunks: one read per chunk of the files) against reading it from the native
  Zarr store: seconds (reported; no target).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_common import Context, Result, workdir  # noqa: E402
from bench_orca import data_dir, in_this_process, inputs, run_side  # noqa: E402

T = "time_counter"
CASE = "orca025_local_namnc4"


def virtual_side(files: list[str], store: str) -> None:
    """In the child: each file virtualized, as a pipeline's jobs would."""
    import structlog

    from dpypeline.pipeline import JobContext, Task

    task = Task("virtualize", store=store, append_dim=T)
    root = str(Path(files[0]).parent)
    for job_id, path in enumerate(files, 1):
        context = JobContext(
            job_id=job_id, attempt=1, path=path, relpath=Path(path).name, root=root,
            job="bench", log=structlog.get_logger(),
        )  # fmt: skip
        task(path, context)


def child(argv: list[str]) -> int:
    what, store, *rest = argv
    if what == "read-virtual":
        seconds = read_thetao_virtual(store, Path(rest[0]))
    elif what == "read-zarr":
        seconds = read_thetao_zarr(store)
    else:
        start = time.perf_counter()
        virtual_side(rest, store)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds}), flush=True)
    return 0


def run_virtual(files: list[Path], store: str, *, in_process: bool = False) -> dict[str, float]:
    return in_child("write", store, *map(str, files), in_process=in_process)


def in_child(*args: str, in_process: bool = False) -> dict[str, float]:
    """One side in a child process (the parent stays small: a child's peak RSS starts at
    its parent's, forked): its seconds and its peak RSS (MB), from wait4. ``in_process``
    (--quick) runs the same child's work here instead."""
    import os
    import subprocess

    if in_process:
        return in_this_process(child, list(args))

    argv = [sys.executable, __file__, "--child", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    os.sync()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench_virtual child {args[0]} failed ({status})")
    seconds = json.loads(out.decode().strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def read_thetao_virtual(store: str, root: Path) -> float:
    import icechunk as ic
    import xarray as xr

    repo = ic.Repository.open(
        ic.local_filesystem_storage(store),
        authorize_virtual_chunk_access={root.resolve().as_uri() + "/": None},
    )
    start = time.perf_counter()
    ds = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
    ds["thetao"].load()
    return time.perf_counter() - start


def read_thetao_zarr(store: str) -> float:
    import xarray as xr

    start = time.perf_counter()
    xr.open_zarr(store)["thetao"].load()
    return time.perf_counter() - start


def measure(quick: bool, repeats: int, work: Path, data: Path) -> dict[str, Any]:
    import shutil

    files = inputs(CASE, quick, data)
    best: dict[str, dict[str, float]] = {}
    reads: dict[str, float] = {}
    size = 0
    for run in range(repeats):
        zarr_store = str(work / f"native-{run}.zarr")
        repo = str(work / f"virtual-{run}.icechunk")
        sides = {
            "to_zarr": run_side("ours", files, zarr_store, None, None, in_process=quick),
            "virtualize": run_virtual(files, repo, in_process=quick),
        }
        for side, got in sides.items():
            old = best.get(side)
            rss = max(got["rss_mb"], old["rss_mb"] if old else 0)
            if old is None or got["seconds"] < old["seconds"]:
                best[side] = got
            best[side]["rss_mb"] = rss
        size = sum(f.stat().st_size for f in Path(repo).rglob("*") if f.is_file())
        seconds = {
            "virtual": in_child("read-virtual", repo, str(files[0].parent), in_process=quick)[
                "seconds"
            ],
            "zarr": in_child("read-zarr", zarr_store, in_process=quick)["seconds"],
        }
        for side, value in seconds.items():
            reads[side] = min(value, reads.get(side, value))
        shutil.rmtree(zarr_store, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    netcdf = sum(f.stat().st_size for f in files)
    return {"files": len(files), "best": best, "reads": reads, "size": size, "netcdf": netcdf,
            "repeats": repeats}  # fmt: skip


def results(m: dict[str, Any]) -> tuple[Result, Result]:
    v, z = m["best"]["virtualize"], m["best"]["to_zarr"]
    share = m["size"] / m["netcdf"]
    write = Result(
        name="virtual_orca025",
        ours=v["seconds"] / m["files"],
        unit="s/file",
        baseline=z["seconds"] / m["files"],
        baseline_unit="s/file (to_zarr, same files)",
        ratio=v["seconds"] / z["seconds"],
        ratio_kind="time",
        target="repository <= 1% of the NetCDF files",
        met=share <= 0.01,
        n=m["files"],
        repeats=m["repeats"],
    )
    write.notes.append(
        f"peak RSS virtualize {v['rss_mb']:,.0f} MB, to_zarr {z['rss_mb']:,.0f} MB"
        f" ({v['rss_mb'] / z['rss_mb']:.2f}x)"
    )
    write.notes.append(
        f"repository {m['size'] / 2**20:,.2f} MiB = {share:.2%} of the NetCDF files'"
        f" {m['netcdf'] / 2**20:,.0f} MiB"
    )
    rv, rz = m["reads"]["virtual"], m["reads"]["zarr"]
    read = Result(
        name="virtual_read_thetao",
        ours=rv,
        unit="s",
        baseline=rz,
        baseline_unit="s (the native Zarr store)",
        ratio=rv / rz,
        ratio_kind="time",
        target="report (namnc4's small chunks: one read each)",
        met=None,
        n=m["files"],
        repeats=m["repeats"],
    )
    return write, read


def bench_virtual(ctx: Context, name: str) -> Result:
    if "virtual" not in ctx.cache:
        with workdir(ctx, "virtual") as work:
            ctx.cache["virtual"] = results(measure(ctx.quick, ctx.repeats(2), work, data_dir(None)))
    write, read = ctx.cache["virtual"]
    return write if name == "virtual_orca025" else read


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid")
    parser.add_argument("--data", type=Path, default=None, help="generated files (kept)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-virtual-"))
    try:
        for r in results(measure(args.quick, args.repeats, work, data_dir(args.data))):
            print(
                f"{r.name}: ours {r.ours:.2f} {r.unit}, baseline {r.baseline:.2f} {r.unit},"
                f" {r.ratio:.2f}x; {'; '.join(r.notes)}",
                flush=True,
            )
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
