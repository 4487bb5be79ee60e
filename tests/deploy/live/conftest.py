"""Fixtures for the image and compose stack run for real: the engine, images and compose binary that
``make test-deploy`` (scripts/test_deploy.sh) prepared, passed in ``DEPLOY_TEST_*`` variables.

A plain ``pytest`` run has no engine, so these tests skip there with the command that runs them;
``make test`` runs that command right after, where a missing engine or image fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[3]
T = TypeVar("T")


@dataclass(frozen=True)
class Deploy:
    """What scripts/test_deploy.sh built: one run id labels everything the tests create."""

    docker_host: str
    run_id: str
    image: str
    lb_image: str
    prometheus_image: str
    compose_bin: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVSERVE_", "DEPLOY_TEST_"))}
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the docker client against the test engine; raise with its output on failure."""
        return _run(["docker", *args], self.env(), timeout, check)

    def compose(self, project: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run docker compose v2 on the project's docker-compose.yml under project name ``project``."""
        cmd = [self.compose_bin, "-p", project, "-f", str(ROOT / "docker-compose.yml"), *args]
        return _run(cmd, {**self.env(), **(env or {})}, timeout, check)

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", container).stdout)[0]

    def published_port(self, container: str, port: int) -> int:
        """The 127.0.0.1 host port the engine published for ``port`` of ``container``."""
        out = self.docker("port", container, f"{port}/tcp").stdout.split()
        (address,) = [a for a in out if a.startswith("127.0.0.1:")]
        return int(address.rsplit(":", 1)[1])

    @staticmethod
    def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
        """Poll ``probe`` until it returns something other than None/False, against a monotonic deadline."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last not in (None, False):
                return last  # type: ignore[no-any-return]
            time.sleep(interval)
        raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def _run(
    cmd: Sequence[str], env: dict[str, str], timeout: float, check: bool
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def deploy() -> Deploy:
    names = ("DOCKER_HOST", "RUN_ID", "IMAGE", "LB_IMAGE", "PROMETHEUS_IMAGE", "COMPOSE")
    values = {n: os.environ.get(f"DEPLOY_TEST_{n}") for n in names}
    if values["RUN_ID"] is None:
        pytest.skip("needs the engine and images that `make test-deploy` prepares (it runs these tests)")
    missing = [f"DEPLOY_TEST_{n}" for n, v in values.items() if v is None]
    if missing:
        pytest.fail(f"scripts/test_deploy.sh did not set {missing}")
    d = Deploy(*(str(values[n]) for n in names))
    d.docker("image", "inspect", d.image)  # fails (not skips) when the build did not happen
    return d


@pytest.fixture
def network(deploy: Deploy) -> Iterator[str]:
    """A user-defined bridge network for one test (the engine has no default bridge)."""
    name = f"{deploy.run_id}-{os.getpid()}-{time.monotonic_ns()}"
    deploy.docker("network", "create", "--label", f"convserve.test-run={deploy.run_id}", name)
    try:
        yield name
    finally:
        deploy.docker("network", "rm", name, check=False)


def _rest(port: int, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """One v2 REST request to 127.0.0.1:``port`` (POST with ``body`` as JSON, else GET) → (status, JSON
    body, the text of a body that is not JSON — a balancer's own 503 page — or None). Error statuses are
    returned, not raised, so a test can wait for 200."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="GET" if data is None
                                     else "POST", headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, raw, kind = reply.status, reply.read(), reply.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get_content_type()
    except OSError:  # refused or reset: the port is not serving (yet)
        return 0, None
    if not raw:
        return status, None
    return status, json.loads(raw) if kind == "application/json" else raw.decode(errors="replace")


def _infer_request(batch: Any) -> dict[str, Any]:
    """A v2 infer request body with ``batch`` (float32 NCHW) as the JSON tensor of the bundled model."""
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                        "data": batch.ravel().tolist()}]}  # fmt: skip


@pytest.fixture(scope="session")
def rest() -> Callable[..., tuple[int, Any]]:
    """``rest(port, path, body=None, timeout=10)`` → (status, JSON, text or None): one v2 REST call."""
    return _rest


@pytest.fixture(scope="session")
def infer_request() -> Callable[[Any], dict[str, Any]]:
    """``infer_request(batch)`` → a v2 infer request body for the bundled model (JSON FP32 tensor)."""
    return _infer_request
