"""docker-compose.yml run for real with compose v2: two convserve replicas behind the load balancer,
Prometheus scraping both, gRPC and v2 REST calls through the balancer spread over both, and
`docker compose stop` draining every replica to exit status 0. The gpu and train profiles pass `config`."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import numpy as np
import pytest

CALLS = 40
REST_CALLS = 20
REPLICAS = 2


def _requests_total(port: int) -> float:
    """convserve_requests_total summed over its labels, read from a replica's own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(m[1]) for m in re.finditer(r"^convserve_requests_total\{[^}]*\} (\S+)$", text, re.M))


def _prometheus(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return json.loads(reply.read())["data"]


@pytest.mark.parametrize("profile", ["gpu", "train"])
def test_other_profiles_pass_compose_config(deploy: Any, profile: str) -> None:
    deploy.compose(f"{deploy.run_id}-config", "--profile", profile, "config", "-q", timeout=60)


def test_stack_balances_over_two_replicas_prometheus_scrapes_both_and_stop_drains(
    deploy: Any, encode_png: Any, rest: Any, infer_request: Any
) -> None:
    from convserve.client import Client

    project = f"{deploy.run_id}-stack"
    env = {
        "CONVSERVE_IMAGE": deploy.image,
        "CONVSERVE_LB_IMAGE": deploy.lb_image,
        "CONVSERVE_PROMETHEUS_IMAGE": deploy.prometheus_image,
        "CONVSERVE_PUBLISH_IP": "127.0.0.1",  # test traffic stays on loopback
        "CONVSERVE_LB_PORT": "0",  # ephemeral: never collides with a developer's running stack
        "CONVSERVE_LB_HTTP_PORT": "0",
        "CONVSERVE_PROMETHEUS_PORT": "0",
    }
    try:
        deploy.compose(
            project, "up", "-d", "--no-build", "--pull", "never", "--scale", f"convserve={REPLICAS}",
            "convserve", "lb", "prometheus", env=env, timeout=180,
        )  # fmt: skip
        replicas = deploy.compose(project, "ps", "-q", "convserve", env=env).stdout.split()
        assert len(replicas) == REPLICAS
        metrics = {cid: deploy.published_port(cid, 8002) for cid in replicas}
        (lb,) = deploy.compose(project, "ps", "-q", "lb", env=env).stdout.split()
        (prom,) = deploy.compose(project, "ps", "-q", "prometheus", env=env).stdout.split()
        lb_port, prom_port = deploy.published_port(lb, 8001), deploy.published_port(prom, 9090)
        lb_http_port = deploy.published_port(lb, 8000)

        image = encode_png(np.eye(28, dtype=np.uint8) * 255)  # a diagonal stroke: any valid 28x28 image
        for cid in replicas:  # each replica SERVING on its own published port before counting
            with Client(f"127.0.0.1:{deploy.published_port(cid, 8001)}", timeout=5) as client:
                client.wait_until_ready(timeout=60)
        with Client(f"127.0.0.1:{lb_port}", timeout=10) as client:  # one channel: one HTTP/2 connection
            client.wait_until_ready(timeout=60)

            # The balancer learns replicas from DNS every 5 s and health-checks them every 2 s: call
            # (a bounded number of times) until each replica has answered one call through it.
            def every_replica_reached() -> bool:
                client.classify(image)
                return all(_requests_total(port) > 0 for port in metrics.values())

            deploy.wait_for("the balancer reaching both replicas", every_replica_reached, timeout=30,
                            interval=0.1)
            before = {cid: _requests_total(port) for cid, port in metrics.items()}
            labels = {client.classify(image).top.label for _ in range(CALLS)}
        assert len(labels) == 1  # the same model answers, whichever replica
        served = {cid: _requests_total(port) - before[cid] for cid, port in metrics.items()}
        assert sum(served.values()) == CALLS, served
        assert all(n >= CALLS // (REPLICAS * 4) for n in served.values()), f"calls per replica: {served}"

        # v2 REST, on each replica's own published port and through the balancer's REST port.
        zeros = infer_request(np.zeros((1, 1, 28, 28), dtype=np.float32))
        for cid in replicas:
            port = deploy.published_port(cid, 8000)
            assert rest(port, "/v2/health/ready") == (200, {"ready": True})
            status, reply = rest(port, "/v2/models/digits_lenet/infer", zeros)
            assert status == 200 and reply["outputs"][0]["shape"] == [1, 10], reply
        expected = reply["outputs"][0]["data"]  # the same model on every replica: the same logits

        # The balancer health-checks each replica's readiness every 2 s: call (a bounded number of times)
        # until it answers REST, and until each replica has answered one REST call through it.
        def lb_ready() -> bool:
            return rest(lb_http_port, "/v2/health/ready")[0] == 200

        deploy.wait_for("REST ready through the balancer", lb_ready, timeout=30)
        start = {cid: _requests_total(port) for cid, port in metrics.items()}

        def every_replica_reached_over_rest() -> bool:
            assert rest(lb_http_port, "/v2/models/digits_lenet/infer", zeros)[0] == 200
            return all(_requests_total(port) > start[cid] for cid, port in metrics.items())

        deploy.wait_for("REST through the balancer reaching both replicas", every_replica_reached_over_rest,
                        timeout=30, interval=0.1)  # fmt: skip
        before = {cid: _requests_total(port) for cid, port in metrics.items()}
        for _ in range(REST_CALLS):
            status, reply = rest(lb_http_port, "/v2/models/digits_lenet/infer", zeros)
            assert status == 200 and reply["outputs"][0]["data"] == expected, reply
        served = {cid: _requests_total(port) - before[cid] for cid, port in metrics.items()}
        assert sum(served.values()) == REST_CALLS, served
        assert all(n >= REST_CALLS // (REPLICAS * 4) for n in served.values()), f"REST per replica: {served}"

        def both_scraped() -> Any:
            targets = _prometheus(prom_port, "/api/v1/targets")["activeTargets"]
            up = {t["labels"]["instance"] for t in targets if t["labels"]["job"] == "convserve"
                  and t["health"] == "up"}  # fmt: skip
            series = _prometheus(prom_port, "/api/v1/query?query=sum+by+(instance)(convserve_requests_total)")
            counted = {s["metric"]["instance"]: float(s["value"][1]) for s in series["result"]}
            done = len(up) == REPLICAS and set(counted) == up and sum(counted.values()) >= CALLS
            return up if done else None

        deploy.wait_for("Prometheus scraping both replicas", both_scraped, timeout=60)

        deploy.compose(project, "stop", "convserve", env=env, timeout=90)
        for cid in replicas:
            state = deploy.inspect(cid)["State"]
            assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    finally:
        deploy.compose(project, "down", "-v", "--remove-orphans", "--timeout", "5", env=env, timeout=180,
                       check=False)  # fmt: skip
