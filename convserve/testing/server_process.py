"""A convserve server in a child process on 127.0.0.1: the one harness that tests, benchmarks and
scripts start, wait for and stop servers with (kept out of the production modules it drives).

    with start_server_process(["--model-repository", "model_repository"], workdir) as server:
        Client(server.address).classify(...)

The child binds ephemeral ports and reports them in a port file (``--port-file``); every wait runs
against a ``time.monotonic()`` deadline, and stopping is SIGTERM, then SIGKILL past a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ServerProcess",
    "ServerStartError",
    "child_env",
    "loopback_command",
    "read_port_file",
    "start_server_process",
    "wait_serving",
]


class ServerStartError(RuntimeError):
    """The child exited, or missed its deadline, before it reported its ports or answered SERVING."""


def loopback_command(
    port_file: str | Path,
    *flags: str,
    grpc_port: int = 0,
    metrics_port: int = 0,
    http_port: int = 0,
    workers: int = 1,
) -> list[str]:
    """``python -m convserve.server`` on 127.0.0.1 reporting its bound ports in ``port_file``
    (0 = ephemeral, -1 = off: no metrics, no REST); ``flags`` are further ``convserve serve`` flags.
    One serving process unless ``workers`` (or a ``--workers`` flag) asks for more (0 = one per core)."""
    return [
        sys.executable, "-m", "convserve.server", "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--workers", str(workers), "--port-file", str(port_file), *flags,
    ]  # fmt: skip


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus CONVSERVE_* (a child takes settings from its command line), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env.update(extra or {})
    return env


def read_port_file(path: Path) -> dict[str, Any] | None:
    """The ports a server wrote, or None while the file is absent (it is written atomically)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@dataclass
class ServerProcess:
    """A running ``python -m convserve.server`` child and the ports it reported."""

    proc: subprocess.Popen[bytes]
    port_file: Path
    log_path: Path
    grpc_port: int = 0
    metrics_port: int | None = None
    http_port: int | None = None  # the v2 REST port; None when the server runs without it
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return None if self.http_port is None else f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[dict[str, Any]]:
        """The worker processes the port file lists now (index, pid, the gRPC address of that worker
        alone); empty for a single-process server."""
        ports = read_port_file(self.port_file) or {}
        return list(ports.get("workers", []))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the server drains), then SIGKILL past ``timeout`` seconds; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_serving(
    address: str,
    deadline: float,
    credentials: Any = None,
    options: Sequence[tuple[str, Any]] | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll the standard gRPC health service until SERVING, against the monotonic ``deadline``
    (and until ``proc`` exits, when given); raise ServerStartError otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    opts = list(options or [])
    channel = (
        grpc.secure_channel(address, credentials, opts)
        if credentials is not None
        else grpc.insecure_channel(address, opts)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerStartError(f"{address} not SERVING in time")
            if proc is not None and proc.poll() is not None:
                raise ServerStartError(f"server exited with {proc.returncode} before SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=min(left, 2.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)


def start_server_process(
    flags: Sequence[str],
    workdir: Path,
    *,
    grpc_port: int = 0,
    metrics_port: int = 0,
    http_port: int = 0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    wait: bool = True,
    timeout: float = 60.0,
    credentials: Any = None,
    channel_options: Sequence[tuple[str, Any]] | None = None,
    workers: int = 1,
) -> ServerProcess:
    """Start a server child (``flags`` as for ``convserve serve``), wait for its port file and, with
    ``wait``, for health SERVING; its output goes to a log file in ``workdir``. On failure the child
    is killed and ServerStartError carries the end of its log."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    port_file = workdir / f"ports-{stamp}.json"
    log_path = workdir / f"server-{stamp}.log"
    log = log_path.open("wb")
    cmd = loopback_command(
        port_file,
        *flags,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        http_port=http_port,
        workers=workers,
    )
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(env), cwd=cwd)
    server = ServerProcess(proc, port_file, log_path, _log=log)
    deadline = time.monotonic() + timeout
    try:
        while (ports := read_port_file(port_file)) is None:
            if proc.poll() is not None:
                raise ServerStartError(f"server exited with {proc.returncode} before writing {port_file}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"no port file within {timeout} s")
            time.sleep(0.05)
        server.grpc_port, server.metrics_port = int(ports["grpc_port"]), ports.get("metrics_port")
        server.http_port = ports.get("http_port")
        if wait:
            wait_serving(server.address, deadline, credentials, channel_options, proc)
    except BaseException as exc:
        server.stop(5)
        if isinstance(exc, ServerStartError):
            raise ServerStartError(f"{exc}; its log ends:\n{server.log_text()[-3000:]}") from None
        raise
    return server
