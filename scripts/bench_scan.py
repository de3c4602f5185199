"""Measure what the reconciliation scan costs on top of a bare directory walk.

Builds a tree of tiny files (by default 100 directories of 1000 files, in 10 groups) in a
temporary directory next to the current one, so it sits on the disk the service would scan,
then times, best of three with a warm cache:

  baseline  a recursive os.scandir walk that stats every file, nothing else
  scan()    dpypeline.scan.scan with the matcher ["**/*.nc"]: matching, FileVersion
            objects and the natural sort on top of the same system calls

Usage: PYTHONPATH=src python scripts/bench_scan.py [--files N] [--per-dir M] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from dpypeline.patterns import PathMatcher
from dpypeline.scan import scan


def build_tree(root: str, files: int, per_dir: int) -> int:
    """Create ``files`` one-byte files under ``root``; return how many directories hold them."""
    dirs = max(1, -(-files // per_dir))
    made = 0
    for d in range(dirs):
        directory = os.path.join(root, f"g{d // 10}", f"d{d}")
        os.makedirs(directory)
        for i in range(min(per_dir, files - made)):
            fd = os.open(os.path.join(directory, f"f{i}.nc"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)
        made += min(per_dir, files - made)
    return dirs


def baseline_walk(root: str) -> int:
    """The floor: list every directory and stat every file, keeping nothing."""
    count = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    best, found = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        found = run()
        best = min(best, time.perf_counter() - start)
    return best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix=".bench_scan-", dir=os.getcwd())
    try:
        start = time.perf_counter()
        dirs = build_tree(root, args.files, args.per_dir)
        elapsed = time.perf_counter() - start
        print(f"built {args.files} files in {dirs} dirs under {root} in {elapsed:.1f} s")

        matcher = PathMatcher(["**/*.nc"], [], case_sensitive=True)
        base_s, base_n = best_of(args.repeat, lambda: baseline_walk(root))
        scan_s, scan_n = best_of(args.repeat, lambda: len(scan(root, matcher).files))
        assert base_n == scan_n == args.files, (base_n, scan_n)

        print(f"\n{'walk':<24}{'files':>9}{'seconds':>10}{'ratio':>8}")
        print(f"{'baseline scandir+stat':<24}{base_n:>9}{base_s:>10.3f}{1:>8.2f}")
        print(f"{'scan() **/*.nc':<24}{scan_n:>9}{scan_s:>10.3f}{scan_s / base_s:>8.2f}")
        per_file_us = (scan_s - base_s) / scan_n * 1e6
        print(f"\nscan() overhead: {scan_s - base_s:.3f} s ({per_file_us:.2f} us per file)")
        print(f"best of {args.repeat}, warm cache, matcher {matcher.patterns}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
