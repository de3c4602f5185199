"""NetCDF → Zarr throughput: our tasks against a hand-written xarray append on the same files.

    python scripts/bench_zarr.py [--quick] [--dir DIR]

(``scripts/bench.py`` runs the same cases as its ``zarr_*`` rows.)

For each case (local store, moto S3 store on loopback; small GYRE files, large refined
ones) the same files are appended to a fresh store twice by each side, alternately:
ours = `open_dataset(chunks={time_counter: 1})` → `to_zarr(append_dim=...)` (the built-in
tasks, with their checks, lock and commit protocol); baseline = the hand-written
`xr.open_dataset(f).to_zarr(store, append_dim=...)`. The figure is files/s, best of two,
and the ratio ours/baseline (higher is better; the target is >= 0.9x).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xarray as xr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import Context, Result, workdir  # noqa: E402
from make_nemo import make_series  # noqa: E402

from dpypeline.tasks.netcdf import open_dataset  # noqa: E402
from dpypeline.tasks.zarr.to_zarr import to_zarr  # noqa: E402

DIM = "time_counter"
CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


def ours(files: list[Path], store: str, options: dict | None) -> None:
    for f in files:
        to_zarr(
            open_dataset(str(f), chunks={DIM: 1}), store, append_dim=DIM, storage_options=options
        )


def hand_written(files: list[Path], store: str, options: dict | None) -> None:
    for i, f in enumerate(files):
        ds = xr.open_dataset(f, decode_times=CODER)
        if i == 0:
            ds.to_zarr(store, mode="w", storage_options=options, zarr_format=2)
        else:
            ds.to_zarr(store, append_dim=DIM, storage_options=options, zarr_format=2)


def timed(fn: Callable[..., None], files: list[Path], store: str, options: dict | None) -> float:
    t0 = time.perf_counter()
    fn(files, store, options)
    return time.perf_counter() - t0


@contextlib.contextmanager
def moto_s3(s3_only: bool = False) -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback with the bucket ``bench-bucket``; s3fs storage options.
    ``s3_only`` (--quick) hands every request straight to moto's S3 application, skipping
    the search for the service each request otherwise costs (a third of the server's CPU)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = (_s3_only_server() if s3_only else ThreadedMotoServer)(
        ip_address="127.0.0.1", port=0, verbose=False
    )
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "bench",
            "secret": "bench",
            "use_listings_cache": False,
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        }
        import s3fs

        # moto keeps its state per process: a second server finds the bucket there
        s3fs.S3FileSystem(**options).makedirs("bench-bucket", exist_ok=True)
        yield options
    finally:
        server.stop()


def _s3_only_server() -> type:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class S3Only(DomainDispatcherApplication):
        def get_application(self, environ: dict[str, Any]) -> Any:
            with self.lock:
                if "s3" not in self.app_instances:
                    self.app_instances["s3"] = self.create_app("s3")
                return self.app_instances["s3"]

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:  # as moto's, with the S3-only application
            self._server = make_server(
                self._ip_address, self._port, S3Only(create_backend_app), True
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server


CASES = ("local_small", "local_large", "s3_small", "s3_large")
FILES = {"small": (12, 2), "large": (6, 2)}  # size -> (full, quick) number of files
QUICK_LARGE = {"nx": 4 * 32, "ny": 4 * 22}  # --quick: "large" refined 4 times, not 32


def _zarr_cases(ctx: Context) -> dict[str, dict[str, float]]:
    """Best seconds of each side for every case, computed once per run: for each file size,
    local and S3, ours and the hand-written baseline alternate, each into a fresh store."""
    if "zarr" in ctx.cache:
        return ctx.cache["zarr"]  # type: ignore[no-any-return]
    repeats = ctx.repeats(2)
    cases: dict[str, dict[str, float]] = {}
    with workdir(ctx, "zarr") as d, moto_s3(s3_only=ctx.quick) as s3:
        for size, (full, quick) in FILES.items():
            n = quick if ctx.quick else full
            grid: dict[str, Any] = QUICK_LARGE if ctx.quick and size == "large" else {}
            files = make_series(d / size, n, size=size, **grid)
            for where, options in (("local", None), ("s3", s3)):
                best = {"ours": float("inf"), "baseline": float("inf")}
                for run in range(repeats):
                    for name, fn in (("baseline", hand_written), ("ours", ours)):
                        if options is None:
                            store = str(d / f"{size}-{name}-{run}.zarr")
                        else:
                            store = f"s3://bench-bucket/{size}-{name}-{run}.zarr"
                        best[name] = min(best[name], timed(fn, files, store, options))
                cases[f"{where}_{size}"] = {**best, "n": n, "repeats": repeats}
    ctx.cache["zarr"] = cases
    return cases


def bench_zarr(ctx: Context, case: str) -> Result:
    m = _zarr_cases(ctx)[case]
    n = int(m["n"])
    ratio = m["baseline"] / m["ours"]
    where, size = case.split("_")
    result = Result(
        name=f"zarr_{case}",
        ours=n / m["ours"],
        unit="files/s",
        baseline=n / m["baseline"],
        baseline_unit="files/s (xarray)",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 0.9x rate",
        met=ratio >= 0.9,
        n=n,
        repeats=int(m["repeats"]),
    )
    store = "a local store" if where == "local" else "a moto S3 store on loopback"
    result.notes.append(
        f"{n} {size} NEMO grid-T files appended to {store}: open_dataset + to_zarr vs"
        " xr.open_dataset(f).to_zarr(store, append_dim=...)"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small files, local and S3 only")
    parser.add_argument("--dir", default=None, help="where to put the files (default: tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-zarr-", dir=args.dir))
    try:
        with moto_s3() as s3:
            sizes = [("small", 12)] if args.quick else [("small", 12), ("large", 6)]
            rows = []
            for size, n in sizes:
                files = make_series(work / size, n, size=size)
                for where, options in (("local", None), ("moto S3", s3)):
                    best = {"ours": float("inf"), "baseline": float("inf")}
                    for run in range(2):
                        for name, fn in (("ours", ours), ("baseline", hand_written)):
                            if where == "local":
                                store = str(work / f"{size}-{name}-{run}.zarr")
                            else:
                                store = f"s3://bench-bucket/{size}-{name}-{run}.zarr"
                            best[name] = min(best[name], timed(fn, files, store, options))
                    case = f"{where}, {n} {size} files"
                    rows.append((case, n / best["ours"], n / best["baseline"]))
            print(f"{'case':<28} {'ours files/s':>13} {'baseline files/s':>17} {'ratio':>7}")
            for case, o, b in rows:
                print(f"{case:<28} {o:>13.2f} {b:>17.2f} {o / b:>6.2f}x")
            print("ratio = ours / hand-written xarray (files/s; target >= 0.9x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
