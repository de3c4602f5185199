"""The Python API: build a pipeline in code or load it from YAML, run it with the same
engine as ``dpypeline run``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpypeline.config import PipelineConfig, config_from_dict, load_config
from dpypeline.errors import ConfigError
from dpypeline.pipeline import Job, Task, import_tasks


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

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Pipeline:
        config = load_config(path)
        jobs, setup = import_tasks(config)
        return cls(jobs=jobs, setup=setup, config=config)

    def run(self, once: bool | None = None, *, dask_client: Any = None) -> int:
        """Run the service in this process; ``once=True`` drains and returns (exit code).
        ``dask_client``: a ``dask.distributed.Client`` of your own for ``executor: {kind:
        dask}`` to run on (left open at the end), instead of the cluster it would start."""
        from dpypeline.service import Service

        if dask_client is not None and self.config.executor.kind != "dask":
            raise ConfigError("a Dask client needs `executor: {kind: dask}`")
        service = Service(self.config, self.jobs, self.setup, once=once, dask_client=dask_client)
        return service.run()
