"""The cpu image run for real: non-root, read-only root, no capabilities, health and classify through a
published loopback port (gRPC and v2 REST), answers equal to an independent ONNX Runtime run,
HEALTHCHECK healthy on the default and a non-default port, and SIGTERM drains with exit status 0 within
the grace period."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
CONVSERVE = [sys.executable, "-m", "convserve.cli"]
GRACE_S = 10
MODEL = ROOT / "model_repository" / "digits_lenet" / "1" / "model.onnx"


def _health(port: int) -> str | None:
    result = subprocess.run(
        [*CONVSERVE, "health", "--server", f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture
def run_image(deploy: Any, network: str) -> Iterator[Callable[..., str]]:
    """``run_image(*docker_run_flags)`` → the name of a hardened container of the image, started."""
    names: list[str] = []

    def run(*flags: str) -> str:
        name = f"{network}-{len(names)}"
        names.append(name)
        deploy.docker(
            "run", "-d", "--name", name, "--network", network,
            "--label", f"convserve.test-run={deploy.run_id}",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
            "-e", f"CONVSERVE_DRAIN_GRACE_SECONDS={GRACE_S}",
            *flags, deploy.image,
        )  # fmt: skip
        return name

    yield run
    for name in names:
        deploy.docker("rm", "-f", name, check=False, timeout=60)


def _serving(deploy: Any, name: str, port: int) -> None:
    try:
        deploy.wait_for(f"{name} SERVING on 127.0.0.1:{port}", lambda: _health(port) == "SERVING", timeout=60)
    except AssertionError:
        raise AssertionError(deploy.docker("logs", name, check=False).stderr[-3000:]) from None


def _digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 digits (scikit-learn's 8x8 scaled 3x and padded): the model's input size, so the
    server's resize is the identity and the reference needs no resampling."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.kron(data.images[:count] * (255 / 16), np.ones((3, 3)))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))).round().astype(np.uint8)  # (N, 28, 28)
    return images, data.target[:count]


def test_image_runs_non_root_read_only_and_classifies_like_onnx_runtime(
    deploy: Any, run_image: Callable[..., str], run_reference: Callable[..., np.ndarray],
    encode_png: Callable[..., bytes], rest: Callable[..., Any], infer_request: Callable[..., Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    name = run_image("-p", "127.0.0.1::8000", "-p", "127.0.0.1::8001", "-p", "127.0.0.1::8002")
    port, http_port = deploy.published_port(name, 8001), deploy.published_port(name, 8000)
    _serving(deploy, name, port)

    # The server process (pid 1, exec-form entrypoint) runs as the image's numeric user.
    status = deploy.docker("exec", name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status
    assert deploy.inspect(name)["Config"]["User"] == "10001:10001"
    # Even root inside the container cannot write the root filesystem.
    touch = deploy.docker("exec", "-u", "0", name, "touch", "/opt/venv/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch

    images, _ = _digits(6)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"digit{i}.png")
        files[-1].write_bytes(encode_png(image))
    result = subprocess.run(
        [*CONVSERVE, "classify", "--server", f"127.0.0.1:{port}", "--json", "--top-k", "3", *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == [f.name for f in files]

    from convserve.common.model_config import load_config
    from convserve.server.runtime.preprocess import decode_image

    config = json.loads((MODEL.parent.parent / "config.json").read_text())
    # The PNGs preprocessed here by the model's own config (whatever steps it names: ink fitting,
    # polarity, mean/std), then run by a fresh ONNX Runtime session outside the container.
    cfg = load_config(MODEL.parent.parent)
    pixels = np.stack([decode_image(f.read_bytes(), cfg) for f in files])  # (N, 1, 28, 28)
    logits = run_reference(MODEL, pixels)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, expected in zip(rows, probs, strict=True):
        top = [p["index"] for p in row["predictions"]]
        assert top == list(np.argsort(-expected)[:3]), (row, expected)
        got = [p["probability"] for p in row["predictions"]]
        np.testing.assert_allclose(got, np.sort(expected)[::-1][:3], atol=1e-5)
        assert row["predictions"][0]["label"] == config["labels"][top[0]]

    # The v2 REST port (8000 in the image), through its published port: readiness without a token, and
    # a raw tensor (the digits scaled by the config's mean/std; tensors skip image preprocessing) gives
    # the logits of the reference run on the same tensor.
    assert rest(http_port, "/v2/health/ready") == (200, {"ready": True})
    assert rest(http_port, "/v2/health/live") == (200, {"live": True})
    pre = config["preprocessing"]
    batch = (images[:, None].astype(np.float32) / 255 - pre["mean"][0]) / pre["std"][0]  # (N, 1, 28, 28)
    logits = run_reference(MODEL, batch)
    status, reply = rest(http_port, "/v2/models/digits_lenet/infer", infer_request(batch), timeout=30)
    assert status == 200, reply
    (output,) = reply["outputs"]
    assert output["shape"] == list(logits.shape) and output["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(output["data"], logits.shape), logits, rtol=1e-4, atol=1e-4)


def test_sigterm_drains_and_exits_0_within_the_grace_period_with_every_log_line_json(
    deploy: Any, run_image: Callable[..., str]
) -> None:
    name = run_image("-p", "127.0.0.1::8001", "-e", "CONVSERVE_LOG_FORMAT=json")
    _serving(deploy, name, deploy.published_port(name, 8001))
    started = time.monotonic()
    deploy.docker("stop", "--time", str(GRACE_S + 5), name, timeout=GRACE_S + 30)  # SIGTERM, then SIGKILL
    elapsed = time.monotonic() - started
    state = deploy.inspect(name)["State"]
    logs = deploy.docker("logs", name).stderr
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs[-2000:])
    assert elapsed < GRACE_S + 5, f"stop took {elapsed:.1f} s: SIGKILL, not the drain, ended it"
    # JSON logs mean every line, ONNX Runtime's own included (routed through the server's logger).
    records = []
    for line in filter(str.strip, logs.splitlines()):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line that is not JSON: {line!r}") from None
    assert "shutdown signal received" in [r["msg"] for r in records], logs[-2000:]


@pytest.mark.parametrize("grpc_port", [None, 18001], ids=["default-port", "port-18001"])
def test_healthcheck_turns_healthy_on_the_configured_port(
    deploy: Any, run_image: Callable[..., str], grpc_port: int | None
) -> None:
    # The image's own HEALTHCHECK command; only its interval is shortened to keep the test brief.
    flags = ["--health-interval", "1s", "--health-retries", "3"]
    if grpc_port is not None:
        flags += ["-e", f"CONVSERVE_GRPC_PORT={grpc_port}"]
    name = run_image(*flags)
    health = deploy.inspect(name)["Config"]["Healthcheck"]["Test"]
    assert health[0] == "CMD" and "convserve health" in " ".join(health), health

    def status() -> str | None:
        state = deploy.inspect(name)["State"]
        value = state.get("Health", {}).get("Status")
        return value if value in {"healthy", "unhealthy"} else None

    assert deploy.wait_for(f"{name} health", status, timeout=45) == "healthy", deploy.inspect(name)["State"]
