"""A real Prometheus scrapes a real convserve server under load; the Grafana dashboard's PromQL is checked
against what the server exports and what Prometheus answers."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc
from convserve.testing import start_server_process
from convserve.testing.prerequisites import require_binary

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "convserve.json"
INSTALL_HINT = (
    "the prometheus binary is not installed: `sudo apt-get install prometheus` (Debian/Ubuntu) "
    "or `bash scripts/install_system_deps.sh`"
)
# Series Prometheus makes itself for every target, not read from /metrics.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}


# ---- a convserve server in its own process ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerProcess:
    grpc_address: str
    metrics_url: str
    model: str
    version: str
    input_shape: tuple[int, ...]
    log_path: Path


@pytest.fixture(scope="module")
def convserve_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`python -m convserve.server` on ephemeral loopback ports, JSON logs with the access log, to a file."""
    tmp = tmp_path_factory.mktemp("convserve")
    flags = ["--model-repository", str(model_repository), "--no-strict-readiness"]
    flags += ["--log-format", "json", "--access-log"]
    with start_server_process(flags, tmp, cwd=tmp, wait=False) as server:
        model, version, shape = _wait_for_model(server.address, timeout=60.0)
        yield ServerProcess(server.address, str(server.metrics_url), model, version, shape, server.log_path)


def _wait_for_model(address: str, timeout: float) -> tuple[str, str, tuple[int, ...]]:
    """The first ready model version and its input shape, once the server reports one."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while time.monotonic() < deadline:
            try:
                listing = stub.ListModels(pb.ListModelsRequest(), timeout=5)
            except grpc.RpcError:
                time.sleep(0.1)
                continue
            for summary in listing.models:
                for status in summary.versions:
                    if status.state == pb.MODEL_STATE_READY:
                        desc = stub.DescribeModel(
                            pb.DescribeModelRequest(model=summary.name, version=status.version), timeout=5
                        )
                        return summary.name, str(status.version), tuple(int(d) for d in desc.input.shape)
            time.sleep(0.1)
    raise AssertionError(f"no model became ready within {timeout} s")


def _tensor_request(server: ServerProcess, n: int = 1, model: str | None = None) -> pb.ClassifyRequest:
    shape = tuple(d if d > 0 else 1 for d in server.input_shape[-3:])
    rng = np.random.default_rng(0)
    images = [
        pb.Image(
            tensor=pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=list(shape),
                data=rng.random(shape, dtype=np.float32).tobytes(),
            )
        )
        for _ in range(n)
    ]
    return pb.ClassifyRequest(
        model=model or server.model, version=int(server.version), images=images, top_k=3
    )


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return {f.name: f for f in text_string_to_metric_families(reply.read().decode())}


def exported_series(families: dict[str, Any]) -> dict[str, set[str]]:
    """Every sample name a scrape can hold (from each family's type) → the label names seen on it."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }
    names: dict[str, set[str]] = {}
    for family in families.values():
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


# ---- PromQL in the dashboard -----------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")


def dashboard_expressions() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template-variable queries."""
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text or "")
        if var.get("type") == "query" and match:
            exprs.append(f'{match[1]}{{{match[2]}!=""}}')
    return exprs


def promql_for_prometheus(expr: str, window: str) -> str:
    """Grafana's variables replaced as Grafana would: all models, the rate interval."""
    return expr.replace("$__rate_interval", window).replace("$model", ".*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or label names."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql_for_prometheus(expr, "1m"))
    e = _GROUPING.sub(" ", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    idents = re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e)
    return {m[1] for m in idents if m[2] is None and m[1].lower() not in _KEYWORDS}


def label_names(expr: str) -> dict[str, set[str]]:
    """metric → label names used in its matchers, and "*" → labels named in by/without/on clauses."""
    e = promql_for_prometheus(expr, "1m")
    used: dict[str, set[str]] = {"*": set()}
    for match in _SELECTOR.finditer(e):
        labels = re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', match[2]))
        used.setdefault(match[1], set()).update(labels)
    for match in _GROUPING.finditer(e):
        used["*"].update(x.strip() for x in match[2].split(",") if x.strip())
    return used


def test_promql_helpers_find_metrics_and_labels() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (model, le) (rate(convserve_request_duration_seconds_bucket"
        '{model=~"$model",code!="OK"}[$__rate_interval]))) / on (job) group_left up offset 5m'
    )
    assert metric_names(expr) == {"convserve_request_duration_seconds_bucket", "up"}
    assert label_names(expr) == {
        "*": {"model", "le", "job"}, "convserve_request_duration_seconds_bucket": {"model", "code"}
    }  # fmt: skip
    assert metric_names("time() - convserve_start_time_seconds") == {"convserve_start_time_seconds"}
    assert metric_names("process_resident_memory_bytes / 2^30") == {"process_resident_memory_bytes"}


def _traffic(server: ServerProcess, n_ok: int, n_not_found: int, n_bad: int) -> None:
    """A few requests of each outcome, so every labelled family has children in the exposition."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for _ in range(n_ok):
            stub.Classify(_tensor_request(server, 2), timeout=10)
        for _ in range(n_not_found):
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(_tensor_request(server, model="no-such-model"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for _ in range(n_bad):
            bad = pb.ClassifyRequest(model=server.model, images=[pb.Image(encoded=b"not an image")])
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(bad, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_dashboard_expression_names_a_metric_the_server_exports(
    convserve_server: ServerProcess,
) -> None:
    _traffic(convserve_server, n_ok=3, n_not_found=1, n_bad=1)
    exported = exported_series(scrape(convserve_server.metrics_url))
    all_labels = set().union(*exported.values()) | TARGET_LABELS | {"le"}
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    seen: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        missing = names - set(exported) - PROMETHEUS_SYNTHETIC
        assert not missing, f"{expr!r} names {sorted(missing)}, which the server does not export"
        for metric, labels in label_names(expr).items():
            known = all_labels if metric == "*" else exported.get(metric, set()) | TARGET_LABELS
            assert labels <= known, f"{expr!r}: labels {sorted(labels - known)} not on {metric}"
        seen |= names
    # The dashboard covers the families the issue asks for.
    for family in ("convserve_requests_total", "convserve_request_duration_seconds_bucket",
                   "convserve_queue_wait_seconds_bucket", "convserve_preprocess_seconds_bucket",
                   "convserve_inference_seconds_bucket", "convserve_postprocess_seconds_bucket",
                   "convserve_batch_size_bucket", "convserve_queue_depth",
                   "convserve_inflight_requests"):  # fmt: skip
        assert family in seen, family


# ---- the real Prometheus ---------------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        with urllib.request.urlopen(
            f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10
        ) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]


def _prometheus_binary() -> str:
    # Debian installs it in /usr/bin: found there too when PATH lacks it.
    return require_binary("prometheus", INSTALL_HINT, "/usr/bin/prometheus")


@pytest.fixture
def prometheus(convserve_server: ServerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus on an ephemeral loopback port (read back from its log), scraping the server every second."""
    binary = _prometheus_binary()
    target = urllib.parse.urlsplit(convserve_server.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: convserve\n    scrape_timeout: 900ms\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    cmd = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        "--web.listen-address=127.0.0.1:0", "--storage.tsdb.retention.time=1h", "--log.level=info",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = _prometheus_url(proc, log_path, timeout=30.0)
        yield Prometheus(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _prometheus_url(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """Port 0 lets the kernel choose; Prometheus logs the address it actually bound, then reports ready."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if url is None:
            found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', log.read_text())
            url = f"http://{found[1]}" if found else None
        if url is not None:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class LoadResult:
    ok: int
    latencies: list[float]
    started: float  # Unix time
    ended: float

    @property
    def rate(self) -> float:
        return self.ok / (self.ended - self.started)

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.array(self.latencies), q))


async def _load(server: ServerProcess, concurrency: int, seconds: float, max_requests: int) -> LoadResult:
    """Closed loop: `concurrency` callers, each sending its next request when the last one returns."""
    latencies: list[float] = []
    request = _tensor_request(server, 1)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await stub.Classify(request, timeout=10)  # warm the channel
        started = time.time()
        stop_at = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop_at and len(latencies) < max_requests:
                t0 = time.perf_counter()
                reply = await stub.Classify(request, timeout=10)
                latencies.append(time.perf_counter() - t0)
                assert len(reply.results) == 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        ended = time.time()
    return LoadResult(len(latencies), latencies, started, ended)


def _wait_for(prom: Prometheus, expr: str, want: float, timeout: float) -> float:
    """Poll an instant query until it reaches `want` (the scrape after the load has landed)."""
    deadline = time.monotonic() + timeout
    value = float("nan")
    while time.monotonic() < deadline:
        result = prom.query(expr)
        value = float(result[0]["value"][1]) if result else float("nan")
        if value >= want:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{expr} reached {value}, expected {want} within {timeout} s")


def test_prometheus_reads_latency_quantiles_and_request_rate_matching_the_client(
    convserve_server: ServerProcess, prometheus: Prometheus
) -> None:
    server = convserve_server
    model = f'model="{server.model}",version="{server.version}",api="classify"'
    ok_query = f'sum(convserve_requests_total{{{model},code="OK"}})'
    # Let Prometheus take a first sample of every series, so increases are measured from a known base.
    _traffic(server, n_ok=1, n_not_found=0, n_bad=0)
    base = _wait_for(prometheus, ok_query, 1, timeout=15)

    load = asyncio.run(_load(server, concurrency=4, seconds=6.0, max_requests=20_000))
    assert load.ok >= 50, f"only {load.ok} requests finished"
    _traffic(server, n_ok=0, n_not_found=7, n_bad=0)
    _wait_for(prometheus, ok_query, base + 1 + load.ok, timeout=15)  # +1: the warm-up request
    _wait_for(prometheus, 'sum(convserve_requests_total{code="NOT_FOUND"})', 7, timeout=15)
    # A scrape strictly after the load ended closes the window the rate is taken over.
    window = f"{max(3, round(load.ended - load.started))}s"
    at = load.ended

    (rate,) = prometheus.query(f'sum(rate(convserve_requests_total{{{model},code="OK"}}[{window}]))', at)
    prom_rate = float(rate["value"][1])
    (p99,) = prometheus.query(
        f"histogram_quantile(0.99, sum by (le) (rate(convserve_request_duration_seconds_bucket[{window}])))",
        at,
    )
    prom_p99 = float(p99["value"][1])
    client_p50, client_p99 = load.quantile(0.5), load.quantile(0.99)
    report = (
        f"client: {load.ok} requests, {load.rate:.0f}/s, "
        f"p50 {client_p50 * 1e3:.2f} ms, p99 {client_p99 * 1e3:.2f} ms;"
        f" prometheus: {prom_rate:.0f}/s, p99 {prom_p99 * 1e3:.2f} ms"
    )
    print(report)
    # Rate: Prometheus extrapolates rate() to the window's edges from 1 s scrapes (late ones on a busy
    # machine); the same order of magnitude is what the issue asks, within 3x is what is checked.
    assert load.rate / 3 <= prom_rate <= load.rate * 3, report
    # p99: server-side time is part of each client-side time, so its quantile cannot exceed the client's,
    # except by the interpolation inside one bucket (adjacent bounds differ by ≤ 2.5x).
    assert 0 < prom_p99 <= client_p99 * 2.5, report
    assert prom_p99 >= client_p50 / 10, report

    # Labels: one series per (model, version, api, code), with the repository's names; unknown model → "".
    series = prometheus.query("sum by (model, version, api, code) (convserve_requests_total)")
    # An empty label value is no label at all to Prometheus, hence .get(..., "").
    labels = {tuple(s["metric"].get(k, "") for k in ("model", "version", "api", "code")) for s in series}
    assert (server.model, server.version, "classify", "OK") in labels
    assert ("", "", "classify", "NOT_FOUND") in labels
    assert all(m in ("", server.model) for m, _, _, _ in labels), labels
    # Per-model p99 with the model label kept, as the dashboard and docs show it.
    per_model = prometheus.query(
        "histogram_quantile(0.99, sum by (model, le) "
        f'(rate(convserve_request_duration_seconds_bucket{{model="{server.model}"}}[{window}])))',
        at,
    )
    assert [s["metric"] for s in per_model] == [{"model": server.model}]
    images = prometheus.query(f"sum(increase(convserve_images_total{{{model}}}[1h]))")
    assert float(images[0]["value"][1]) >= load.ok
    batch = prometheus.query(f'sum(convserve_batch_size_count{{model="{server.model}"}})')
    assert float(batch[0]["value"][1]) >= 1
    state = prometheus.query(
        f'convserve_model_state{{model="{server.model}",version="{server.version}",state="ready"}}'
    )
    assert [float(s["value"][1]) for s in state] == [1.0]

    # Triton's names are scraped too, with Triton's labels, and count the same successful requests.
    nv = f'sum(nv_inference_request_success{{model="{server.model}",version="{server.version}"}})'
    assert _wait_for(prometheus, nv, base + 1 + load.ok, timeout=15) == base + 1 + load.ok

    # Every dashboard expression parses, evaluates and returns data in Prometheus. A 1 m window holds the
    # whole run (load and the NOT_FOUND requests), however late a starved machine's scrapes came.
    empty = [e for e in dashboard_expressions() if not prometheus.query(promql_for_prometheus(e, "1m"))]
    assert not empty, empty


def test_metrics_endpoint_can_be_disabled(server_factory: Any) -> None:
    handle = server_factory(metrics_port=-1)
    assert handle.metrics_port is None
    with grpc.insecure_channel(handle.address) as channel:
        listing = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert listing.models  # gRPC serves as usual


def test_dashboard_and_provisioning_files_agree() -> None:
    """The provisioned datasource is the one the dashboard's panels use; the provider loads the dashboard."""
    import yaml

    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (datasource,) = sources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "convserve.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")

    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    chooser = variables["datasource"]
    assert chooser["type"] == "datasource" and chooser["query"] == "prometheus"
    assert chooser["current"]["value"] == datasource["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]

    promtool = require_binary("promtool", INSTALL_HINT, "/usr/bin/promtool")  # in the prometheus package
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    check = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
