"""benchmarks.h2load drives real servers with h2load and believes a round only when the server's own
counter agrees: h2load cannot read grpc-status, so a round of gRPC errors would otherwise pass as a fast
one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.h2load import Target, finished, frame, infer_request, measure
from benchmarks.run import Server
from convserve.testing import prerequisites, start_server_process

REPO_ROOT = Path(__file__).resolve().parents[1]
LENET_DIR = REPO_ROOT / "model_repository" / "digits_lenet"
INSTALL = "h2load (Debian nghttp2-client) is missing: run scripts/install_system_deps.sh"


@pytest.fixture(scope="module")
def h2load() -> str:
    return prerequisites.require_binary("h2load", INSTALL)


@pytest.fixture
def convserve(tmp_path: Path) -> Iterator[Target]:
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "digits_lenet").symlink_to(LENET_DIR)
    flags = ["--model-repository", str(repository), "--log-level", "WARNING", "--allow-external-symlinks"]
    with start_server_process(flags, tmp_path, http_port=-1) as server:
        assert server.metrics_url is not None
        yield Target("convserve", Server(server.address, server.pid), server.metrics_url,
                     "convserve_requests")  # fmt: skip


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[Target]:
    port_file = tmp_path / "empty.json"
    cmd = [sys.executable, "-m", "benchmarks.baseline_server", "--mode", "empty",
           "--port-file", str(port_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the empty baseline did not start"
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        yield Target("empty", Server(f"127.0.0.1:{ports['grpc_port']}", proc.pid),
                     f"http://127.0.0.1:{ports['metrics_port']}/metrics", "baseline_requests")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(20)


def body(tmp_path: Path, model: str = "digits_lenet", shape: tuple[int, ...] = (1, 28, 28)) -> Path:
    path = tmp_path / f"{model}.bin"
    path.write_bytes(frame(infer_request(model, shape, 1).SerializeToString()))
    return path


@pytest.mark.parametrize("server", ["convserve", "empty"])
def test_a_round_counts_what_the_server_counted(
    server: str, h2load: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target: Target = request.getfixturevalue(server)
    ok0 = finished(target)[0]
    s = measure(h2load, target, body(tmp_path), 1, 4, 2, 0.2, 1.0, tmp_path)
    ok = finished(target)[0] - ok0
    assert s.requests > 0 and ok >= s.requests, (s, ok)  # the warm-up's calls count on the server too
    assert 0 < s.p50_ms <= s.p99_ms and s.cpu_us_per_request > 0
    assert s.requests_per_s == pytest.approx(s.requests / 1.0, rel=0.25)


def test_a_round_says_how_many_cores_the_server_the_client_and_the_machine_kept_busy(
    h2load: str, convserve: Target, tmp_path: Path
) -> None:
    """Cores busy per second of the measured run: the server's tree (its CPU per request times its rate),
    h2load's own, and the whole machine's, which holds both of them and no more than the machine has."""
    s = measure(h2load, convserve, body(tmp_path), 1, 8, 2, 0.2, 1.5, tmp_path)
    assert s.server_cores == pytest.approx(s.cpu_us_per_request * s.requests / 1e6 / 1.5, rel=0.3)
    assert 0 < s.client_cores < s.server_cores  # h2load costs far less than the server it drives
    assert 0.8 * (s.server_cores + s.client_cores) <= s.box_busy_cores <= os.cpu_count()


def test_a_round_of_grpc_errors_is_refused(h2load: str, convserve: Target, tmp_path: Path) -> None:
    """Every call names a model the server does not have: HTTP 200 for h2load, NOT_FOUND for the server."""
    with pytest.raises(RuntimeError, match="not trustworthy"):
        measure(h2load, convserve, body(tmp_path, "no_such_model"), 1, 2, 2, 0.0, 0.5, tmp_path)


def test_a_counter_that_missed_the_calls_is_refused(h2load: str, empty: Target, tmp_path: Path) -> None:
    """The counter of another server (here: a family the empty baseline does not export) saw none of them."""
    blind = dataclasses.replace(empty, counter="convserve_requests")
    with pytest.raises(RuntimeError, match="not trustworthy"):
        measure(h2load, blind, body(tmp_path), 1, 2, 2, 0.0, 0.5, tmp_path)


def test_a_round_of_a_fixed_number_of_calls_counts_exactly_those(
    h2load: str, convserve: Target, tmp_path: Path
) -> None:
    """--requests: the measured run is exactly that many calls (none cut off at a window's end), after a
    warm-up of one call per stream, and its rate is those calls over the time to the last reply."""
    ok0 = finished(convserve)[0]
    started = time.monotonic()
    s = measure(h2load, convserve, body(tmp_path), 1, 4, 2, 1.0, 0.0, tmp_path, requests=24)
    elapsed = time.monotonic() - started
    assert s.requests == 24
    assert finished(convserve)[0] - ok0 == 24 + 4  # the warm-up: one call on each of the 4 streams
    assert 24 / elapsed <= s.requests_per_s  # timed over the measured calls alone
    with pytest.raises(ValueError, match="cannot keep 4 in flight"):
        measure(h2load, convserve, body(tmp_path), 1, 4, 2, 0.0, 0.0, tmp_path, requests=3)
