"""The docker-compose stack as local processes on 127.0.0.1, from the same config files (`make stack`).

For machines without a container engine: N convserve replicas (`python -m convserve.server`), nginx
running deploy/nginx/nginx.conf rendered for loopback ports, and Prometheus running
deploy/prometheus/prometheus.yml rendered for the replicas' metrics ports. Only the lines that name
compose's network (DNS names, Docker's resolver, DNS service discovery) are rewritten; every other
setting is the project's own. Runs until Ctrl-C (or SIGTERM), then stops everything it started.

    python scripts/run_stack.py                     # gRPC on 127.0.0.1:8001, Prometheus on :9090
    python scripts/run_stack.py --lb-port 0 --prometheus-port 0 --replicas 3

The tests import `run_stack()` and `render_*()` from this file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.testing import loopback_command

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
PROMETHEUS_CONF = ROOT / "deploy" / "prometheus" / "prometheus.yml"
BUNDLED_REPOSITORY = ROOT / "model_repository"
# The compose service whose replicas nginx balances and Prometheus discovers by DNS.
SERVICE = "convserve"
# `http2 on;` arrived in nginx 1.25.1; older ones (Debian bookworm's 1.22) spell it `listen ... http2`.
NGINX_HTTP2_DIRECTIVE = (1, 25, 1)
INSTALL_HINT = "install it with `bash scripts/install_system_deps.sh` (Debian/Ubuntu: apt-get install {name})"


class StackError(RuntimeError):
    """The stack could not start: a binary is missing, a process died, or a wait ran out."""


@dataclass(frozen=True)
class Replica:
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"


@dataclass(frozen=True)
class Stack:
    """What a running stack is reachable at; every address is on 127.0.0.1."""

    replicas: tuple[Replica, ...]
    lb_address: str
    prometheus_url: str
    workdir: Path
    processes: tuple[tuple[str, subprocess.Popen[bytes]], ...]

    def exited(self) -> list[str]:
        """Processes of the stack that are no longer running, as 'name (exit code)'."""
        return [
            f"{name} (exit {proc.returncode})" for name, proc in self.processes if proc.poll() is not None
        ]


# ---- rendering the project's configs for loopback ---------------------------------------------------


def render_nginx_conf(
    text: str, *, listen_port: int, backends: Sequence[str], workdir: Path, legacy_http2: bool
) -> str:
    """deploy/nginx/nginx.conf with its `# compose:` lines pointed at loopback, plus local file paths.

    `resolver` (Docker's DNS) is dropped, `backends` becomes one `server` line per replica address,
    `listen` binds 127.0.0.1:listen_port. pid and temp files go under ``workdir``.
    """
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        marker = re.search(r"#\s*compose:\s*(\w+)\s*$", line)
        indent = line[: len(line) - len(line.lstrip())]
        if marker is None:
            if legacy_http2 and line.strip() == "http2 on;":
                continue
            out.append(line)
            if line.strip() == "http {":
                out += [
                    f"{indent}    {d} {workdir / name};"
                    for d, name in (
                        ("client_body_temp_path", "body"),
                        ("proxy_temp_path", "proxy"),
                        ("fastcgi_temp_path", "fastcgi"),
                        ("uwsgi_temp_path", "uwsgi"),
                        ("scgi_temp_path", "scgi"),
                    )
                ]
            continue
        kind = marker[1]
        if kind in seen:
            raise StackError(f"nginx.conf: marker `# compose: {kind}` appears twice")
        seen.add(kind)
        if kind == "resolver":
            continue
        if kind == "backends":
            out += [f"{indent}server {address};" for address in backends]
        elif kind == "listen":
            out.append(f"{indent}listen 127.0.0.1:{listen_port}{' http2' if legacy_http2 else ''};")
        else:
            raise StackError(f"nginx.conf: unknown marker `# compose: {kind}`")
    missing = {"resolver", "backends", "listen"} - seen
    if missing:
        raise StackError(
            f"nginx.conf: missing marker(s) {sorted(missing)}; the renderer cannot point it at loopback"
        )
    return f"pid {workdir / 'nginx.pid'};\n" + "\n".join(out) + "\n"


def _seconds(duration: str) -> float:
    """A Prometheus duration ('900ms', '5s', '1m30s') in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise StackError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def render_prometheus_config(
    config: dict[str, Any], *, targets: Sequence[str], scrape_interval: str | None = None
) -> dict[str, Any]:
    """The project's Prometheus config with the convserve job's DNS discovery replaced by ``targets``.

    ``scrape_interval`` (tests use '1s') overrides the global interval; a job's scrape_timeout longer
    than the interval is shortened to it, as Prometheus requires.
    """
    config = copy.deepcopy(config)
    jobs = [
        job
        for job in config.get("scrape_configs", [])
        if any(SERVICE in sd.get("names", []) for sd in job.get("dns_sd_configs", []))
    ]
    if len(jobs) != 1:
        raise StackError(f"expected one scrape job discovering {SERVICE!r} by DNS, found {len(jobs)}")
    job = jobs[0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": list(targets)}]
    if scrape_interval is not None:
        config.setdefault("global", {})
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
        for each in config["scrape_configs"]:
            each.pop("scrape_interval", None)
            if "scrape_timeout" in each and _seconds(each["scrape_timeout"]) > _seconds(scrape_interval):
                each["scrape_timeout"] = scrape_interval
    return config


# ---- processes ------------------------------------------------------------------------------------


def find_binary(name: str, fallback: str) -> str:
    """A system binary on PATH or at its Debian path, else StackError saying how to install it."""
    path = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if path is None:
        raise StackError(f"{name} not found; {INSTALL_HINT.format(name=name)}")
    return path


def nginx_version(binary: str) -> tuple[int, ...]:
    text = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", text)
    if found is None:
        raise StackError(f"cannot read the nginx version from {text!r}")
    return tuple(int(x) for x in found.groups())


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def _process(name: str, cmd: Sequence[str], log: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with output to ``log``; on exit SIGTERM it (the servers drain), then SIGKILL after 20 s."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait(
    what: str, check: Any, procs: dict[str, tuple[subprocess.Popen[bytes], Path]], timeout: float
) -> Any:
    """Poll ``check()`` until it returns a value other than None; fail fast when a process has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with {proc.returncode} while waiting for {what}:\n{_tail(log)}"
                )
        value = check()
        if value is not None:
            return value
        time.sleep(0.1)
    logs = "\n".join(f"--- {name}:\n{_tail(log, 1500)}" for name, (_, log) in procs.items())
    raise StackError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _read_port_file(path: Path) -> dict[str, int] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or half written
        return None


def health_status(address: str, timeout: float = 2.0) -> int | None:
    """The overall grpc.health.v1 status at ``address`` (1 = SERVING), or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return reply.status


def _serving(address: str) -> bool | None:
    return True if health_status(address) == health_pb2.HealthCheckResponse.SERVING else None


def _prometheus_ready(log: Path) -> str | None:
    """Prometheus logs the address it really bound (port 0 → the kernel's choice); then /-/ready says 200."""
    found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', _tail(log, 100_000))
    if found is None:
        return None
    url = f"http://{found[1]}"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
            return url if reply.status == 200 else None
    except OSError:
        return None


@contextmanager
def run_stack(
    workdir: Path,
    *,
    replicas: int = 2,
    lb_port: int = 0,
    prometheus_port: int = 0,
    model_repository: Path = BUNDLED_REPOSITORY,
    scrape_interval: str | None = "1s",
    timeout: float = 60.0,
) -> Iterator[Stack]:
    """Start replicas, nginx and Prometheus on 127.0.0.1; yield their addresses; stop them all on exit.

    Ports 0 mean ephemeral. nginx cannot listen on port 0, so this process binds the socket and nginx
    inherits it (nginx's `NGINX` environment variable, the mechanism of its binary upgrade).
    """
    nginx = find_binary("nginx", "/usr/sbin/nginx")
    prometheus = find_binary("prometheus", "/usr/bin/prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    with ExitStack() as stack:
        # -- convserve replicas, started together, each reporting its ephemeral ports in a file
        port_files = []
        for i in range(replicas):
            port_file, log = workdir / f"convserve-{i}.ports.json", workdir / f"convserve-{i}.log"
            port_files.append((port_file, log))
            cmd = loopback_command(port_file, "--model-repository", str(model_repository))
            procs[f"convserve-{i}"] = (stack.enter_context(_process(f"convserve-{i}", cmd, log)), log)
        started = []
        for port_file, log in port_files:
            ports = _wait(f"{port_file.name}", lambda p=port_file: _read_port_file(p), procs, timeout)
            started.append(Replica(int(ports["grpc_port"]), int(ports["metrics_port"]), log))
        for replica in started:
            _wait(
                f"{replica.grpc_address} SERVING", lambda r=replica: _serving(r.grpc_address), procs, timeout
            )

        # -- nginx on a socket bound here and inherited
        ngx_dir = workdir / "nginx"
        ngx_dir.mkdir(exist_ok=True)
        # nginx's workers run as `nobody` when started as root: they must be able to reach their temp dirs.
        for path in (workdir, ngx_dir):
            path.chmod(0o755)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", lb_port))
        except OSError as exc:
            listener.close()
            raise StackError(f"cannot bind the load balancer to 127.0.0.1:{lb_port}: {exc}") from None
        listener.listen(511)
        listener.set_inheritable(True)
        lb_address = f"127.0.0.1:{listener.getsockname()[1]}"
        conf = ngx_dir / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                NGINX_CONF.read_text(),
                listen_port=listener.getsockname()[1],
                backends=[r.grpc_address for r in started],
                workdir=ngx_dir,
                legacy_http2=nginx_version(nginx) < NGINX_HTTP2_DIRECTIVE,
            )
        )
        ngx_log = workdir / "nginx.log"
        with listener:
            cmd = [nginx, "-p", str(ngx_dir), "-c", str(conf), "-e", str(ngx_log), "-g", "daemon off;"]
            proc = stack.enter_context(
                _process(
                    "nginx",
                    cmd,
                    workdir / "nginx.out",
                    pass_fds=(listener.fileno(),),
                    env={**os.environ, "NGINX": f"{listener.fileno()};"},
                )
            )
        procs["nginx"] = (proc, ngx_log)
        _wait(f"SERVING through nginx at {lb_address}", lambda: _serving(lb_address), procs, timeout)

        # -- Prometheus scraping every replica
        prom_dir = workdir / "prometheus"
        prom_dir.mkdir(exist_ok=True)
        rendered = render_prometheus_config(
            yaml.safe_load(PROMETHEUS_CONF.read_text()),
            targets=[r.metrics_address for r in started],
            scrape_interval=scrape_interval,
        )
        prom_conf = prom_dir / "prometheus.yml"
        prom_conf.write_text(yaml.safe_dump(rendered, sort_keys=False))
        prom_log = workdir / "prometheus.log"
        cmd = [
            prometheus,
            f"--config.file={prom_conf}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--storage.tsdb.retention.time=1d",
        ]
        procs["prometheus"] = (
            stack.enter_context(_process("prometheus", cmd, prom_log, cwd=prom_dir)),
            prom_log,
        )
        prometheus_url = _wait("Prometheus ready", lambda: _prometheus_ready(prom_log), procs, timeout)

        yield Stack(
            tuple(started),
            lb_address,
            prometheus_url,
            workdir,
            tuple((name, proc) for name, (proc, _) in procs.items()),
        )


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT (Ctrl-C) and SIGTERM both stop the stack."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--replicas", type=int, default=2, help="convserve processes behind nginx (default 2)"
    )
    parser.add_argument("--lb-port", type=int, default=8001, help="nginx gRPC port on 127.0.0.1 (0 = any)")
    parser.add_argument(
        "--prometheus-port", type=int, default=9090, help="Prometheus port on 127.0.0.1 (0 = any)"
    )
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_REPOSITORY)
    parser.add_argument(
        "--scrape-interval",
        default=None,
        help="override deploy/prometheus/prometheus.yml's scrape interval (e.g. 1s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="logs, rendered configs, Prometheus data (default: a temporary folder, removed at exit)",
    )
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    if not any(args.model_repository.glob("*/config.json")):
        parser.error(f"no model in {args.model_repository}: `make train` exports the digits model there, "
                     "or pass --model-repository")

    # Installed explicitly: a shell starts background jobs with SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as cleanup:
        workdir = args.workdir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="convserve-stack-"))
        )
        try:
            with run_stack(
                workdir,
                replicas=args.replicas,
                lb_port=args.lb_port,
                prometheus_port=args.prometheus_port,
                model_repository=args.model_repository,
                scrape_interval=args.scrape_interval,
            ) as stack:
                print(f"convserve stack up ({len(stack.replicas)} replicas); Ctrl-C stops it")
                print(f"  gRPC (nginx load balancer)  {stack.lb_address}")
                for i, r in enumerate(stack.replicas):
                    print(f"  replica {i}: gRPC {r.grpc_address}, metrics http://{r.metrics_address}/metrics")
                print(f"  Prometheus                  {stack.prometheus_url}")
                print(f"  logs and rendered configs   {stack.workdir}", flush=True)
                while not stack.exited():
                    time.sleep(1)
                print(f"error: {', '.join(stack.exited())} stopped; logs in {stack.workdir}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            print("stopping", flush=True)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
