"""Tasks used by the end-to-end benchmark (``scripts/bench.py``): they do no work, so what
is measured is the engine around them."""

from __future__ import annotations


def noop(path: str) -> str:
    return path
