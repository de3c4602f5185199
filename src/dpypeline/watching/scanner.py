"""The scan thread: walks of the watched trees, off the loop's thread.

It runs the start-up and periodic reconciliation scans, the scans of new subdirectories,
and the polls of ``poll`` watches, and puts what it found into the loop's inbox as one
``scanned`` observation per request, also when the walk failed, so the loop never waits
for a scan that will not report. It never touches the loop's watch specs: each request
carries a :class:`ScanTarget` copied from one, and what a full scan learnt of the tree (its
number of directories) travels back in the observation.
"""

from __future__ import annotations

import queue
import threading

import structlog

from dpypeline.watching.observations import Scanned
from dpypeline.watching.patterns import PathMatcher
from dpypeline.watching.scan import FileVersion, natural_key, scan
from dpypeline.watching.watch import Inbox, ScanTarget

__all__ = ["PrefixMatcher", "Scanner"]

log = structlog.stdlib.get_logger("dpypeline.watch")


class Scanner(threading.Thread):
    """Walks watched trees off the loop's thread: start-up and periodic reconciliation,
    new subdirectories, and the polls of ``poll`` watches. Results go to the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__(name="dpypeline-scan", daemon=True)
        self.inbox = inbox
        self._requests: queue.SimpleQueue[tuple[ScanTarget, str | None, str] | None] = (
            queue.SimpleQueue()
        )
        # by watch index, of poll watches only: the last look a poll compares with
        self.last_poll: dict[int, dict[str, FileVersion]] = {}

    def request(self, target: ScanTarget, reason: str, subdir: str | None = None) -> None:
        self._requests.put((target, subdir, reason))

    def stop(self) -> None:
        self._requests.put(None)

    def run(self) -> None:
        while (req := self._requests.get()) is not None:
            spec, subdir, reason = req
            try:
                self.inbox.put(self._scan(spec, subdir, reason))
            except Exception as exc:  # a failed walk must not end the thread (and the rescans)
                log.exception(
                    "scan_failed",
                    watch=spec.root,
                    path=subdir or spec.root,
                    error=f"{type(exc).__name__}: {exc}",
                    action="the next scan retries it",
                )
                # every scan reports its end, or the loop waits for it forever (--once)
                path = subdir or spec.root
                self.inbox.put(Scanned(spec.index, path, reason, failed=True))

    def _scan(self, spec: ScanTarget, subdir: str | None, reason: str) -> Scanned:
        follow = spec.follow_symlinks
        if subdir is not None:
            rel = spec.relative(subdir) or ""
            sub = PrefixMatcher(spec.matcher, rel)
            result = scan(subdir, sub, follow_symlinks=follow)  # type: ignore[arg-type]
            return Scanned(
                spec.index,
                subdir,
                reason,
                tuple(result.files),
                directories=result.directories,
            )
        if reason == "poll":
            known = self.last_poll.get(spec.index, {})
            result = scan(spec.root, spec.matcher, sort=False, known=known, follow_symlinks=follow)
            files = self._changed(spec, result.files)
        else:
            result = scan(spec.root, spec.matcher, follow_symlinks=follow)
            files = result.files
            # only a poll watch compares with the last look (a million-file dict otherwise)
            self.last_poll[spec.index] = {f.path: f for f in files} if spec.poll else {}
        for path, err in result.errors:
            log.warning(
                "scan_unreadable",
                watch=spec.root,
                path=path,
                error=str(err),
                action="files below it are not seen until it is readable",
            )
        return Scanned(
            spec.index,
            spec.root,
            reason,
            tuple(files),
            full=True,
            directories=result.directories,
        )

    def _changed(self, spec: ScanTarget, files: list[FileVersion]) -> list[FileVersion]:
        """The files that are new or changed since the last look, in natural order; the
        current look becomes the last one."""
        last = self.last_poll.get(spec.index, {})
        changed = []
        for f in files:
            old = last.get(f.path)
            if old is None or old.size != f.size or old.mtime_ns != f.mtime_ns:
                changed.append(f)
        if changed or len(files) != len(last):
            self.last_poll[spec.index] = {f.path: f for f in files}
        # else: the same paths (none new, as many as before), so the last look stands
        cut = len(spec.root) + 1
        changed.sort(key=lambda f: natural_key(f.path[cut:]))
        return changed


class PrefixMatcher:
    """A watch's matcher for a walk that starts in one of its subdirectories."""

    def __init__(self, matcher: PathMatcher, prefix: str) -> None:
        self._m, self._prefix = matcher, prefix + "/" if prefix else ""

    def matches(self, relpath: str) -> bool:
        return self._m.matches(self._prefix + relpath)

    def could_contain(self, reldir: str) -> bool:
        return self._m.could_contain(self._prefix + reldir)
