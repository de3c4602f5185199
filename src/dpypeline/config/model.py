"""The pipeline configuration: YAML read safely, validated into frozen pydantic models.

A bad config must stop start-up with a message the operator can act on without
reading code, so the loader remembers the line of every key and list item and every
problem is reported as ``<file>:<line>: <field.path>: <what is wrong>`` - all of them
at once, not only the first. The file is read (safely, with its lines, ``${VAR}``
expanded) by :mod:`dpypeline.config.file`; this module holds the models and the checks.

Task modules are not imported here; whoever imports them uses
:meth:`PipelineConfig.where` to point at the offending line.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dpypeline.config.durations import Duration
from dpypeline.config.file import Expansion, LineLoader, Loc, expand, read_config, yaml_errors
from dpypeline.errors import ConfigError

_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_FIELD_NAMES = {"with_": "with", "class_": "class"}  # Python names -> the YAML keys used in locs


def _absolute(value: Path, info: ValidationInfo) -> Path:
    """Relative paths in the file mean "next to the config file", wherever the service runs."""
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    return Path(os.path.normpath(base / value.expanduser()))


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


AbsPath = Annotated[Path, AfterValidator(_absolute)]
LogFormat = Literal["auto", "json", "console", "journald"]
LogLevel = Literal["debug", "info", "warning", "error"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WatchConfig(_Section):
    path: AbsPath
    patterns: list[str] = ["**/*"]
    ignore_patterns: list[str] = [".*", "*.tmp", "*.part"]
    case_sensitive: bool = True
    follow_symlinks: bool = False  # symbolic links (to files) are taken only if true
    mode: Literal["auto", "inotify", "poll"] = "auto"
    poll_interval: Duration = 30.0
    settle: Duration = 2.0
    rescan_interval: Duration = 600.0  # 0 disables the safety-net scan


class TaskConfig(_Section):
    task: str  # a built-in name or a dotted path; resolved (and checked) where tasks are imported
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class JobConfig(_Section):
    name: str
    tasks: list[TaskConfig] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not _JOB_NAME.fullmatch(value):
            raise ValueError(
                f"bad job name {value!r} (use letters, digits, '_', '.' and '-' only; "
                "it names the job in the queue and in logs)"
            )
        return value


class BackoffConfig(_Section):
    initial: Duration = 10.0
    factor: float = Field(default=2.0, ge=1)
    max: Duration = 600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1-based)."""
        return float(min(self.initial * self.factor ** max(failures - 1, 0), self.max))


class RetryConfig(_Section):
    max_attempts: int = Field(default=5, ge=1)
    backoff: BackoffConfig = BackoffConfig()
    job_timeout: Duration | None = 7200.0  # None: no timeout

    @field_validator("job_timeout")
    @classmethod
    def _zero_means_none(cls, value: float | None) -> float | None:
        return value or None


SCALE_FIXED = ("jobs", "n", "cores", "memory")
SCALE_ADAPTIVE = ("minimum", "maximum", "minimum_jobs", "maximum_jobs")


class ClusterConfig(_Section):
    class_: str = Field(default="dask.distributed.LocalCluster", alias="class")
    options: dict[str, Any] = {}
    scale: dict[str, Any] | None = None  # cluster.scale(**scale), or cluster.adapt(**scale)

    @field_validator("scale")
    @classmethod
    def _scale_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if not value:
            return value
        unknown = sorted(set(value) - {*SCALE_FIXED, *SCALE_ADAPTIVE})
        if unknown:
            raise ValueError(
                f"unknown key {', '.join(unknown)} (fixed size: {', '.join(SCALE_FIXED)};"
                f" adaptive: {', '.join(SCALE_ADAPTIVE)})"
            )
        if set(value) & set(SCALE_FIXED) and set(value) & set(SCALE_ADAPTIVE):
            raise ValueError("give either a fixed size or adaptive bounds, not both")
        return value


class TlsConfig(_Section):
    """Certificate files for a Dask cluster the operator runs or the service submits (an
    ``address``, a batch cluster): every scheduler, worker and client proves itself with a
    certificate signed by ``ca_file``. ``key`` may be left out when ``cert`` holds it."""

    ca_file: AbsPath
    cert: AbsPath
    key: AbsPath | None = None


class ExecutorConfig(_Section):
    kind: Literal["serial", "dask"] = "serial"
    address: str | None = None
    cluster: ClusterConfig | None = None
    tls: TlsConfig | None = None
    workers_per_event: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _tls_address(self) -> ExecutorConfig:
        if self.tls is not None and self.address and not self.address.startswith("tls://"):
            raise ValueError(
                f"address {self.address!r} is not a tls:// address, but tls is set: the"
                " certificates only secure a scheduler listening on tls://"
            )
        return self


class ObjectStoreConfig(_Section):
    credentials: AbsPath | None = None
    endpoint_url: str | None = None
    region: str | None = None
    # A store that hangs must count as an outage within a minute: each request gets
    # `attempts` tries, each waiting at most `connect_timeout` for the connection and
    # `read_timeout` for the answer (the time a body takes to go up is not counted).
    connect_timeout: Annotated[Duration, Field(gt=0)] = 5.0
    read_timeout: Annotated[Duration, Field(gt=0)] = 20.0
    attempts: int = Field(default=2, ge=1)
    # Whether the store honours conditional writes (If-Match / If-None-Match), which
    # Icechunk uses to detect a second writer. JASMIN's object store does not: set false,
    # and an Icechunk repository there is safe only with one writer (dpypeline).
    conditional_writes: bool = True


class LoggingConfig(_Section):
    format: Annotated[LogFormat, BeforeValidator(_lower)] = "auto"
    level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"  # INFO works too


class MetricsConfig(_Section):
    # host:port of the Prometheus endpoint (/metrics); None: no endpoint. Loopback keeps it
    # off the network unless the operator chooses otherwise.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            listen_address(value)
        return value


def listen_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ("127.0.0.1", 9464); ``"[::1]:9464"`` -> ("::1", 9464)."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)


class _DuplicateJob(ValueError):
    """Carries the location below ``jobs`` so the error points at the second name's line."""

    def __init__(self, message: str, sub_loc: Loc) -> None:
        super().__init__(message)
        self.sub_loc = sub_loc


class PipelineConfig(_Section):
    """One pipeline file, validated; it also answers "which line was that?" for later errors."""

    name: str = Field(min_length=1)
    cache_dir: AbsPath
    monitor: bool = True
    retention: Duration = 30 * 86400.0  # how long jobs of files gone from disk stay in the ledger
    stop_grace: Duration = 30.0  # on stop, running jobs get this long, then go back to the queue
    # snapshots of Icechunk stores older than this leave their history at `dpypeline gc`
    # (a branch's tip never does); None keeps them all
    snapshot_expiry: Duration | None = 30 * 86400.0
    watch: list[WatchConfig] = Field(min_length=1)
    executor: ExecutorConfig = ExecutorConfig()
    retry: RetryConfig = RetryConfig()
    objectstores: dict[str, ObjectStoreConfig] = {}
    setup: list[TaskConfig] = []
    jobs: list[JobConfig] = Field(min_length=1)
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = None  # set by load_config; not a key of the file
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)
    _base_dir: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """What a relative path in the config is relative to: the config file's directory
        (the current directory for a config given as data without one)."""
        return self._base_dir or Path.cwd()

    @field_validator("jobs")
    @classmethod
    def _unique_job_names(cls, jobs: list[JobConfig]) -> list[JobConfig]:
        first: dict[str, int] = {}
        for index, job in enumerate(jobs):
            if job.name in first:
                raise _DuplicateJob(
                    f"duplicate job name {job.name!r} (also jobs[{first[job.name]}].name); "
                    "each job's name identifies its queue entries",
                    (index, "name"),
                )
            first[job.name] = index
        return jobs

    def line_of(self, *loc: str | int) -> int | None:
        """The line of the key or item at *loc* (or of its nearest parent that has one)."""
        return _line(self._lines, tuple(_FIELD_NAMES.get(str(p), p) for p in loc))

    def where(self, *loc: str | int) -> str:
        """``pipeline.yaml:12: jobs[0].tasks[1].task`` - the prefix of an error about *loc*."""
        return _where(self.source, self._lines, tuple(_FIELD_NAMES.get(str(p), p) for p in loc))


def _line(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _where(source: Path | None, lines: Mapping[Loc, int], loc: Loc) -> str:
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if source is None:
        return field
    line = _line(lines, loc)
    prefix = f"{source.name}:{line}" if line is not None else source.name
    return f"{prefix}: {field}" if field else prefix


# --- validation -----------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Read, expand and validate the pipeline file; ConfigError lists every problem found."""
    source = Path(os.path.abspath(path))
    try:
        text = read_config(source)
    except FileNotFoundError:
        hint = "pass -c FILE or set DPYPELINE_CONFIG"
        raise ConfigError(f"config file not found: {path} ({hint})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    with yaml_errors(source.name):
        data = yaml.load(text, Loader=LineLoader)  # a SafeLoader subclass, bounded
    if data is None:
        raise ConfigError(f"{source.name}: the file is empty (it needs at least watch and jobs)")
    config = _build(data, base_dir=source.parent, name=source.stem, environ=environ, source=source)
    check_watch_paths(config)
    return config


def check_watch_paths(config: PipelineConfig) -> None:
    """Every watched directory must exist when the service starts (ConfigError if not)."""
    problems: list[tuple[Loc, str]] = []
    for i, watch in enumerate(config.watch):
        if not watch.path.exists():
            problem = f"watch directory does not exist: {watch.path} (create it or fix"
        elif not watch.path.is_dir():
            problem = f"watch path is not a directory: {watch.path} (fix"
        else:
            continue
        problems.append((("watch", i, "path"), f"{problem} watch[{i}].path)"))
    if problems:
        raise _report(problems, config.source, config._lines)


def config_from_dict(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
    lines: Mapping[Loc, int] | None = None,
) -> PipelineConfig:
    """Validate a config given as Python data; relative paths are relative to *base_dir* (cwd).

    *source* and *lines* (the line in *source* of each location) let errors point at the
    file the data was read from, when it was not read by :func:`load_config`.
    """
    name = source.stem if source is not None else "pipeline"
    base_dir = base_dir or Path.cwd()
    return _build(data, base_dir=base_dir, name=name, environ=environ, source=source, lines=lines)


def _build(
    data: Any,
    *,
    base_dir: Path,
    name: str,
    environ: Mapping[str, str] | None,
    source: Path | None = None,
    lines: Mapping[Loc, int] | None = None,
) -> PipelineConfig:
    """Expand, fill in the defaults that depend on where the file is, and validate."""
    environ = os.environ if environ is None else environ
    env = Expansion(environ)
    if source is not None:
        env.lines[()] = 1
    env.lines.update(lines or {})
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        problem = f"the config must be a mapping of keys (name, watch, jobs, ...), not a {kind}"
        raise _report([((), problem)], source, env.lines)
    try:
        data = expand(data, (), env)
    except RecursionError:
        raise _report(
            [((), "nested too deeply (a recursive anchor?)")], source, env.lines
        ) from None
    if env.problems:
        raise _report(env.problems, source, env.lines)
    problems: list[tuple[Loc, str]] = []
    if "source" in data:  # a model field, but one only the loader may set
        problems.append((("source",), f"unknown key ({_allowed(())})"))
        del data["source"]
    data.setdefault("name", name)
    data.setdefault("cache_dir", environ.get("CACHE_DIR") or base_dir / ".dpypeline")
    try:
        config = PipelineConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems += [_describe(error) for error in exc.errors()]
    if problems:
        raise _report(problems, source, env.lines)
    config = config.model_copy(update={"source": source})
    config._lines = env.lines
    config._base_dir = base_dir
    return config


def _report(
    problems: list[tuple[Loc, str]], source: Path | None, lines: dict[Loc, int]
) -> ConfigError:
    """One line per problem, in file order, each starting with ``file:line: field``."""
    report = []
    for loc, text in sorted(problems, key=lambda problem: _line(lines, problem[0]) or 0):
        where = _where(source, lines, loc)
        report.append(f"{where}: {text}" if where else text)
    return ConfigError("\n".join(report))


def _describe(error: Any) -> tuple[Loc, str]:
    """Where a pydantic error is, in YAML keys, and what it says in the operator's terms."""
    loc: Loc = tuple(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _DuplicateJob):
        loc += cause.sub_loc
    if loc[-1:] == ("[key]",):  # a mapping key that is not a string, e.g. `1:`
        return loc[:-1], "keys must be strings"
    if error["type"] == "extra_forbidden":
        return loc, f"unknown key ({_allowed(loc[:-1])})"
    if error["type"] == "missing":
        return loc, "required key is missing"
    return loc, str(cause) if isinstance(cause, ValueError) else error["msg"]


def _allowed(loc: Loc) -> str:
    """The keys allowed in the section at *loc*, for the hint after an unknown key."""
    kind: Any = PipelineConfig
    for part in loc:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            fields = {f.alias or n: f.annotation for n, f in kind.model_fields.items()}
            kind = fields.get(str(part))
        elif get_origin(kind) in (list, dict):
            kind = get_args(kind)[-1]
        if get_origin(kind) in (Union, types.UnionType):  # `X | None` -> X
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return "this section takes no keys"
    keys = [f.alias or n for n, f in kind.model_fields.items() if n != "source"]
    return "allowed: " + ", ".join(keys)
