"""Hardening fixtures: a small model repository, real server subprocesses, stubs, references, TLS material.

- ``model_writer`` (session): writes a model folder (config.json + ONNX versions) into a repository.
- ``hardening_repository`` (session): ``gray`` (1x8x8, 4 classes, versions 1 and 2 served) and ``slow``
  (3x48x48, ~5-10 ms per image, batching off, one instance: keeps requests in flight for drain/crash tests).
- ``spawn_server`` (function): ``spawn_server(repo, *flags, grpc_port=0) -> ServerProcess``: ``python -m
  convserve.server`` on 127.0.0.1 with ``--port-file``; waits for the file and for health SERVING against a
  deadline; every process is terminated, then killed, at teardown.
- ``tls_material`` (session): a CA, a server certificate (SAN 127.0.0.1, localhost), a client certificate
  signed by the CA and one signed by another CA, made with the ``openssl`` CLI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing import ServerProcess
from convserve.testing import start_server_process as _start
from convserve.testing.prerequisites import require_binary

GRAY_LABELS = [f"class_{i}" for i in range(4)]


def write_model(
    repo: Path,
    name: str,
    versions: dict[int, dict[str, Any]],
    make_model: Callable[..., Path],
    *,
    channels: int = 1,
    size: int = 8,
    classes: int = 4,
    **config: Any,
) -> None:
    """One model folder: config.json (the repository's format) plus an ONNX file per version."""
    cfg: dict[str, Any] = {
        "name": name,
        "input": {"name": "input", "dtype": "float32", "shape": [channels, size, size], "layout": "NCHW"},
        "output": {"name": "logits", "kind": "logits"},
        "preprocessing": {
            "color_mode": "L" if channels == 1 else "RGB",
            "resize": [size, size],
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
        "labels": [f"class_{i}" for i in range(classes)],
        "max_batch_size": 16,
        **config,
    }
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.json").write_text(json.dumps(cfg))
    for version, kwargs in versions.items():
        make_model(
            repo / name / str(version) / "model.onnx", channels=channels, size=size, classes=classes, **kwargs
        )


@pytest.fixture(scope="session")
def hardening_repository(tmp_path_factory: pytest.TempPathFactory, make_model: Callable[..., Path]) -> Path:
    repo = tmp_path_factory.mktemp("hardening_repository")
    write_model(repo, "gray", {1: {"seed": 1}, 2: {"seed": 2}}, make_model, version_policy={"latest": 2})
    write_model(
        repo,
        "slow",
        {1: {"seed": 13, "filters": 32, "depth": 3}},
        make_model,
        channels=3,
        size=48,
        batching={"enabled": False, "instances": 1},
        max_batch_size=64,
    )
    return repo


@pytest.fixture(scope="session")
def model_writer(make_model: Callable[..., Path]) -> Callable[..., None]:
    """``model_writer(repo, name, {version: model kwargs}, channels=1, size=8, classes=4, **config)``."""

    def write(repo: Path, name: str, versions: dict[int, dict[str, Any]], **kwargs: Any) -> None:
        write_model(repo, name, versions, make_model, **kwargs)

    return write


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def normalized(pixels: np.ndarray, mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """What the documented preprocessing gives for already-sized uint8 pixels: (x/255 - mean) / std."""
    return ((pixels.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# ---- server subprocesses ----------------------------------------


def start_server_process(repo: Path, workdir: Path, *flags: str, **kwargs: Any) -> ServerProcess:
    """A server child on 127.0.0.1 serving ``repo`` (the shared harness; keyword arguments pass through)."""
    return _start(["--model-repository", str(repo), *flags], workdir, **kwargs)


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def spawn(repo: Path, *flags: str, **kwargs: Any) -> ServerProcess:
        sp = start_server_process(repo, tmp_path / "servers", *flags, **kwargs)
        started.append(sp)
        return sp

    try:
        yield spawn
    finally:
        for sp in started:
            sp.stop(10)


# ---- TLS material ----------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA the server does not trust
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, ca: str, subject: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-subj",
        subject,
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=d,
    )


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    require_binary(
        "openssl", "openssl is not installed: bash scripts/install_system_deps.sh (apt-get install openssl)"
    )
    d = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "rogue_ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN=convserve test {ca}",
            cwd=d,
        )
    _issue(
        d,
        "server",
        "ca",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _issue(d, "client", "ca", "/CN=convserve test client", "extendedKeyUsage=clientAuth\n")
    _issue(d, "rogue", "rogue_ca", "/CN=convserve rogue client", "extendedKeyUsage=clientAuth\n")
    return TlsMaterial(
        d / "ca.crt",
        d / "server.crt",
        d / "server.key",
        d / "client.crt",
        d / "client.key",
        d / "rogue.crt",
        d / "rogue.key",
    )
