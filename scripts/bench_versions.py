"""What undoing a file and collecting a store's garbage cost.

    python scripts/bench_versions.py [--quick] [--dir DIR]

(``scripts/bench.py`` runs the same as its ``revert_first_of_three`` and
``gc_after_20_replaced`` rows.)

- ``revert_first_of_three``: three GYRE files (refined, about 40 MB each; small with
  --quick) ingested by the README's job into an Icechunk store (and, in the notes, a
  plain Zarr store); ours = `dpypeline revert`
  of the first file's job, then `run --once` writing the three again; baseline = what it
  took before revert existed: delete the store and start the ledger over, then `run
  --once`. Both in this process, alternately; seconds, best of two (lower is better; the
  target is <= 1.1x). The revert alone is in the notes.
- ``gc_after_20_replaced``: an Icechunk repository of one such file, then the file written
  again 20 times (4 with --quick; a corrected version each time: commits whose chunks
  replace the last); ours = `expire_snapshots` + `garbage_collect` as `dpypeline gc` runs
  them (every snapshot but the tip expired); baseline = one more commit of the file. Seconds (lower
  is better), with the repository's size before and after in the notes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import xarray as xr
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import Context, Result, check, interleaved, workdir  # noqa: E402
from make_nemo import make_series  # noqa: E402

DIM = "time_counter"
CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


def _config(work: Path, icechunk: bool) -> Path:
    data: dict[str, Any] = {
        "name": "bench",
        "cache_dir": str(work / "state"),
        "monitor": False,
        "watch": [{"path": str(work / "inbox"), "patterns": ["*.nc"], "settle": "50ms"}],
        "jobs": [
            {
                "name": "to-zarr",
                "tasks": [
                    {"task": "open_dataset", "with": {"chunks": {DIM: 1}}},
                    {
                        "task": "to_zarr",
                        "with": {
                            "store": str(work / "gyre_T.zarr"),
                            "append_dim": DIM,
                            **({"icechunk": True} if icechunk else {}),
                        },
                    },
                ],
            }
        ],
        "logging": {"format": "json", "level": "error"},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _once(cfg: Path) -> None:
    from dpypeline.api import Pipeline

    check(Pipeline.from_yaml(cfg).run(once=True) == 0, "run --once exit", "non-zero")


def _steps(work: Path, icechunk: bool) -> int:
    store: Any = work / "gyre_T.zarr"
    if icechunk:
        import icechunk as ic

        repo = ic.Repository.open(ic.local_filesystem_storage(str(store)))
        store = repo.readonly_session(branch="main").store
    return int(xr.open_zarr(store, decode_times=False, consolidated=not icechunk).sizes[DIM])


def _revert(ctx: Context, icechunk: bool) -> tuple[float, float, float]:
    """Best seconds of revert + rewrite, of starting over, and of the revert alone."""
    from dpypeline import cli

    with workdir(ctx, "revert") as work:
        make_series(work / "inbox", 3, size="small" if ctx.quick else "large")
        cfg = _config(work, icechunk)
        _once(cfg)
        alone: list[float] = []

        def revert() -> float:
            t0 = time.perf_counter()
            check(cli.main(["-c", str(cfg), "revert", "1"]) == 0, "revert exit", "non-zero")
            alone.append(time.perf_counter() - t0)
            _once(cfg)
            took = time.perf_counter() - t0
            check(_steps(work, icechunk) == 3, "steps after the revert", _steps(work, icechunk))
            return took

        def start_over() -> float:
            t0 = time.perf_counter()
            shutil.rmtree(work / "gyre_T.zarr")
            shutil.rmtree(work / "state")
            _once(cfg)
            took = time.perf_counter() - t0
            check(_steps(work, icechunk) == 3, "steps after starting over", _steps(work, icechunk))
            return took

        ours, baseline = interleaved(ctx.repeats(2), revert, start_over)
    return ours, baseline, min(alone)


def bench_revert(ctx: Context) -> Result:
    ours, baseline, alone = _revert(ctx, icechunk=True)
    plain = _revert(ctx, icechunk=False)
    return Result(
        name="revert_first_of_three",
        ours=ours,
        unit="s",
        baseline=baseline,
        baseline_unit="s",
        ratio=ours / baseline,
        ratio_kind="time",
        target="<= 1.1x",
        met=ours / baseline <= 1.1,
        n=3,
        repeats=ctx.repeats(2),
        notes=[
            f"Icechunk store, README job: the revert alone {alone:.2f} s; plain Zarr store:"
            f" {plain[0]:.2f} s vs {plain[1]:.2f} s ({plain[0] / plain[1]:.2f}x), the revert"
            f" alone {plain[2]:.2f} s"
        ],
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_gc(ctx: Context) -> Result:
    import icechunk as ic

    from dpypeline.tasks.versions import collect

    replaced = 4 if ctx.quick else 20  # --quick: a few replacements
    with workdir(ctx, "gc") as work:
        (file,) = make_series(work / "inbox", 1, size="small" if ctx.quick else "large")
        ds = xr.open_dataset(file, decode_times=CODER).load()
        repo = ic.Repository.create(ic.local_filesystem_storage(str(work / "repo")))
        session = repo.writable_session("main")
        ds.to_zarr(session.store, mode="w", consolidated=False)
        session.commit("the file", metadata={"job_id": 1})
        along = [n for n in ds.variables if DIM in ds[n].dims]

        def replace(i: int) -> float:
            t0 = time.perf_counter()
            session = repo.writable_session("main")
            fields = [n for n in along if n in ds.data_vars and ds[n].dtype.kind == "f"]
            corrected = ds[along].assign({n: ds[n] + i for n in fields})
            corrected.to_zarr(session.store, region="auto", consolidated=False)
            session.commit(f"correction {i}", metadata={"job_id": i + 1})
            return time.perf_counter() - t0

        commits = [replace(i) for i in range(1, replaced + 1)]
        before = _size(work / "repo")
        time.sleep(0.01)  # the cut-off must come after the last commit's time
        t0 = time.perf_counter()
        done = collect(repo, dt.datetime.now(dt.UTC), expire_after=0, grace=0)
        ours = time.perf_counter() - t0
        after = _size(work / "repo")
        check(done.chunks > 0, "chunks deleted", done.chunks)
        baseline = min(commits)
    return Result(
        name="gc_after_20_replaced",
        ours=ours,
        unit="s",
        baseline=baseline,
        baseline_unit="s",
        ratio=ours / baseline,
        ratio_kind="time",
        target="report",
        met=None,
        n=replaced,
        repeats=1,
        notes=[
            f"repository {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after;"
            f" {done.expired} snapshots expired, {done.chunks} chunks deleted;"
            f" baseline: one commit of the file (best of the {replaced})"
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args(argv)
    ctx = Context(base=args.dir, quick=args.quick)
    for bench in (bench_revert, bench_gc):
        r = bench(ctx)
        print(f"{r.name}: {r.ours:.2f} s vs {r.baseline:.2f} s ({r.ratio:.2f}x); {r.notes[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
