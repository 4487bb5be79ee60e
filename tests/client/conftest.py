"""SDK test helpers: the twin fixture (each test runs against Client and AsyncClient), images, references.

``twin(address, **settings)`` makes a client of the parametrized kind. An ``AsyncClient`` is wrapped
so the test body reads the same for both: coroutines run to completion on one private event loop, and
``classify_stream`` returns a lazy iterator that pulls the async iterator one item at a time.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.client import AsyncClient, Client
from convserve.testing.prerequisites import require_binary

# The helpers module beside this file, importable from the test modules (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent))

from sdk_testing import GRAY, softmax


class AsyncAsSync:
    """Drives an AsyncClient from synchronous test code on one event loop (the channel's loop)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if inspect.isasyncgen(result):
                return self._pull(result)
            if inspect.iscoroutine(result):
                return self._loop.run_until_complete(result)
            return result

        return call

    def _pull(self, agen: Any) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(agen.aclose())

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._client.close())
        finally:
            self._loop.close()

    def run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(target: str | None = None, **settings: Any) -> Any:
        client: Any = Client(target, **settings) if request.param == "sync" else \
            AsyncAsSync(AsyncClient(target, **settings))
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


@pytest.fixture
def reference(model_repository: Path, run_reference: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``reference(chw_batch, model="gray", version=2) -> probabilities`` from in-process ONNX Runtime."""

    def probabilities(batch: np.ndarray, model: str = GRAY, version: int = 2) -> np.ndarray:
        return softmax(run_reference(model_repository / model / str(version) / "model.onnx", batch))

    return probabilities


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address whose port this process holds without listening: connecting is refused, and no other
    process can start listening there meanwhile (unlike a fixed "unused" port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="session")
def gray_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding only the gray model: extra servers start in a fraction of the time."""
    root = tmp_path_factory.mktemp("gray_repository")
    shutil.copytree(model_repository / GRAY, root / GRAY)
    return root


@pytest.fixture
def small_server(server_factory: Callable[..., Any], gray_repository: Path) -> Callable[..., Any]:
    """``small_server(**settings)``: a fresh server on the gray-only repository."""
    return lambda **settings: server_factory(model_repository=str(gray_repository), **settings)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    require_binary(
        "openssl", "openssl is not installed: bash scripts/install_system_deps.sh (apt-get install openssl)"
    )
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=convserve test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=convserve {name}")
        (d / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
