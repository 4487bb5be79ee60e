"""Shared fixtures: environment isolation, a temporary model repository of tiny ONNX models, real servers.

Fixtures other areas reuse (SDK, batcher, metrics tests):

- ``model_repository`` (session): Path of a temporary repository built with onnx.helper — see
  ``REPOSITORY_MODELS`` below for the models, their versions and which ones are broken on purpose.
- ``server`` (session): a real convserve server on 127.0.0.1:<ephemeral>, running in a background thread
  with its own asyncio loop, serving ``model_repository``. A ``ServerHandle``: ``.address``
  ("127.0.0.1:PORT"),
  ``.grpc_port``, ``.metrics_port``, ``.running`` (the RunningServer), ``.registry`` (its own Prometheus
  registry), ``.call(coro)`` (run a coroutine on the server's loop). Stopped at the end of the session.
- ``server_factory`` (function): ``server_factory(load_models=True, **settings_overrides) -> ServerHandle``
  for a server with other settings (limits, providers, auth...); every one is stopped at teardown.
- ``make_model`` (session): the ONNX builder,
  ``make_model(path, channels=1, size=8, classes=4, seed=0, ...)``.
- ``run_reference`` (session): ``run_reference(model_path, batch) -> logits`` from a fresh in-process
  ONNX Runtime session on the same file — the independent reference for served outputs.
- ``encode_png`` (session): ``encode_png(uint8 HW or HWC array, mode=None) -> PNG bytes``.
- ``server_process`` (function): ``server_process(*cli_args, env=None) -> ServerProcess`` runs
  ``python -m convserve.server --grpc-port 0 --port-file ...`` in a child process and waits for health
  SERVING (the shared harness, convserve.testing); ``.address``, ``.grpc_port``, ``.metrics_port``,
  ``.proc``, ``.log_text()``, ``.stop()`` (SIGTERM → exit status). Stopped at teardown.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing import ServerProcess, start_server_process


@pytest.fixture(autouse=True)
def _clean_convserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CONVSERVE_* variables: a developer's shell must not leak into tests."""
    for key in list(os.environ):
        if key.startswith("CONVSERVE_"):
            monkeypatch.delenv(key, raising=False)


# ---- tiny ONNX models -----------------------------------------------------------------------------------


def make_tiny_model(
    path: Path,
    *,
    channels: int = 1,
    size: int = 8,
    classes: int = 4,
    seed: int = 0,
    input_name: str = "input",
    output_name: str = "logits",
    softmax: bool = False,
    filters: int = 4,
    depth: int = 0,
) -> Path:
    """Write Conv(3x3) → Relu [→ (Conv → Relu) * depth] → GlobalAveragePool → Flatten → Gemm (→ Softmax).

    The batch dimension is dynamic. ``depth`` adds filters→filters convolutions to make a slow model.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (filters, channels, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (filters,)).astype(np.float32)
    fc_w = rng.normal(0, 1.0, (classes, filters)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    last = "scores" if softmax else output_name
    nodes = [
        helper.make_node("Conv", ["x_in", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu0"]),
    ]
    inits = []
    for d in range(depth):
        wd = rng.normal(0, 1.0 / (3 * np.sqrt(filters)), (filters, filters, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(wd, f"w{d + 1}"))
        nodes += [
            helper.make_node("Conv", [f"relu{d}", f"w{d + 1}"], [f"conv{d + 1}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{d + 1}"], [f"relu{d + 1}"]),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", [f"relu{depth}"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [last], transB=1),
    ]
    nodes.insert(0, helper.make_node("Identity", [input_name], ["x_in"]))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], [output_name], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", classes])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
            *inits,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    """The independent reference: a fresh in-process ONNX Runtime session on the same file."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: batch.astype(np.float32)})[0]


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _config(name: str, *, channels: int, size: int, classes: int, **extra: Any) -> dict[str, Any]:
    mode = "L" if channels == 1 else "RGB"
    cfg: dict[str, Any] = {
        "name": name,
        "input": {"name": "input", "dtype": "float32", "shape": [channels, size, size], "layout": "NCHW"},
        "output": {"name": "logits", "kind": "logits"},
        "preprocessing": {
            "color_mode": mode,
            "resize": [size, size],
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
        "labels": [f"class_{i}" for i in range(classes)],
        "max_batch_size": 16,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


# name → (config overrides, {version: model kwargs}); "broken" entries are written by hand below.
REPOSITORY_MODELS: dict[str, tuple[dict[str, Any], dict[int, dict[str, Any]]]] = {
    # 1x8x8 grayscale, 4 classes, versions 1 and 2 both served (latest 2).
    "gray": ({"version_policy": {"latest": 2}}, {1: {"seed": 1}, 2: {"seed": 2}}),
    # 3x16x16 RGB, 10 classes.
    "rgb": ({"channels": 3, "size": 16, "classes": 10}, {1: {"seed": 3}}),
    # versions 1..3 on disk, default policy (latest 1) serves only 3.
    "latest": ({}, {1: {"seed": 4}, 2: {"seed": 5}, 3: {"seed": 6}}),
    # versions 1..3 on disk, specific [1, 3].
    "specific": (
        {"version_policy": {"latest": None, "specific": [1, 3]}},
        {1: {"seed": 7}, 2: {"seed": 8}, 3: {"seed": 9}},
    ),
    # the graph ends in Softmax: output kind "probabilities", used as is.
    "probs": ({"output": {"kind": "probabilities"}}, {1: {"seed": 10, "softmax": True}}),
    # dynamic batching off for this model.
    "unbatched": ({"batching": {"enabled": False}}, {1: {"seed": 11}}),
    # heavy enough (~10 ms per image) to keep requests in flight; one instance, no merging.
    "slow": (
        {"channels": 3, "size": 48, "batching": {"enabled": False, "instances": 1}, "max_batch_size": 64},
        {1: {"seed": 13, "filters": 32, "depth": 3}},
    ),
    # config lists 5 labels but the graph has 4 classes → failed, the others serve.
    "mismatch": ({"classes": 5}, {1: {"seed": 12, "classes": 4}}),
}
# The models of the shared repository that fail to load on purpose.
BROKEN_MODELS = ("mismatch", "broken_onnx", "bad_config", "no_file")


def build_repository(root: Path) -> Path:
    """Write every REPOSITORY_MODELS entry plus hand-made broken ones under ``root``."""
    for name, (table_overrides, versions) in REPOSITORY_MODELS.items():
        overrides = dict(table_overrides)
        shape = {k: overrides.pop(k) for k in ("channels", "size", "classes") if k in overrides}
        dims = {"channels": 1, "size": 8, "classes": 4, **shape}
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(_config(name, **dims, **overrides)))
        for version, kwargs in versions.items():
            make_tiny_model(
                root / name / str(version) / "model.onnx",
                **{"channels": dims["channels"], "size": dims["size"], "classes": dims["classes"], **kwargs},
            )
    # Not an ONNX file at all.
    (root / "broken_onnx" / "1").mkdir(parents=True)
    (root / "broken_onnx" / "config.json").write_text(
        json.dumps(_config("broken_onnx", channels=1, size=8, classes=4))
    )
    (root / "broken_onnx" / "1" / "model.onnx").write_bytes(b"this is not a protobuf")
    # A config that does not parse.
    (root / "bad_config" / "1").mkdir(parents=True)
    (root / "bad_config" / "config.json").write_text("{not json")
    make_tiny_model(root / "bad_config" / "1" / "model.onnx")
    # A version folder without model.onnx.
    (root / "no_file" / "1").mkdir(parents=True)
    (root / "no_file" / "config.json").write_text(
        json.dumps(_config("no_file", channels=1, size=8, classes=4))
    )
    return root


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def ready_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared repository without its broken models: a server with strict readiness gets ready."""
    root = tmp_path_factory.mktemp("ready_repository")
    for folder in model_repository.iterdir():
        if folder.name not in BROKEN_MODELS:
            shutil.copytree(folder, root / folder.name, symlinks=True)
    return root


# ---- in-process servers ---------------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A server running in a background thread's event loop."""

    running: Any
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    registry: Any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def grpc_port(self) -> int:
        return self.running.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self.running.metrics_port

    @property
    def http_port(self) -> int | None:
        return self.running.http_port

    @property
    def http_url(self) -> str:
        """Base URL of the v2 REST front end, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.running.http_port}"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if not self.loop.is_running():
            return
        try:
            self.call(self.running.stop(grace), timeout=grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


def start_server_thread(settings: Any, load_models: bool = True, timeout: float = 60.0) -> ServerHandle:
    """Start ``convserve.server.app.start_server`` on a fresh loop in a daemon thread; wait until it is up."""
    from prometheus_client import CollectorRegistry

    from convserve.server.app import start_server

    registry = CollectorRegistry()
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["running"] = loop.run_until_complete(
                start_server(settings, registry, load_models=load_models)
            )
        except BaseException as exc:
            started["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=main, name="convserve-test-server", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError(f"server did not start within {timeout} s")
    if "error" in started:
        raise started["error"]
    return ServerHandle(started["running"], loop, thread, registry)


def test_settings(model_repository: Path, **overrides: Any) -> Any:
    """Settings for a loopback test server on ephemeral ports."""
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "model_repository": str(model_repository),
        "drain_grace_seconds": 2.0,
        # The shared repository holds broken models on purpose (failure reporting): serve the others.
        # Strict readiness, the default, has its own tests.
        "strict_readiness": False,
    }
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test despite the name


@pytest.fixture(scope="session")
def server(model_repository: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(test_settings(model_repository))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def server_factory(model_repository: Path) -> Iterator[Callable[..., ServerHandle]]:
    handles: list[ServerHandle] = []

    def factory(load_models: bool = True, **overrides: Any) -> ServerHandle:
        repository = overrides.pop("model_repository", model_repository)  # a test may bring its own
        handle = start_server_thread(test_settings(repository, **overrides), load_models=load_models)
        handles.append(handle)
        return handle

    try:
        yield factory
    finally:
        for handle in handles:
            handle.stop()


@pytest.fixture(scope="session")
def make_model() -> Callable[..., Path]:
    """The tiny ONNX builder as a fixture (``make_model(path, channels=..., size=..., classes=...)``)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def run_reference() -> Callable[[Path, np.ndarray], np.ndarray]:
    """``run_reference(model_path, batch) -> logits`` with a fresh in-process ONNX Runtime session."""
    return reference_logits


@pytest.fixture(scope="session")
def encode_png() -> Callable[..., bytes]:
    """``encode_png(uint8_array, mode=None) -> PNG bytes``."""
    return png_bytes


# ---- subprocess servers ---------------------------------------------------------------------------------


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``server_process(*cli_args, env=None) -> ServerProcess``; every one is stopped at teardown."""
    handles: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        workdir = tmp_path / f"server{len(handles)}"
        workdir.mkdir()
        handle = start_server_process(list(args), workdir, env=env)
        handles.append(handle)
        return handle

    try:
        yield factory
    finally:
        for handle in handles:
            handle.stop()
