"""The Python API: build a pipeline in code or load it from YAML, run it with the same
engine as ``dpypeline run``, logging as it does, and get back what ``run --once`` tells the
shell: its exit code, with the jobs that ended dead."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from dpypeline.config.model import PipelineConfig, config_from_dict, load_config
from dpypeline.errors import ConfigError
from dpypeline.observability import logs
from dpypeline.observability.redact import known_secrets
from dpypeline.pipeline import Job, Task, import_tasks
from dpypeline.state.ledger import JobRecord


class RunResult(int):
    """What ``Pipeline.run()`` returns: the exit code ``dpypeline run`` would exit with (0,
    3 when a job of a ``once`` run ended dead, 75 at a time budget), so ``sys.exit(result)``
    and ``result == 0`` work as with the plain code it used to be; and the detail a script
    needs to act on it: ``dead``, the jobs that ended dead in this run (``id``, ``path``,
    ``job``, ``attempts``, ``error``), and ``outcomes``, attempts of this run by the state
    they ended in (``{"done": 11, "dead": 1}``)."""

    dead: tuple[JobRecord, ...]
    outcomes: dict[str, int]

    def __new__(
        cls, code: int, dead: tuple[JobRecord, ...] = (), outcomes: dict[str, int] | None = None
    ) -> RunResult:
        result = super().__new__(cls, code)
        result.dead, result.outcomes = dead, dict(outcomes or {})
        return result

    def __repr__(self) -> str:
        return f"RunResult({int(self)}, dead={len(self.dead)}, outcomes={self.outcomes})"


def host_configured_logging() -> bool:
    """Whether the calling program set up logging itself (``logging.basicConfig``, its own
    handlers, or structlog), rather than dpypeline in an earlier run: then its set-up stays."""
    if not structlog.is_configured():
        return bool(logging.getLogger().handlers)
    processors = structlog.get_config()["processors"]
    ours = processors[-1:] == [structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
    return not (logs.settings() and ours)


class Pipeline:
    """``Pipeline(watch=[...], jobs=[Job(...)])`` or ``Pipeline.from_yaml(path)``.

    ``watch`` items are directories (str/Path) or dicts with the keys of a YAML watch
    entry; the other keyword arguments are the YAML's top-level sections.
    """

    def __init__(
        self,
        watch: Sequence[str | os.PathLike[str] | dict[str, Any]] = (),
        jobs: Sequence[Job] = (),
        *,
        setup: Sequence[Task] = (),
        config: PipelineConfig | None = None,
        **sections: Any,
    ) -> None:
        self.jobs, self.setup = list(jobs), list(setup)
        if config is None:
            data: dict[str, Any] = {
                "name": "pipeline",
                **sections,
                "watch": [w if isinstance(w, dict) else {"path": str(w)} for w in watch],
                "jobs": [
                    {"name": j.name, "tasks": [{"task": t.name} for t in j.tasks]}
                    for j in self.jobs
                ],
            }
            data.setdefault("cache_dir", os.environ.get("CACHE_DIR") or ".dpypeline")
            config = config_from_dict(data, base_dir=Path.cwd())
        self.config = config
        self._service: Any = None
        self._stop_asked = False

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Pipeline:
        config = load_config(path)
        jobs, setup = import_tasks(config)
        return cls(jobs=jobs, setup=setup, config=config)

    def run(self, once: bool | None = None, *, dask_client: Any = None) -> RunResult:
        """Run the service in this process; ``once=True`` drains and returns a
        :class:`RunResult` (the exit code, and the jobs that ended dead). ``dask_client``: a
        ``dask.distributed.Client`` of your own for ``executor: {kind: dask}`` to run on
        (left open at the end), instead of the cluster it would start.

        Logging is set up as ``dpypeline run`` does (the config's ``logging:``: one line
        per event, a short traceback without frame locals) unless the program configured
        logging itself, whose set-up is then kept."""
        from dpypeline.loop.service import Service

        if dask_client is not None and self.config.executor.kind != "dask":
            raise ConfigError("a Dask client needs `executor: {kind: dask}`")
        if not host_configured_logging():
            logs.configure(
                self.config.logging.format,
                self.config.logging.level,
                secrets=known_secrets(self.config),
                roots=[str(w.path) for w in self.config.watch],
            )
        service = Service(self.config, self.jobs, self.setup, once=once, dask_client=dask_client)
        self._service = service
        if self._stop_asked:
            service.request_stop()
        try:
            code = service.run()
        finally:
            self._service, self._stop_asked = None, False
        return RunResult(code, tuple(service.dead_jobs), service.outcomes)

    def stop(self) -> None:
        """Ask a ``run()`` in another thread to stop, as SIGTERM would: no new job starts,
        running ones finish (or go back to the queue after ``stop_grace``), then ``run()``
        returns. Safe to call before ``run()`` has started."""
        self._stop_asked = True
        if self._service is not None:
            self._service.request_stop()
