"""Worker processes (--workers N): real supervisors with real workers sharing the ports. One /metrics that
sums the workers exactly and stays monotonic across a replacement; model control and hot reload reach
every worker; readiness is every worker's; kill -9 of one worker fails only its calls and is replaced;
SIGTERM drains all and exits 0; the port file lists the workers; every log line names its worker."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc as v2grpc
from convserve.server.processes.cores import cgroup_quota_cores, usable_cores
from convserve.server.processes.supervisor import worker_settings
from convserve.server.settings import Settings
from convserve.testing import ServerProcess, ServerStartError
from convserve.testing import start_server_process as _start
from convserve.testing.waits import poll_until

TOKEN = "workers-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
WORKERS = 2


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def start_server_process(repo: Path, workdir: Path, *flags: str, **kwargs: Any) -> ServerProcess:
    return _start(["--model-repository", str(repo), *flags], workdir, **kwargs)


def _request(x: np.ndarray, model: str = "m") -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))
    return pb.ClassifyRequest(model=model, images=[image], top_k=4)


def _probs(reply: pb.ClassifyResponse) -> np.ndarray:
    got = np.zeros(4)
    for p in reply.results[0].predictions:
        got[p.index] = p.probability
    return got


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _states(address: str, model: str = "m") -> dict[int, str]:
    with grpc.insecure_channel(address) as ch:
        reply = classifier_pb2_grpc.ClassifierStub(ch).ListModels(
            pb.ListModelsRequest(), timeout=10, metadata=AUTH
        )
    for m in reply.models:
        if m.name == model:
            return {v.version: pb.ModelState.Name(v.state) for v in m.versions}
    return {}


def _samples(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert server.metrics_url is not None
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, model_writer: Any) -> Path:
    root = tmp_path_factory.mktemp("workers_repository")
    model_writer(root, "m", {1: {"seed": 1}})
    return root


@pytest.fixture(scope="module")
def workers(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One supervised server with two workers, shared by the tests below (each worker loads the models)."""
    server = start_server_process(
        repo,
        tmp_path_factory.mktemp("workers_servers"),
        "--allow-model-control",
        "--repository-poll-seconds", "0.2",
        env={"CONVSERVE_AUTH_TOKENS": TOKEN},
        workers=WORKERS,
        wait=False,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop(20)


def test_a_clean_start_logs_no_error_and_each_worker_says_what_it_serves(workers: ServerProcess) -> None:
    """Before the siblings are ready a worker's health is held NOT_SERVING by the gate, which is not an
    error: its models are ready and it says so (an ERROR "no model version is ready" was logged here)."""
    assert poll_until(lambda: _health(workers.address) == health_pb2.HealthCheckResponse.SERVING, timeout=60)
    assert poll_until(lambda: "all 2 workers serving" in workers.log_text(), timeout=30)
    log = workers.log_text()
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line]
    for i in range(WORKERS):
        assert any("1 model version(s) [m:1]" in line and f"worker={i}" in line for line in log.splitlines())
    # Expensive models share every core between the workers unless threads are set (runtime/core_share.py).
    assert (f"expensive models: {usable_cores()}, one run at a time" in log) == (usable_cores() > 1)


def test_port_file_lists_every_worker_once_each_serves(workers: ServerProcess) -> None:
    # The port file is written only when every worker serves: no waiting here.
    listed = workers.workers()
    assert [w["index"] for w in listed] == list(range(WORKERS))
    assert len({w["pid"] for w in listed}) == WORKERS
    for w in listed:
        assert w["pid"] != workers.pid and _alive(w["pid"])
        parent = Path(f"/proc/{w['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1]
        assert int(parent) == workers.pid  # the supervisor's children
        assert _health(w["grpc"]) == health_pb2.HealthCheckResponse.SERVING
    assert _health(workers.address) == health_pb2.HealthCheckResponse.SERVING


def test_every_worker_serves_the_same_answers(workers: ServerProcess, repo: Path, run_reference: Any) -> None:
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    expected = softmax(run_reference(repo / "m" / "1" / "model.onnx", x))[0]
    for address in [workers.address, *(w["grpc"] for w in workers.workers())]:
        with grpc.insecure_channel(address) as ch:
            reply = classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(x), timeout=10, metadata=AUTH)
        np.testing.assert_allclose(_probs(reply), expected, rtol=1e-4, atol=1e-6)


def test_metrics_are_the_exact_sum_over_workers(workers: ServerProcess) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    before = _samples(workers)
    sent = 0
    # Each worker alone (its own address), then the shared port on fresh connections.
    addresses = [w["grpc"] for w in workers.workers()] * 3 + [workers.address] * 6
    for address in addresses:
        with grpc.insecure_channel(address) as ch:
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            for _ in range(5):
                stub.Classify(_request(x), timeout=10, metadata=AUTH)
                sent += 1
    after = _samples(workers)
    for name, labels in (
        ("convserve_requests_total", {"model": "m", "code": "OK"}),
        ("convserve_images_total", {"model": "m"}),
        ("convserve_request_duration_seconds_count", {"model": "m"}),
        ("nv_inference_request_success", {"model": "m"}),
        ("nv_inference_count", {"model": "m"}),
    ):
        assert _total(after, name, **labels) - _total(before, name, **labels) == sent, name
    assert _total(after, "convserve_workers") == WORKERS
    # A state gauge reads as one server's: ready once, not once per worker.
    assert _total(after, "convserve_model_state", model="m", version="1", state="ready") == 1


def test_model_control_through_one_worker_reaches_all(workers: ServerProcess) -> None:
    first, second = (w["grpc"] for w in workers.workers())
    with grpc.insecure_channel(first) as ch:
        classifier_pb2_grpc.ClassifierStub(ch).UnloadModel(
            pb.UnloadModelRequest(model="m"), timeout=30, metadata=AUTH
        )
    assert _states(first) == {} and _states(second) == {}  # applied everywhere before the reply

    def index(address: str) -> list[tuple[str, str, str]]:
        with grpc.insecure_channel(address) as ch:
            reply = v2grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(
                v2pb.RepositoryIndexRequest(), timeout=10, metadata=AUTH
            )
        return sorted((m.name, m.version, m.state) for m in reply.models)

    assert index(first) == index(second)
    with grpc.insecure_channel(second) as ch:
        classifier_pb2_grpc.ClassifierStub(ch).LoadModel(
            pb.LoadModelRequest(model="m"), timeout=60, metadata=AUTH
        )
    assert _states(first) == {1: "MODEL_STATE_READY"} == _states(second)
    assert index(first) == index(second)


def test_hot_reload_reaches_every_worker(workers: ServerProcess, repo: Path, make_model: Any) -> None:
    make_model(repo / "m" / ".staging" / "model.onnx", seed=2)
    (repo / "m" / ".staging").rename(repo / "m" / "2")
    try:
        for w in workers.workers():
            assert poll_until(lambda a=w["grpc"]: _states(a) == {2: "MODEL_STATE_READY"}), _states(w["grpc"])
    finally:
        shutil.rmtree(repo / "m" / "2")
    for w in workers.workers():
        assert poll_until(lambda a=w["grpc"]: _states(a) == {1: "MODEL_STATE_READY"}), _states(w["grpc"])


def test_kill_9_of_one_worker_fails_only_its_calls_and_is_replaced(workers: ServerProcess) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    victim, survivor = workers.workers()
    before = _samples(workers)  # also the supervisor's last reading of the victim's totals

    # A stream on each worker, each mid-conversation when the victim dies.
    channels = {w["index"]: grpc.insecure_channel(w["grpc"]) for w in (victim, survivor)}
    try:
        feeds = {i: _Feed() for i in channels}
        streams = {
            i: classifier_pb2_grpc.ClassifierStub(ch).ClassifyStream(
                iter(feeds[i]), timeout=60, metadata=AUTH
            )
            for i, ch in channels.items()
        }
        for i in channels:
            feeds[i].put(_request(x))
            assert next(streams[i]).HasField("response")

        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            next(streams[victim["index"]])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The survivor's call goes on; readiness drops until the replacement is ready, then returns.
        feeds[survivor["index"]].put(_request(x))
        assert next(streams[survivor["index"]]).HasField("response")
        assert poll_until(lambda: _health(survivor["grpc"]) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with grpc.insecure_channel(workers.address) as ch:  # the shared port keeps answering meanwhile
            classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(x), timeout=10, metadata=AUTH)
        feeds[survivor["index"]].close()
        assert [r.HasField("response") for r in streams[survivor["index"]]] == []
    finally:
        for ch in channels.values():
            ch.close()

    def replaced() -> bool:
        listed = workers.workers()
        return (
            listed[0]["pid"] != victim["pid"]
            and _health(listed[0]["grpc"]) == health_pb2.HealthCheckResponse.SERVING
        )

    assert poll_until(replaced, 60)
    assert poll_until(lambda: _health(survivor["grpc"]) == health_pb2.HealthCheckResponse.SERVING, 30)
    after = _samples(workers)
    assert _total(after, "convserve_worker_restarts_total") == 1
    # Monotonic: the dead worker's totals stay in the sum (plus the calls made since).
    for name in ("convserve_requests_total", "nv_inference_request_success", "convserve_images_total"):
        assert _total(after, name, model="m") >= _total(before, name, model="m") + 2, name


class _Feed:
    """A request iterator the test feeds one message at a time (bounded waits)."""

    def __init__(self) -> None:
        self._items: list[pb.ClassifyRequest | None] = []
        self._ready = threading.Condition()

    def put(self, item: pb.ClassifyRequest) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._items.append(None)
            self._ready.notify()

    def __iter__(self) -> Iterator[pb.ClassifyRequest]:
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._items, timeout=60):
                    return
                item = self._items.pop(0)
            if item is None:
                return
            yield item


def test_every_log_line_names_its_worker(workers: ServerProcess) -> None:
    lines = [line for line in workers.log_text().splitlines() if " convserve." in line]
    from_workers = [line for line in lines if " convserve.supervisor:" not in line]
    assert from_workers
    assert all(" worker=" in line for line in from_workers), [x for x in from_workers if " worker=" not in x]
    assert {f"worker={i}" for i in range(WORKERS)} <= {part for line in from_workers for part in line.split()}


def test_sigterm_drains_every_worker_and_exits_0(repo: Path, tmp_path: Path) -> None:
    server = start_server_process(repo, tmp_path / "servers", workers=WORKERS, timeout=90)
    outcomes: list[tuple[str, grpc.StatusCode]] = []
    lock = threading.Lock()
    stop = threading.Event()
    x = np.zeros((1, 1, 8, 8), np.float32)

    def load(address: str) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            for _ in range(100_000):  # bounded; the shutdown ends it far earlier
                if stop.is_set():
                    return
                try:
                    stub.Classify(_request(x), timeout=10, metadata=AUTH)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                with lock:
                    outcomes.append((address, code))
                if code != grpc.StatusCode.OK:
                    return

    def answered(address: str) -> int:
        with lock:
            return sum(1 for a, code in outcomes if a == address and code == grpc.StatusCode.OK)

    pids = [w["pid"] for w in server.workers()]
    addresses = [w["grpc"] for w in server.workers()]
    threads = [threading.Thread(target=load, args=(a,)) for a in addresses]
    try:
        for t in threads:
            t.start()
        # Every worker busy in a closed loop (a call in flight nearly always) when the signal comes.
        assert poll_until(lambda: all(answered(a) >= 20 for a in addresses), 30)
        assert server.stop(60) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    codes = {code for _, code in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert not any(_alive(pid) for pid in pids)
    log = server.log_text()
    assert all(f"worker={i}" in log for i in range(WORKERS))
    assert log.count("INFO convserve.server: stopped") == WORKERS, log[-3000:]


def test_a_busy_port_stops_the_supervisor_with_one_error(
    repo: Path, tmp_path: Path, workers: ServerProcess
) -> None:
    with pytest.raises(ServerStartError) as err:
        start_server_process(repo, tmp_path / "servers", grpc_port=workers.grpc_port, workers=WORKERS)
    assert "exited with 1" in str(err.value)


def test_a_negative_worker_count_is_one_error_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "convserve.server", "--workers", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: workers must be >= 0, got -1"


def test_workers_split_the_cores_between_them() -> None:
    settings = Settings()
    split = worker_settings(settings, workers=2, cores=4, grpc_port=1234, http_port=-1)
    assert (split.intra_op_threads, split.cpu_workers, split.workers) == (2, 2, 1)
    assert (split.grpc_port, split.http_port, split.metrics_port, split.port_file) == (1234, -1, -1, "")
    assert worker_settings(settings, workers=4, cores=2, grpc_port=1, http_port=2).intra_op_threads == 1
    chosen = Settings(intra_op_threads=3, cpu_workers=5)
    split = worker_settings(chosen, workers=2, cores=4, grpc_port=1, http_port=2)
    assert (split.intra_op_threads, split.cpu_workers) == (3, 5)


def test_usable_cores_follow_affinity_and_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota_cores(tmp_path, "0::/pod\n") == 1.5
    (tmp_path / "pod" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota_cores(tmp_path, "0::/pod\n") is None
    v1 = tmp_path / "cpu,cpuacct" / "pod"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota_cores(tmp_path, "4:cpu,cpuacct:/pod\n") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota_cores(tmp_path, "4:cpu,cpuacct:/pod\n") is None

    import convserve.server.processes.cores as cores

    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cores, "cgroup_quota_cores", lambda: 1.5)
    assert usable_cores() == 2  # a 1.5-CPU quota: two threads can run
    monkeypatch.setattr(cores, "cgroup_quota_cores", lambda: None)
    assert usable_cores() == 4
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {3})
    assert usable_cores() == 1
