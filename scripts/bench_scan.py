"""Measure what the reconciliation scan costs on top of a bare directory walk.

Builds a tree of tiny files (by default 100 directories of 1000 files, in 10 groups) in a
temporary directory next to the current one, so it sits on the disk the service would scan,
then times, best of three with a warm cache:

  baseline  a recursive os.scandir walk that stats every file, nothing else
  scan()    dpypeline.watching.scan.scan with the matcher ["**/*.nc"]: matching, FileVersion
            objects and the natural sort on top of the same system calls

Usage: PYTHONPATH=src python scripts/bench_scan.py [--files N] [--per-dir M] [--repeat R]

``bench_poll_cpu`` (run by ``scripts/bench.py``) compares one poll cycle of a ``poll``
watch with one cycle of watchdog's ``PollingObserver`` on the same tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from bench_common import Context, Result, check, workdir
from watchdog.utils.dirsnapshot import DirectorySnapshot, DirectorySnapshotDiff

from dpypeline.config.model import WatchConfig
from dpypeline.watching.patterns import PathMatcher
from dpypeline.watching.scan import scan
from dpypeline.watching.scanner import Scanner
from dpypeline.watching.watch import Inbox, build_specs


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


def bench_poll_cpu(ctx: Context) -> Result:
    """Process CPU time of one poll cycle with nothing changed, the steady state of a poll
    watch: ours is a request to the service's scan thread (a scan, then the comparison with
    the last poll); watchdog's is what its PollingEmitter does each interval (a new
    DirectorySnapshot, then DirectorySnapshotDiff against the previous one)."""
    n = ctx.size("poll_cpu")
    repeats = ctx.repeats(3)
    with workdir(ctx, "poll") as d:
        root = str(d / "tree")
        os.mkdir(root)
        build_tree(root, n, 1000)
        watch = WatchConfig(path=root, patterns=["**/*.nc"], mode="poll")
        specs = build_specs([watch])
        inbox = Inbox()
        scanner = Scanner(inbox)
        scanner.start()

        def poll() -> int:
            scanner.request(specs[0].target(), "poll")
            while not (found := inbox.drain()):
                inbox.wake.wait(1.0)
                inbox.wake.clear()
            return len(found[0].files)

        def cpu(run: Callable[[], object]) -> float:
            start = time.process_time()
            run()
            return time.process_time() - start

        try:
            check(poll() == n, "files found by the first poll", n)  # the poll's own snapshot
            snapshot = [DirectorySnapshot(root, recursive=True)]

            def watchdog_cycle() -> None:
                new = DirectorySnapshot(root, recursive=True)
                diff = DirectorySnapshotDiff(snapshot[0], new)
                check(not diff.files_modified and not diff.files_created, "changes", diff)
                snapshot[0] = new

            ours_cpu, base_cpu = float("inf"), float("inf")
            changed = 0
            for _ in range(repeats):
                start = time.process_time()
                changed = poll()
                ours_cpu = min(ours_cpu, time.process_time() - start)
                base_cpu = min(base_cpu, cpu(watchdog_cycle))
            check(changed == 0, "files changed between polls", changed)
        finally:
            scanner.stop()
            scanner.join(10)
    ratio = ours_cpu / base_cpu
    result = Result(
        name="poll_cpu",
        ours=ours_cpu,
        unit="s CPU",
        baseline=base_cpu,
        baseline_unit="s CPU (PollingObserver)",
        ratio=ratio,
        ratio_kind="time",
        target="<= 0.5x CPU",
        met=ratio <= 0.5,
        n=n,
        repeats=repeats,
    )
    result.notes.append(
        f"one cycle, nothing changed, {n:,} files in {-(-n // 1000)} directories, warm cache;"
        " process CPU time (time.process_time)"
    )
    return result


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
