"""The Prometheus endpoint, scraped over HTTP from the service loop running in this process
(its endpoint serves from its own thread, as in ``dpypeline run``), and the shipped dashboard
and alert rules checked against what the service exports. A port in use is tried with a real
``dpypeline run`` process: its point is the command's exit 2 and message, and ``run`` in this
process would leave the stop signals ignored here and the process's logging set up as its."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, ServiceThread, cli, dpypeline, jobs, status, wait_for, write_config
from dpypeline.jobstate import JobState
from dpypeline.observability.metrics import LedgerCollector, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pipeline(tmp_path: Path, port: int, delay: float = 0.0) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": "30s"}],
            "retry": {"job_timeout": "60s"},
            "jobs": [
                {
                    "name": "work",
                    "tasks": [
                        {
                            "task": "taskbox.record",
                            "with": {"log": str(tmp_path / "runs.log"), "delay": delay},
                        }
                    ],
                }
            ],
            "logging": {"format": "json"},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        },
    )
    return cfg, inbox


def scrape(port: int, timeout: float = 5.0) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), float("nan"))


def by_state(samples: Samples) -> dict[str, float]:
    """dpypeline_jobs summed over the pipeline's jobs: the counts `status` prints."""
    totals: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "dpypeline_jobs":
            state = dict(labels)["state"]
            totals[state] = totals.get(state, 0) + v
    return totals


def start(tmp_path: Path, cfg: Path, started: list[ServiceThread]) -> ServiceThread:
    service = ServiceThread(cfg)
    started.append(service)
    service.wait_ready()
    return service


def wait_ended(service: ServiceThread, n: int) -> None:
    """Until n job ends are logged. A job's end is written to the ledger, which the job gauges
    read, before it is counted: a gauge can show a job done whose counters are not yet moved."""
    ends = ("job_done", "job_retrying", "job_dead", "job_skipped")
    wait_for(
        lambda: len(service.events(*ends)) >= n,
        message=f"{n} job end(s) logged",
        detail=service.log_text,
    )


def test_scraped_values_move_as_files_are_processed_and_agree_with_status(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    port = free_port()
    cfg, inbox = make_pipeline(tmp_path, port)
    (inbox / "early.nc").write_bytes(b"x" * 1000)  # found by the start-up scan
    service = start(tmp_path, cfg, service_threads)
    wait_for(lambda: value(scrape(port), "dpypeline_jobs", pipeline_job="work", state="done") == 1)
    wait_for(lambda: any(e.get("event") == "scan_done" for e in service.events()))
    before = scrape(port)
    assert value(before, "dpypeline_build_info", version=_version(), python=_python()) == 1
    assert value(before, "dpypeline_watch_mode", watch=str(inbox), mode="inotify") == 1
    assert value(before, "dpypeline_healthy") == 1
    assert value(before, "dpypeline_files_seen_total", source="scan") == 1

    for i in (1, 2):
        (inbox / f"late{i}.nc").write_bytes(b"y" * 2000)  # seen by their close events
    wait_for(lambda: value(scrape(port), "dpypeline_jobs", pipeline_job="work", state="done") == 3)
    wait_ended(service, 3)
    after = scrape(port)
    assert value(after, "dpypeline_files_seen_total", source="watch") == 2
    assert value(after, "dpypeline_jobs_enqueued_total", source="scan") == 1
    assert value(after, "dpypeline_jobs_enqueued_total", source="watch") == 2
    assert value(after, "dpypeline_jobs_finished_total", pipeline_job="work", outcome="done") == 3
    assert value(after, "dpypeline_job_duration_seconds_count", pipeline_job="work") == 3
    assert value(after, "dpypeline_job_duration_seconds_sum", pipeline_job="work") > 0
    assert value(after, "dpypeline_job_input_bytes_sum", pipeline_job="work") == 1000 + 2 * 2000
    assert value(after, "dpypeline_job_claim_latency_seconds_count", pipeline_job="work") == 3
    assert value(after, "dpypeline_scans_total", reason="startup") == 1

    report = status(cfg)  # nothing moves any more: both must read the same ledger rows
    scraped = scrape(port)
    assert by_state(scraped) == {s: float(report[s]) for s in by_state(scraped)}
    assert set(by_state(scraped)) == {"queued", "running", "retrying", "done", "dead", "skipped"}
    assert value(scraped, "dpypeline_jobs_held") == len(report["held"])
    assert report["oldest_waiting"] is None
    listed = jobs(cfg)
    for source in ("watch", "scan", "cli"):
        in_ledger = sum(j["source"] == source for j in listed)
        assert value(scraped, "dpypeline_ledger_jobs_by_source", source=source) == in_ledger
    assert {j["path"].rsplit("/", 1)[1]: j["source"] for j in listed} == {
        "early.nc": "scan",
        "late1.nc": "watch",
        "late2.nc": "watch",
    }
    assert value(scraped, "dpypeline_oldest_waiting_seconds") == 0

    service.stop()
    assert service.wait(30) == 0
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        scrape(port, timeout=2)  # the endpoint closed with the service


def test_retries_and_dead_jobs_are_counted_by_error_class(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    port = free_port()
    cfg, inbox = make_pipeline(tmp_path, port)
    text = cfg.read_text().replace("taskbox.record", "taskbox.behave").replace("delay: 0.0", "")
    cfg.write_text(
        text.replace(
            "job_timeout: 60s",
            "job_timeout: 60s\n  max_attempts: 2\n  backoff: {initial: 100ms, max: 100ms}",
        )
    )
    for name in ("bad.nc", "corrupt.nc", "good.nc"):
        (inbox / name).write_bytes(b"q")
    service = start(tmp_path, cfg, service_threads)
    wait_for(lambda: value(scrape(port), "dpypeline_jobs", pipeline_job="work", state="dead") == 2)
    wait_ended(service, 4)  # bad.nc: retrying, then dead
    samples = scrape(port)

    def work(name: str, **labels: str) -> float:
        return value(samples, name, pipeline_job="work", **labels)

    assert work("dpypeline_job_retries_total", error="ValueError") == 1
    assert work("dpypeline_jobs_dead_total", error="ValueError") == 1
    assert work("dpypeline_jobs_dead_total", error="PermanentError") == 1
    assert work("dpypeline_jobs_finished_total", outcome="retrying") == 1
    assert work("dpypeline_jobs_finished_total", outcome="dead") == 2
    assert work("dpypeline_jobs_finished_total", outcome="done") == 1


def test_an_outage_marks_the_object_store_it_names_until_a_job_ends_without_one() -> None:
    metrics = Metrics(["work"], ["jasmin", "backup"])

    def outage() -> dict[str, float | None]:
        stores = {
            s: metrics.registry.get_sample_value("dpypeline_objectstore_outage", {"objectstore": s})
            for s in ("jasmin", "backup")
        }
        return {"any": metrics.registry.get_sample_value("dpypeline_outage"), **stores}

    assert outage() == {"any": 0, "jasmin": 0, "backup": 0}
    metrics.outage_began("the object store 'jasmin' is unreachable (ConnectionError) while writing")
    assert outage() == {"any": 1, "jasmin": 1, "backup": 0}
    metrics.outage_began("no space left on /data (ENOSPC; 0 B free) while writing")
    assert outage() == {"any": 1, "jasmin": 0, "backup": 0}
    metrics.outage_over()
    assert outage() == {"any": 0, "jasmin": 0, "backup": 0}


def test_health_names_the_failing_component() -> None:
    metrics = Metrics()
    metrics.health(["the scan thread has stopped"], False, [])
    get = metrics.registry.get_sample_value
    assert get("dpypeline_healthy") == 0
    assert get("dpypeline_component_healthy", {"component": "watch"}) == 0
    assert get("dpypeline_component_healthy", {"component": "executor"}) == 1
    metrics.health([], False, [])
    assert get("dpypeline_healthy") == 1


def test_a_scrape_answers_while_a_slow_job_runs(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    port = free_port()
    cfg, inbox = make_pipeline(tmp_path, port, delay=6.0)
    # the same six seconds in short waits: a job the stop at the test's end interrupts
    cfg.write_text(
        cfg.read_text().replace("taskbox.record", "taskbox.work").replace("delay:", "seconds:")
    )
    start(tmp_path, cfg, service_threads)
    (inbox / "slow.nc").write_bytes(b"z" * 10)
    wait_for(
        lambda: value(scrape(port), "dpypeline_jobs", pipeline_job="work", state="running") == 1
    )
    for _ in range(5):
        began = time.monotonic()
        samples = scrape(port, timeout=2)
        assert time.monotonic() - began < 1.0
        assert value(samples, "dpypeline_jobs", pipeline_job="work", state="running") == 1
        assert value(samples, "dpypeline_oldest_waiting_seconds") == 0
    assert not (tmp_path / "runs.log").exists(), "the job finished: the test proved nothing"


@pytest.mark.slow
def test_a_port_in_use_stops_start_up_with_exit_2_naming_field_and_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        cfg, inbox = make_pipeline(tmp_path, port)
        (inbox / "a.nc").write_bytes(b"a")
        proc = dpypeline("run", "-c", str(cfg), "--once", timeout=60)
    line = next(n for n, text in enumerate(cfg.read_text().splitlines(), 1) if "listen:" in text)
    assert proc.returncode == 2, proc.stderr
    assert f"pipeline.yaml:{line}: metrics.listen: cannot serve metrics on 127.0.0.1:{port}" in (
        proc.stderr
    )
    assert "Address already in use" in proc.stderr
    assert not (tmp_path / "runs.log").exists()  # no job ran


def test_listen_must_be_host_and_port(tmp_path: Path) -> None:
    cfg, _ = make_pipeline(tmp_path, 9464)
    cfg.write_text(cfg.read_text().replace("127.0.0.1:9464", "localhost"))
    proc = cli("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "metrics.listen: 'localhost' is not host:port" in proc.stderr


# -- the shipped dashboard and alert rules --------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def exported(tmp_path: Path) -> set[str]:
    """Every sample name the service can export, whether or not it has a value yet."""
    metrics = Metrics(["work"], ["store"])
    metrics.registry.register(collector := LedgerCollector(tmp_path, ["work"]))
    try:
        return {
            family.name + suffix
            for family in metrics.registry.collect()
            for suffix in SUFFIXES[family.type]
        }
    finally:
        collector.close()


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bdpypeline_[a-z_]+\b", text))


def expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from expressions(item)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def test_the_dashboard_uses_only_metrics_the_service_exports(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dpypeline.json").read_text())
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 8
    used = set().union(*(names_in(e) for e in exprs))
    assert used <= exported(tmp_path), f"unknown: {sorted(used - exported(tmp_path))}"
    assert {"dpypeline_jobs", "dpypeline_oldest_waiting_seconds", "dpypeline_healthy"} <= used


def test_the_alert_rules_parse_and_use_only_metrics_the_service_exports(tmp_path: Path) -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert all({"expr", "labels", "annotations"} <= set(r) for r in alerts.values())
    used = set().union(*(names_in(r["expr"]) for r in alerts.values()))
    assert used <= exported(tmp_path), f"unknown: {sorted(used - exported(tmp_path))}"
    wanted = {
        "dpypeline_jobs_finished_total",
        "dpypeline_oldest_waiting_seconds",
        "dpypeline_healthy",
        "dpypeline_objectstore_outage",
    }
    assert wanted <= used
    outage = next(r for r in alerts.values() if "dpypeline_objectstore_outage" in r["expr"])
    assert outage["for"] == "10m"


RESERVED = {"job", "instance"}  # set by Prometheus on every scraped series


def test_no_series_uses_a_label_that_prometheus_sets_itself(tmp_path: Path) -> None:
    metrics = Metrics(["work", "other"], ["store"])
    metrics.registry.register(collector := LedgerCollector(tmp_path, ["work", "other"]))
    metrics.job_ended("work", JobState.DEAD, 1.0, ValueError("x"))
    metrics.job_ended("work", JobState.RETRYING, 1.0, OSError("x"))
    metrics.job_started("work", 10, 1, 0.5)
    try:
        families = list(metrics.registry.collect())
    finally:
        collector.close()
    labels = {name for f in families for s in f.samples for name in s.labels}
    assert "pipeline_job" in labels
    assert not labels & RESERVED, sorted(labels & RESERVED)
    for text in (
        (ROOT / "deploy/grafana/dpypeline.json").read_text(),
        (ROOT / "deploy/prometheus/alerts.yml").read_text(),
    ):  # what a dashboard or rule groups by is ours, or Prometheus's own "instance"/"job"
        assert "{{job}}" not in text
        assert "$labels.job " not in text


def test_every_series_an_alert_uses_exists_from_the_start_at_zero(tmp_path: Path) -> None:
    """increase() sees a rise only from a sample it already has: a series that appears at its
    first death, at 1, never fires the dead-jobs alert for that death."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    metrics = Metrics(["work", "other"], ["store"])
    metrics.registry.register(collector := LedgerCollector(tmp_path, ["work", "other"]))
    try:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in metrics.registry.collect()
            for s in family.samples
        }
    finally:
        collector.close()
    for expr in exprs:
        for name in names_in(expr):
            selector = re.search(name + r"\{([^}]*)\}", expr)
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', selector[1])) if selector else {}
            found = [
                (dict(labels), v)
                for (n, labels), v in samples.items()
                if n == name and wanted.items() <= dict(labels).items()
            ]
            assert found, f"{name}{wanted} is not exported before its first event"
            if name.endswith("_total"):  # a counter starts at 0; a gauge has its value
                assert all(v == 0 for _, v in found), (name, found)
            if name.startswith("dpypeline_jobs_finished"):
                assert {d["pipeline_job"] for d, _ in found} == {"work", "other"}


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus), so the rules' unit"
            " tests cannot run"
        )
    proc = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=ROOT / "deploy/prometheus",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _version() -> str:
    from importlib.metadata import version

    return version("dpypeline")


def _python() -> str:
    import sys

    return sys.version.split()[0]
