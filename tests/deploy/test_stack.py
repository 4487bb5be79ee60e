"""The compose stack run for real as local processes (scripts/run_stack.py): two convserve replicas, nginx
with the project's nginx.conf, Prometheus with the project's scrape config, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
PROMETHEUS_CONF = ROOT / "deploy" / "prometheus" / "prometheus.yml"
REQUESTS = 240  # sent through the load balancer
CONCURRENCY = 4


# ---- rendering ------------------------------------------------------------------------------------------


def _render_nginx(run_stack: ModuleType, tmp_path: Path, legacy_http2: bool) -> str:
    return run_stack.render_nginx_conf(
        NGINX_CONF.read_text(),
        listen_port=18001,
        backends=["127.0.0.1:20001", "127.0.0.1:20002"],
        workdir=tmp_path,
        legacy_http2=legacy_http2,
    )


@pytest.mark.parametrize("legacy_http2", [False, True])
def test_nginx_render_changes_only_the_compose_lines(
    run_stack: ModuleType, tmp_path: Path, legacy_http2: bool
) -> None:
    original = [line.strip() for line in NGINX_CONF.read_text().splitlines()]
    rendered = [line.strip() for line in _render_nginx(run_stack, tmp_path, legacy_http2).splitlines()]
    marked = [line for line in original if re.search(r"#\s*compose:\s*\w+$", line)]
    assert len(marked) == 3
    kept = [line for line in original if line not in marked and not (legacy_http2 and line == "http2 on;")]
    added = set(rendered) - set(kept)
    listen = "listen 127.0.0.1:18001 http2;" if legacy_http2 else "listen 127.0.0.1:18001;"
    assert {"server 127.0.0.1:20001;", "server 127.0.0.1:20002;", listen} <= added
    assert all(
        line.startswith(("pid ", listen, "server 127.0.0.1:")) or "_temp_path " in line for line in added
    ), added
    assert all(str(tmp_path) in line for line in added if line.startswith("pid ") or "_temp_path" in line)
    assert set(kept) <= set(rendered)  # every other line of the project's config is used as is
    directives = [line.split("#")[0] for line in rendered]
    assert not any(d.startswith("resolver ") or "convserve:" in d for d in directives)


def test_nginx_render_refuses_a_config_without_its_markers(run_stack: ModuleType, tmp_path: Path) -> None:
    text = NGINX_CONF.read_text().replace("# compose: backends", "")
    with pytest.raises(run_stack.StackError, match="backends"):
        run_stack.render_nginx_conf(
            text, listen_port=1, backends=["127.0.0.1:2"], workdir=tmp_path, legacy_http2=False
        )


def test_rendered_nginx_conf_passes_nginx_t(
    run_stack: ModuleType, system_binary: Any, tmp_path: Path
) -> None:
    nginx = system_binary("nginx", "/usr/sbin/nginx")
    legacy = run_stack.nginx_version(nginx) < run_stack.NGINX_HTTP2_DIRECTIVE
    conf = tmp_path / "nginx.conf"
    conf.write_text(_render_nginx(run_stack, tmp_path, legacy))
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_prometheus_render_swaps_dns_discovery_for_static_targets(
    run_stack: ModuleType, system_binary: Any, tmp_path: Path
) -> None:
    original = yaml.safe_load(PROMETHEUS_CONF.read_text())
    targets = ["127.0.0.1:30001", "127.0.0.1:30002"]
    rendered = run_stack.render_prometheus_config(original, targets=targets, scrape_interval="1s")
    (job,) = [j for j in rendered["scrape_configs"] if j["job_name"] == "convserve"]
    (source,) = [j for j in original["scrape_configs"] if j["job_name"] == "convserve"]
    assert job["static_configs"] == [{"targets": targets}] and "dns_sd_configs" not in job
    assert job.get("metrics_path") == source.get("metrics_path")
    assert rendered["global"]["scrape_interval"] == "1s"
    assert all(run_stack._seconds(j.get("scrape_timeout", "1s")) <= 1 for j in rendered["scrape_configs"])
    others = [j for j in rendered["scrape_configs"] if j["job_name"] != "convserve"]
    assert others == [j for j in original["scrape_configs"] if j["job_name"] != "convserve"]
    assert original == yaml.safe_load(PROMETHEUS_CONF.read_text())  # the input is not modified
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(rendered))
    promtool = system_binary("promtool", "/usr/bin/promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the running stack ----------------------------------------------------------------------------------


def _ok_requests(metrics_address: str, model: str) -> float:
    """convserve_requests_total{model, api="classify", code="OK"} summed over versions, from /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "convserve_requests_total"
        and s.labels.get("model") == model
        and s.labels.get("api") == "classify"
        and s.labels.get("code") == "OK"
    )


def _query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _ready_model(address: str) -> tuple[str, tuple[int, ...]]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for summary in stub.ListModels(pb.ListModelsRequest(), timeout=10).models:
            for status in summary.versions:
                if status.state == pb.MODEL_STATE_READY:
                    desc = stub.DescribeModel(pb.DescribeModelRequest(model=summary.name), timeout=10)
                    return summary.name, tuple(int(d) for d in desc.input.shape[-3:])
    raise AssertionError(f"no ready model behind {address}")


async def _load(address: str, model: str, shape: tuple[int, ...]) -> int:
    """REQUESTS single-image calls over one channel, CONCURRENCY at a time; returns how many succeeded."""
    data = np.random.default_rng(0).random(shape, dtype=np.float32).tobytes()
    request = pb.ClassifyRequest(
        model=model,
        top_k=1,
        images=[pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(shape), data=data))],
    )
    remaining = iter(range(REQUESTS))
    ok = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def caller() -> None:
            nonlocal ok
            for _ in remaining:
                reply = await stub.Classify(request, timeout=10)
                ok += len(reply.results) == 1

        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return ok


def test_stack_balances_calls_over_both_replicas_and_prometheus_scrapes_both(
    run_stack: ModuleType, system_binary: Any, ready_repository: Path, tmp_path: Path
) -> None:
    system_binary("nginx", "/usr/sbin/nginx")
    system_binary("prometheus", "/usr/bin/prometheus")
    with run_stack.run_stack(
        tmp_path / "stack", replicas=2, model_repository=ready_repository, scrape_interval="1s", timeout=45
    ) as stack:
        model, shape = _ready_model(stack.lb_address)
        before = [_ok_requests(r.metrics_address, model) for r in stack.replicas]

        assert asyncio.run(_load(stack.lb_address, model, shape)) == REQUESTS

        after = [_ok_requests(r.metrics_address, model) for r in stack.replicas]
        served = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(served) == REQUESTS  # every call answered once, by exactly one replica
        assert min(served) >= REQUESTS // 4, f"round-robin should spread the calls, got {served}"

        # Prometheus, scraping the rendered targets, ends up with each replica's final count.
        expr = f'sum by (instance) (convserve_requests_total{{job="convserve",model="{model}",code="OK"}})'
        want = {r.metrics_address: a for r, a in zip(stack.replicas, after, strict=True)}
        deadline, seen = time.monotonic() + 20, {}
        while time.monotonic() < deadline:
            seen = {s["metric"]["instance"]: float(s["value"][1]) for s in _query(stack.prometheus_url, expr)}
            if seen == want:
                break
            time.sleep(0.5)
        assert seen == want
        up = _query(stack.prometheus_url, 'up{job="convserve"}')
        assert {s["metric"]["instance"] for s in up} == set(want)
        assert all(s["value"][1] == "1" for s in up)
        assert not stack.exited()
        processes = [proc for _, proc in stack.processes]
    # Everything the stack started has stopped.
    assert all(proc.poll() is not None for proc in processes)


def test_make_stack_command_runs_until_interrupted_then_stops_everything(
    system_binary: Any, ready_repository: Path, tmp_path: Path
) -> None:
    """`python scripts/run_stack.py` (the `make stack` recipe): prints its addresses, serves, and on
    Ctrl-C (SIGINT) exits 0 with every port it opened closed again."""
    system_binary("nginx", "/usr/sbin/nginx")
    system_binary("prometheus", "/usr/bin/prometheus")
    cmd = [
        sys.executable,
        "-u",
        str(ROOT / "scripts" / "run_stack.py"),
        "--lb-port",
        "0",
        "--prometheus-port",
        "0",
        "--model-repository",
        str(ready_repository),
        "--workdir",
        str(tmp_path / "stack"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and proc.stdout is not None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "logs and rendered configs" in line:
                break
        output = "".join(lines)
        assert "logs and rendered configs" in output, output
        addresses = re.findall(r"127\.0\.0\.1:\d+", output)
        lb = re.search(r"load balancer\)\s+(127\.0\.0\.1:\d+)", output)[1]  # type: ignore[index]
        with grpc.insecure_channel(lb) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopping" in rest
    assert len(addresses) >= 6  # lb, 2 x (gRPC, metrics), Prometheus
    for address in addresses:
        host, port = address.split(":")
        with socket.socket() as probe:
            assert probe.connect_ex((host, int(port))) != 0, f"{address} still accepts connections"
