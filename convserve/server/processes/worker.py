"""One serving process under the supervisor: the run folder it shares, its private control socket, its
siblings.

The supervisor creates a private run folder (mode 0700) holding ``plan.json`` (the workers' Settings and
count) and, per worker, ``worker-<i>.ctl`` (this module's control endpoint, HTTP over a Unix socket) and
``worker-<i>.grpc`` (the worker's gRPC services, the same as on the shared port, for reaching one
worker). Model-control requests a worker applies are appended to ``control.jsonl`` and passed to every
sibling's control socket before the reply goes out, so a load or unload through any worker reaches all;
a worker that starts later replays the log, so a replacement agrees with the others.

Run as ``python -m convserve.server.processes.worker RUN_FOLDER INDEX``; only the supervisor starts it.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..runtime import core_share
from ..settings import Settings

log = logging.getLogger("convserve.worker")

__all__ = [
    "WorkerPlan",
    "control_call",
    "control_path",
    "grpc_address",
    "read_plan",
    "write_plan",
]

_PLAN = "plan.json"
_CONTROL_LOG = "control.jsonl"
_CALL_TIMEOUT_S = 10.0
# A relayed model load runs a whole model load on the sibling: allow what a load may take.
_RELAY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker of one supervisor shares: its Settings, how many workers, whether to record
    metrics (the supervisor serves their sum; the workers' own /metrics port is off)."""

    settings: Settings
    workers: int
    metrics: bool
    # Every usable core, for expensive models' runs one at a time across the workers (runtime/core_share.py);
    # 0 = no core share (threads set by the user).
    share_cores: int = 0


def control_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.ctl"


def grpc_address(run_dir: Path, index: int) -> str:
    """The gRPC address that reaches worker ``index`` alone (a Unix socket in the private run folder)."""
    return f"unix:{run_dir / f'worker-{index}.grpc'}"


def write_plan(run_dir: Path, plan: WorkerPlan) -> None:
    data = {
        "settings": dataclasses.asdict(plan.settings),
        "workers": plan.workers,
        "metrics": plan.metrics,
        "share_cores": plan.share_cores,
    }
    path = run_dir / _PLAN
    path.write_text(json.dumps(data))
    path.chmod(0o600)  # it holds the auth tokens, when given as settings


def read_plan(run_dir: Path) -> WorkerPlan:
    data = json.loads((run_dir / _PLAN).read_text())
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()}
    return WorkerPlan(
        Settings(**values), int(data["workers"]), bool(data["metrics"]), int(data.get("share_cores", 0))
    )


async def control_call(
    path: Path,
    method: str,
    route: str,
    payload: dict[str, Any] | None = None,
    timeout: float = _CALL_TIMEOUT_S,
) -> Any:
    """One request to a worker's control socket; returns the JSON reply (text for /metrics). Raises
    OSError / aiohttp.ClientError when the worker is not there, RuntimeError when it refuses."""
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, f"http://worker{route}", json=payload) as reply,
    ):
        body = await reply.text()
        if reply.status != 200:
            raise RuntimeError(f"{route}: {reply.status} {body}")
        return json.loads(body) if reply.content_type == "application/json" else body


# ---- the worker's side ---------------------------------------------------------------------------


class Siblings:
    """Passes this worker's model-control requests to the other workers and logs them for later ones."""

    def __init__(self, run_dir: Path, index: int, workers: int) -> None:
        self.run_dir = run_dir
        self.index = index
        self.workers = workers

    async def announce(self, action: str, model: str, version: int) -> None:
        """Record the request, then apply it on every sibling that is up (a starting one replays it)."""
        line = json.dumps({"action": action, "model": model, "version": version}) + "\n"
        with open(self.run_dir / _CONTROL_LOG, "a", encoding="utf-8") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # whole lines, whichever workers append at once
            out.write(line)
        payload = {"action": action, "model": model, "version": version}
        others = [i for i in range(self.workers) if i != self.index]
        results = await asyncio.gather(
            *(
                control_call(control_path(self.run_dir, i), "POST", "/control", payload, _RELAY_TIMEOUT_S)
                for i in others
            ),
            return_exceptions=True,
        )
        for i, result in zip(others, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("model %s: %s not passed to worker %d: %s", model, action, i, result)

    def pending_unloads(self) -> list[tuple[str, int]]:
        """The unloads still in force (not followed by a load of the same model), oldest first."""
        try:
            lines = (self.run_dir / _CONTROL_LOG).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        held: dict[str, list[int]] = {}
        for line in lines:
            entry = json.loads(line)
            if entry["action"] == "load":
                held.pop(entry["model"], None)
            else:
                held.setdefault(entry["model"], []).append(int(entry["version"]))
        return [(model, v) for model, versions in held.items() for v in versions]


def _control_app(running: Any, index: int, started: asyncio.Event) -> web.Application:
    """The supervisor's and siblings' way into this worker: state, readiness gate, metrics, control."""
    from prometheus_client import generate_latest

    from ..errors import ConvserveServerError

    async def state(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "index": index,
                "pid": os.getpid(),
                "loaded": started.is_set(),  # models loaded and earlier unloads replayed
                "serving": running.health.serving,
            }
        )

    async def gate(request: web.Request) -> web.Response:
        await running.health.set_gate(bool((await request.json())["open"]))
        return web.json_response({"serving": running.health.serving})

    async def metrics(request: web.Request) -> web.Response:
        if not running.metrics.enabled:
            return web.Response(text="")
        text = await asyncio.to_thread(generate_latest, running.metrics.registry)  # off the event loop
        return web.Response(body=text, content_type="text/plain")

    async def control(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            if body["action"] == "load":
                await running.repository.reload(body["model"], propagate=False)
            else:
                await running.repository.unload(body["model"], int(body["version"]), propagate=False)
        except ConvserveServerError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"done": True})

    app = web.Application()
    app.router.add_get("/state", state)
    app.router.add_post("/gate", gate)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/control", control)
    return app


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the supervisor dies, so a killed supervisor leaves no workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM is the only way
        return


async def _serve_worker(plan: WorkerPlan, run_dir: Path, index: int) -> int:
    from .. import app as app_module
    from ..observability.metrics import process_registry

    settings = plan.settings
    if plan.share_cores:
        core_share.configure(core_share.CoreShare(plan.share_cores, run_dir / "cores.lock"))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await app_module.start_server(
            settings,
            process_registry() if plan.metrics else None,
            load_models=False,
            share_ports=True,
            private_address=grpc_address(run_dir, index),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("cannot start worker %d: %s", index, exc)
        return 1
    siblings = Siblings(run_dir, index, plan.workers)
    running.repository.on_control = siblings.announce
    await running.health.set_gate(False)  # the supervisor opens it once every worker is ready
    started = asyncio.Event()
    runner = web.AppRunner(_control_app(running, index, started), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(control_path(run_dir, index))).start()

    async def load() -> None:
        await running.load_models()
        for model, version in siblings.pending_unloads():
            try:
                await running.repository.unload(model, version, propagate=False)
            except Exception as exc:  # already gone here (a folder removed since): nothing to undo
                log.info("model %s: replayed unload skipped: %s", model, exc)
        app_module._freeze_startup_objects()
        started.set()

    loader = asyncio.create_task(load())
    await stop.wait()
    log.info("shutdown signal received")
    if not loader.done():
        loader.cancel()
    await running.stop(settings.drain_grace_seconds)
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process (started by the supervisor)."""
    from .. import app as app_module
    from ..observability import logs

    args = sys.argv[1:] if argv is None else argv
    run_dir, index = Path(args[0]), int(args[1])
    _die_with_parent()
    plan = read_plan(run_dir)
    s = plan.settings
    stream = logs.route_native_logs(s.log_level) if s.log_format == "json" else None
    logs.configure_logging(s.log_level, s.log_format, s.access_log, stream, worker=index)
    return app_module.run_event_loop(s, _serve_worker(plan, run_dir, index))


if __name__ == "__main__":
    sys.exit(main())
