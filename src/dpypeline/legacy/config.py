"""The original dpypeline's tagged YAML, as the new config: its records mapped key by key.

``event_consumer`` names everything that runs: its ``akita`` becomes the watch, its
``job_producer``'s jobs the jobs, a ``!ConsumerParallel`` the Dask executor with the
``!DaskClient``'s cluster; ``!Method create_bucket`` under ``single_run_functions``
becomes a setup task, each ``!ObjectStoreS3`` a named object store. Task functions keep
their dotted paths. Relative paths in the file are relative to the working directory, as
they were.

Every place where the mapping had to choose (a default that differs, a key with no
equivalent) leaves a note at the new config's location; ``dpypeline migrate`` writes
the notes as comments. What cannot be mapped is an error naming its line and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpypeline.config.model import (
    Loc,
    WatchConfig,
)
from dpypeline.errors import ConfigError
from dpypeline.legacy.watched import as_the_original_took
from dpypeline.legacy.yaml_tags import Tagged, parse

_JOB_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Conversion:
    """The new config's data, the line of the old file behind each location, and notes."""

    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)
    notes: dict[Loc, list[str]] = field(default_factory=dict)
    # where a task was given an !ObjectStoreS3 itself: its argument's location -> the store
    objects: dict[Loc, str] = field(default_factory=dict)

    def note(self, loc: Loc, text: str) -> None:
        self.notes.setdefault(loc, []).append(text)


def read(
    path: str | os.PathLike[str],
    rebase: Callable[[str], str] | None = None,
    *,
    check_writers: bool = True,
) -> Conversion:
    """The original's file as new-format config data. *rebase* rewrites a relative path of
    the file (relative to the working directory) for where the data will be used;
    *check_writers* refuses a file others can change (one to be run, not converted)."""
    source = Path(path)
    doc, duplicates = parse(source, check_writers=check_writers)
    mapper = _Mapper(source.name, source.stem, rebase or (lambda p: p))
    conversion = mapper.convert(doc)
    for key, first, last in duplicates:
        loc: Loc = ("executor",) if key == "event_consumer" else ()
        conversion.note(
            loc,
            f"the original file sets {key} twice (lines {first} and {last}); as its loader"
            f" did, the last one (line {last}) is used",
        )
    return conversion


class _Mapper:
    """Walks the tagged records from ``event_consumer`` down and collects problems."""

    def __init__(self, file: str, name: str, rebase: Callable[[str], str]) -> None:
        self.file = file
        self.rebase = rebase
        self.problems: list[tuple[int, str]] = []
        self.stores: dict[int, str] = {}  # id(!ObjectStoreS3 record) -> its name
        self.out = Conversion({"name": name})

    def convert(self, doc: Any) -> Conversion:
        if not isinstance(doc, dict) or not isinstance(doc.get("event_consumer"), Tagged):
            self.fail(
                1,
                "no event_consumer: the original's file names a !ConsumerSerial or"
                " !ConsumerParallel under `event_consumer`, with its akita and"
                " job_producer",
            )
        else:
            consumer = doc["event_consumer"]
            self.expect(consumer, "ConsumerSerial", "ConsumerParallel")
            for functions in _as_list(doc.get("single_run_functions")):
                self.setup(functions)
            self.executor(consumer)
            self.watch(self.field(consumer, "akita", "Akita"))
            pipeline = self.field(consumer, "job_producer", "ThreadPipeline", "BasicPipeline")
            if pipeline is not None:
                self.jobs(pipeline)
        if self.problems:
            raise ConfigError(
                "\n".join(f"{self.file}:{line}: {text}" for line, text in sorted(self.problems))
            )
        order = ("name", "monitor", "watch", "objectstores", "setup", "executor", "jobs")
        self.out.data = {key: self.out.data[key] for key in order if key in self.out.data}
        return self.out

    # --- helpers -----------------------------------------------------------------------

    def fail(self, line: int, text: str) -> None:
        self.problems.append((line, text))

    def expect(self, record: Tagged, *tags: str) -> bool:
        if record.tag in tags:
            return True
        self.fail(record.line, f"!{record.tag} found where !{' or !'.join(tags)} belongs")
        return False

    def field(self, record: Tagged, key: str, *tags: str) -> Tagged | None:
        value = record.fields.get(key)
        if isinstance(value, Tagged) and self.expect(value, *tags):
            return value
        if not isinstance(value, Tagged):
            self.fail(
                record.lines.get(key, record.line),
                f"!{record.tag} needs {key}: an alias of a !{' or !'.join(tags)}",
            )
        return None

    def unknown(self, record: Tagged, known: set[str]) -> None:
        for key in sorted(set(record.fields) - known):
            allowed = ", ".join(sorted(known))
            self.fail(record.lines[key], f"!{record.tag}: unknown key {key} (allowed: {allowed})")

    def path(self, value: Any, loc: Loc, line: int) -> str:
        text = _literal(str(value))
        new = self.rebase(text)
        if new != text:
            self.out.note(
                loc,
                f"was {text!r}, relative to the working directory; this file's"
                " paths are relative to the file itself",
            )
        self.out.lines[loc] = line
        return new

    # --- the parts ---------------------------------------------------------------------

    def watch(self, akita: Tagged | None) -> None:
        if akita is None:
            return
        f, loc = akita.fields, ("watch", 0)
        self.unknown(
            akita,
            {
                "path",
                "patterns",
                "ignore_patterns",
                "ignore_directories",
                "case_sensitive",
                "glob_kwargs",
                "monitor",
            },
        )
        self.out.lines[("watch",)] = self.out.lines[loc] = akita.line
        if "path" not in f:
            self.fail(akita.line, "!Akita needs path: the directory to watch")
            return
        watch: dict[str, Any] = {"path": self.path(f["path"], (*loc, "path"), akita.lines["path"])}
        patterns = f.get("patterns")
        if patterns is not None:
            given = [_literal(str(p)) for p in _as_list(patterns)]
            monitor = bool(f.get("monitor", True))
            glob_kwargs = f["glob_kwargs"] if isinstance(f.get("glob_kwargs"), dict) else {}
            watch["patterns"] = as_the_original_took(
                given, monitor=monitor, glob_kwargs=glob_kwargs
            )
            if watch["patterns"] != given:
                self.out.note(
                    (*loc, "patterns"),
                    f"was {given}: matched as the original matched them, from the top of"
                    " path (a leading ./ anchors a pattern there), so files further down,"
                    " such as a job's outputs, are not taken"
                    + (
                        ""
                        if not any("**" in p for p in given)
                        else "; ** is any number of directories"
                        if monitor or glob_kwargs.get("recursive")
                        else "; ** is one directory, as in its glob without recursive"
                    ),
                )
        ignore = f.get("ignore_patterns")
        if ignore is None:
            watch["ignore_patterns"] = list(WatchConfig.model_fields["ignore_patterns"].default)
            self.out.note(
                (*loc, "ignore_patterns"),
                "the original ignored nothing here; these"
                " leave out hidden and partial files (rsync's and scp's names while"
                " they write). Write [] to take every file",
            )
        else:
            watch["ignore_patterns"] = [_literal(str(p)) for p in _as_list(ignore)]
        if "case_sensitive" in f:
            watch["case_sensitive"] = bool(f["case_sensitive"])
        if f.get("ignore_directories") is False:
            self.out.note(
                loc,
                "ignore_directories: false is not carried over: jobs run on"
                " files only, never on directories",
            )
        if f.get("glob_kwargs"):
            self.out.note(
                loc,
                "glob_kwargs is not carried: its recursive is in the patterns (** for"
                " any number of directories); the start-up scan and the watcher take the"
                " same files",
            )
        self.out.note(
            loc,
            "a file is taken once it is complete (closed, or still for"
            " `settle`, 2s by default), not when it is created",
        )
        for key in watch:
            self.out.lines[(*loc, key)] = akita.lines.get(key, akita.line)
        self.out.data["watch"] = [watch]
        if "monitor" in f:
            self.out.data["monitor"] = bool(f["monitor"])
            self.out.lines[("monitor",)] = akita.lines["monitor"]
            if not f["monitor"]:
                self.out.note(
                    ("monitor",),
                    "monitor: false, as in the original: process the"
                    " files there, then stop (what `dpypeline run --once` does)",
                )

    def executor(self, consumer: Tagged) -> None:
        self.out.lines[("executor",)] = consumer.line
        if consumer.tag == "ConsumerSerial":
            self.unknown(consumer, {"akita", "job_producer"})
            self.out.data["executor"] = {"kind": "serial"}
            return
        self.unknown(consumer, {"akita", "job_producer", "cluster_client", "workers_per_event"})
        executor: dict[str, Any] = {"kind": "dask"}
        if "workers_per_event" in consumer.fields:
            executor["workers_per_event"] = consumer.fields["workers_per_event"]
            self.out.lines[("executor", "workers_per_event")] = consumer.lines["workers_per_event"]
        client = consumer.fields.get("cluster_client")
        if isinstance(client, Tagged) and self.expect(client, "DaskClient"):
            options = {k: v for k, v in client.fields.items() if k not in ("cluster", "scale")}
            cluster: dict[str, Any] = {"class": client.fields.get("cluster", "LocalCluster")}
            if options:
                cluster["options"] = options
            if client.fields.get("scale"):
                cluster["scale"] = client.fields["scale"]
            executor["cluster"] = cluster
            self.out.lines[("executor", "cluster")] = client.line
            for key in cluster:
                self.out.lines[("executor", "cluster", key)] = client.lines.get(key, client.line)
        elif client is not None:
            self.fail(consumer.lines["cluster_client"], "cluster_client must be a !DaskClient")
        self.out.data["executor"] = executor

    def jobs(self, pipeline: Tagged) -> None:
        self.unknown(pipeline, {"jobs"})
        jobs: list[dict[str, Any]] = []
        self.out.lines[("jobs",)] = pipeline.lines.get("jobs", pipeline.line)
        for record in _as_list(pipeline.fields.get("jobs")):
            if not isinstance(record, Tagged) or not self.expect(record, "Job"):
                if not isinstance(record, Tagged):
                    self.fail(pipeline.line, "the pipeline's jobs must be !Job entries")
                continue
            jobs.append(self.job(record, ("jobs", len(jobs))))
        if not jobs and not self.problems:
            self.fail(pipeline.line, "the pipeline has no jobs")
        self.out.data["jobs"] = jobs

    def job(self, record: Tagged, loc: Loc) -> dict[str, Any]:
        self.unknown(record, {"name", "tasks"})
        self.out.lines[loc] = record.line
        name = str(record.fields.get("name") or f"job{loc[-1]}")
        clean = _JOB_NAME_BAD.sub("-", name).strip("-") or f"job{loc[-1]}"
        if clean != name:
            self.out.note(
                (*loc, "name"), f"was {name!r}: a job name has letters, digits, _ . - only"
            )
        self.out.lines[(*loc, "name")] = record.lines.get("name", record.line)
        tasks = []
        for index, task in enumerate(_as_list(record.fields.get("tasks"))):
            task_loc = (*loc, "tasks", index)
            if isinstance(task, Tagged) and self.expect(task, "Task"):
                tasks.append(self.task(task, task_loc))
            elif not isinstance(task, Tagged):
                self.fail(record.lines.get("tasks", record.line), "a job's tasks must be !Task")
        if not tasks:
            self.fail(record.line, f"job {name!r} has no tasks")
        return {"name": clean, "tasks": tasks}

    def task(self, record: Tagged, loc: Loc) -> dict[str, Any]:
        self.out.lines[loc] = record.line
        function = record.fields.get("function")
        if not isinstance(function, str) or not function:
            self.fail(record.line, "!Task needs function: the dotted path of a function")
            function = ""
        self.out.lines[(*loc, "task")] = record.lines.get("function", record.line)
        kwargs = {}
        for key, value in record.fields.items():
            if key == "function":
                continue
            self.out.lines[(*loc, "with", key)] = record.lines[key]
            kwargs[key] = self.argument(value, (*loc, "with", key), record.lines[key])
        task: dict[str, Any] = {"task": function}
        if kwargs:
            task["with"] = kwargs
        return task

    def argument(self, value: Any, loc: Loc, line: int) -> Any:
        """A task's keyword argument as plain data; an object store becomes its name."""
        if isinstance(value, Tagged):
            if value.tag == "ObjectStoreS3":
                name = self.store(value)
                self.out.objects[loc] = name
                self.out.note(
                    loc,
                    f"was the object store itself; the task now gets its name,"
                    f" {name!r}: dpypeline.objectstore.filesystem(context.objectstores,"
                    " name) gives the filesystem to a task that takes `context`. The"
                    " built-in tasks (upload_file, to_zarr) take objectstore: NAME",
                )
                return name
            self.fail(value.line, f"!{value.tag} cannot be a task's argument")
            return None
        if isinstance(value, dict):
            return {k: self.argument(v, (*loc, k), line) for k, v in value.items()}
        if isinstance(value, list):
            return [self.argument(v, (*loc, i), line) for i, v in enumerate(value)]
        return _literal(value) if isinstance(value, str) else value

    def store(self, record: Tagged) -> str:
        if id(record) in self.stores:
            return self.stores[id(record)]
        name = _JOB_NAME_BAD.sub("_", record.anchor or f"store{len(self.stores) + 1}")
        self.stores[id(record)] = name
        loc: Loc = ("objectstores", name)
        self.out.lines[("objectstores",)] = self.out.lines.get(("objectstores",), record.line)
        self.out.lines[loc] = record.line
        self.unknown(record, {"anon", "store_credentials_json"})
        store: dict[str, Any] = {}
        if record.fields.get("anon"):
            self.fail(
                record.lines["anon"],
                "anon: true (anonymous access) is not supported:"
                " give store_credentials_json, or set AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY",
            )
        credentials = record.fields.get("store_credentials_json")
        if credentials:
            line = record.lines["store_credentials_json"]
            store["credentials"] = self.path(credentials, (*loc, "credentials"), line)
        else:
            self.out.note(
                loc,
                "no store_credentials_json: the credentials come from"
                " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        self.out.data.setdefault("objectstores", {})[name] = store
        return name

    def setup(self, record: Any) -> None:
        if not isinstance(record, Tagged):
            return
        method = record.fields.get("method")
        instance = record.fields.get("instance")
        if record.tag != "Method" or method != "create_bucket":
            what = f"!{record.tag}" + (f" {method}" if method else "")
            self.fail(
                record.line,
                f"{what} under single_run_functions has no equivalent (only"
                " !Method create_bucket does: it becomes a setup task). Give its result"
                " to the tasks directly (e.g. to_zarr's store: s3://BUCKET/PATH with"
                " objectstore: NAME) and remove this entry; see docs/migrating.md",
            )
            return
        if not isinstance(instance, Tagged) or instance.tag != "ObjectStoreS3":
            self.fail(
                record.lines.get("instance", record.line),
                "create_bucket needs instance: an alias of an !ObjectStoreS3",
            )
            return
        self.unknown(record, {"instance", "method", "bucket"})
        loc: Loc = ("setup", len(self.out.data.setdefault("setup", [])))
        self.out.lines[("setup",)] = self.out.lines.get(("setup",), record.line)
        self.out.lines[loc] = record.line
        bucket = _literal(str(record.fields.get("bucket", "")))
        self.out.lines[(*loc, "with", "bucket")] = record.lines.get("bucket", record.line)
        self.out.data["setup"].append(
            {
                "task": "create_bucket",
                "with": {"objectstore": self.store(instance), "bucket": bucket},
            }
        )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _literal(text: Any) -> Any:
    """The original took ``$`` literally; the new form expands ``${VAR}``: escape it."""
    return text.replace("$", "$$") if isinstance(text, str) else text
