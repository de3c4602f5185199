"""Tasks used by the end-to-end benchmarks (``scripts/bench.py``, ``scripts/bench_dask.py``):
``noop`` does no work, so what is measured is the engine around it; ``burn`` holds a CPU."""

from __future__ import annotations

import time


def noop(path: str) -> str:
    return path


def burn(path: str, seconds: float = 0.2) -> str:
    """Hold a CPU (and the GIL) for ``seconds`` of CPU time: a CPU-bound job, like decoding
    and cleaning a NetCDF file."""
    deadline = time.process_time() + seconds
    x = 0
    while time.process_time() < deadline:
        x += 1
    return path
