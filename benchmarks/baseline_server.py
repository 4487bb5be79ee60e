"""The baselines convserve is measured against, both speaking convserve.v1 Classify and v2 ModelInfer:

- ``--mode plain``: a plain grpc.aio server doing one ``session.run`` per request in the loop's default
  executor, and nothing else: no validation beyond reshaping, no batching. It is what one writes first,
  and what convserve must beat.
- ``--mode inline``: the same running the model inline on the event loop, no executor hop.
- ``--mode inline --processes N``: N processes of the inline server sharing the port (SO_REUSEPORT), the
  kernel spreading connections between them: the simplest way a Python server uses more than one core.
- ``--mode sync``: grpc's synchronous thread-pool server, each call's thread running the model inline:
  no event loop and no executor hop.
- ``--mode empty``: an empty servicer answering every request with a canned reply of the right size; no
  model at all. It is the ceiling grpc.aio itself puts on a Python server on this machine.

Every model-running mode builds its ONNX Runtime session with convserve's own options
(``convserve.server.runtime.session``): the executor modes with a served model's main-session options (threads
sleeping between runs), the inline ones with its inline session's (one thread, no spinning). A baseline
configured worse than the thing it measures would flatter it.

Each server counts its successful replies and serves the count as ``baseline_requests_total{code="OK"}``
on ``/metrics`` (the port file's ``metrics_port``), one series per serving process: a load generator that
cannot read gRPC status (h2load) checks its successes against their sum.

``python -m benchmarks.baseline_server --mode plain --model PATH/model.onnx --port-file FILE``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc
from convserve.protos.inference import grpc_service_pb2 as vpb
from convserve.protos.inference import grpc_service_pb2_grpc as vpb_grpc
from convserve.server.runtime.session import SessionOptions, inline_options, ort_options
from convserve.server.settings import Settings

_MAX = 256 * 1024 * 1024
Ctx = grpc.aio.ServicerContext
MODES = ("plain", "inline", "sync", "empty")
COUNTER = "baseline_requests_total"


class Successes:
    """Successful replies, one slot per process in shared memory (a process writes only its own slot,
    so no lock); /metrics shows each process's count."""

    def __init__(self, processes: int) -> None:
        self.slots = multiprocessing.RawArray("q", processes)
        self.slot = 0

    def add(self) -> None:
        self.slots[self.slot] += 1


def session_options(mode: str) -> SessionOptions:
    """The options convserve gives a served model at default settings: its main session's for the
    executor mode, its inline session's where the model runs on the calling thread."""
    options = SessionOptions.of(Settings())
    return options if mode == "plain" else inline_options(options)


def load_session(model: Path, mode: str):
    import onnxruntime as ort

    opts = ort_options(session_options(mode))
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def _classify_reply(request: pb.ClassifyRequest, probs: np.ndarray) -> pb.ClassifyResponse:
    k = max(1, request.top_k)
    top = np.argsort(-probs, axis=1)[:, :k]
    return pb.ClassifyResponse(
        model=request.model, version=1,
        results=[pb.Classification(predictions=[pb.Prediction(index=int(i), label=str(int(i)),
                                                              probability=float(row[i])) for i in idx])
                 for row, idx in zip(probs, top, strict=True)])  # fmt: skip


class PlainClassifier(pb_grpc.ClassifierServicer):
    """Classify with one ``session.run`` per request, in the loop's default executor."""

    def __init__(self, session, ok: Successes) -> None:
        self.session = session
        self.ok = ok
        self.input = session.get_inputs()[0].name
        self.shape = tuple(session.get_inputs()[0].shape[1:])

    def batch(self, request: pb.ClassifyRequest) -> dict[str, np.ndarray]:
        t = request.images[0].tensor
        return {self.input: np.frombuffer(t.data, dtype=np.float32).reshape(-1, *self.shape)}

    def reply(self, request: pb.ClassifyRequest, logits: np.ndarray) -> pb.ClassifyResponse:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        reply = _classify_reply(request, e / e.sum(axis=1, keepdims=True))
        self.ok.add()
        return reply

    async def Classify(self, request: pb.ClassifyRequest, ctx: Ctx) -> pb.ClassifyResponse:
        loop = asyncio.get_running_loop()
        logits = (await loop.run_in_executor(None, self.session.run, None, self.batch(request)))[0]
        return self.reply(request, logits)


class PlainInference(vpb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer with one ``session.run`` per request; the raw FP32 output goes back as it is."""

    def __init__(self, session, ok: Successes) -> None:
        self.session = session
        self.ok = ok
        self.input = session.get_inputs()[0].name
        self.shape = tuple(session.get_inputs()[0].shape[1:])
        self.output = session.get_outputs()[0].name

    def batch(self, request: vpb.ModelInferRequest) -> dict[str, np.ndarray]:
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        return {self.input: x.reshape(-1, *self.shape)}

    def reply(self, request: vpb.ModelInferRequest, out: np.ndarray) -> vpb.ModelInferResponse:
        reply = vpb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        reply.outputs.add(name=self.output, datatype="FP32", shape=list(out.shape))
        reply.raw_output_contents.append(out.tobytes())
        self.ok.add()
        return reply

    async def ModelInfer(self, request: vpb.ModelInferRequest, ctx: Ctx) -> vpb.ModelInferResponse:
        loop = asyncio.get_running_loop()
        out = (await loop.run_in_executor(None, self.session.run, None, self.batch(request)))[0]
        return self.reply(request, out)


class InlineClassifier(PlainClassifier):
    """Classify with the model run on the event loop itself."""

    async def Classify(self, request: pb.ClassifyRequest, ctx: Ctx) -> pb.ClassifyResponse:
        return self.reply(request, self.session.run(None, self.batch(request))[0])


class InlineInference(PlainInference):
    """ModelInfer with the model run on the event loop itself."""

    async def ModelInfer(self, request: vpb.ModelInferRequest, ctx: Ctx) -> vpb.ModelInferResponse:
        return self.reply(request, self.session.run(None, self.batch(request))[0])


class SyncClassifier(PlainClassifier):
    """Classify on grpc's synchronous server: the pool thread that took the call runs the model itself."""

    def Classify(self, request: pb.ClassifyRequest, ctx: grpc.ServicerContext) -> pb.ClassifyResponse:  # type: ignore[override]
        return self.reply(request, self.session.run(None, self.batch(request))[0])


class SyncInference(PlainInference):
    """ModelInfer on grpc's synchronous server, the model run on the calling pool thread."""

    def ModelInfer(self, request: vpb.ModelInferRequest, ctx: grpc.ServicerContext) -> vpb.ModelInferResponse:  # type: ignore[override]
        return self.reply(request, self.session.run(None, self.batch(request))[0])


class EmptyClassifier(pb_grpc.ClassifierServicer):
    """A canned one-prediction reply per image; no model."""

    def __init__(self, ok: Successes) -> None:
        self.ok = ok

    async def Classify(self, request: pb.ClassifyRequest, ctx: Ctx) -> pb.ClassifyResponse:
        n = max(1, request.images[0].tensor.shape[0]) if request.images else 1
        self.ok.add()
        return pb.ClassifyResponse(
            model=request.model, version=1,
            results=[pb.Classification(predictions=[pb.Prediction(index=0, label="0", probability=1.0)])] * n,
        )  # fmt: skip


class EmptyInference(vpb_grpc.GRPCInferenceServiceServicer):
    """A canned zero output of the request's row count (10 classes); no model."""

    def __init__(self, ok: Successes) -> None:
        self.ok = ok

    async def ModelInfer(self, request: vpb.ModelInferRequest, ctx: Ctx) -> vpb.ModelInferResponse:
        n = int(request.inputs[0].shape[0]) if request.inputs else 1
        reply = vpb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        reply.outputs.add(name="logits", datatype="FP32", shape=[n, 10])
        reply.raw_output_contents.append(bytes(40 * n))
        self.ok.add()
        return reply


def serve_metrics(host: str, ok: Successes) -> int:
    """``/metrics`` with the success count, from a daemon thread that runs only when scraped; the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lines = [f"# TYPE {COUNTER} counter"]
            lines += [f'{COUNTER}{{code="OK",process="{i}"}} {n}' for i, n in enumerate(ok.slots)]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not news
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd.server_address[1]


def _grpc_options(reuse_port: bool) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", _MAX), ("grpc.max_send_message_length", _MAX),
            ("grpc.so_reuseport", int(reuse_port))]  # fmt: skip


def serve_sync(model: Path, host: str, port: int, ok: Successes, on_bound: Callable[[int], object],
               threads: int = 8) -> None:
    """grpc's thread-pool server, each call's thread running the model inline (no executor hop, no loop)."""
    session = load_session(model, "sync")
    server = grpc.server(futures.ThreadPoolExecutor(threads), options=_grpc_options(False))
    pb_grpc.add_ClassifierServicer_to_server(SyncClassifier(session, ok), server)
    vpb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncInference(session, ok), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    on_bound(bound)
    server.wait_for_termination()


async def serve(mode: str, model: Path | None, host: str, port: int, ok: Successes, reuse_port: bool,
                on_bound: Callable[[int], object]) -> None:
    """Serve ``mode`` on grpc.aio until terminated, telling ``on_bound`` the port it bound."""
    server = grpc.aio.server(options=_grpc_options(reuse_port))
    if mode == "empty":
        pb_grpc.add_ClassifierServicer_to_server(EmptyClassifier(ok), server)
        vpb_grpc.add_GRPCInferenceServiceServicer_to_server(EmptyInference(ok), server)
    else:
        session = load_session(model, mode)
        classifier, inference = (PlainClassifier, PlainInference) if mode == "plain" else (
            InlineClassifier, InlineInference)
        pb_grpc.add_ClassifierServicer_to_server(classifier(session, ok), server)
        vpb_grpc.add_GRPCInferenceServiceServicer_to_server(inference(session, ok), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    on_bound(bound)
    await server.wait_for_termination()


def _worker(mode: str, model: Path | None, host: str, port: int, ok: Successes, slot: int,
            bound_to: multiprocessing.connection.Connection) -> None:
    """One of several processes sharing the port."""
    ok.slot = slot
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(serve(mode, model, host, port, ok, True, bound_to.send))


def serve_processes(mode: str, model: Path | None, host: str, port: int, ok: Successes,
                    processes: int) -> tuple[list[multiprocessing.Process], int]:
    """Start ``processes`` servers on one port: the first binds (an ephemeral port for 0), the others join
    it with SO_REUSEPORT. Spawned, not forked: a forked grpc process is unsafe."""
    ctx = multiprocessing.get_context("spawn")
    children: list[multiprocessing.Process] = []
    for slot in range(processes):
        parent_end, child_end = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_worker, args=(mode, model, host, port, ok, slot, child_end), daemon=True)
        child.start()
        children.append(child)
        if not parent_end.poll(120):
            raise TimeoutError(f"baseline process {slot} did not bind within 120 s")
        port = parent_end.recv()
    return children, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="plain")
    p.add_argument("--model", type=Path, help="model.onnx to serve (every mode but empty)")
    p.add_argument("--processes", type=int, default=1,
                   help="serving processes sharing the port with SO_REUSEPORT (grpc.aio modes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, required=True)
    a = p.parse_args(argv)
    if a.mode != "empty" and a.model is None:
        p.error(f"--mode {a.mode} needs --model")
    if a.processes < 1 or (a.processes > 1 and a.mode == "sync"):
        p.error("--processes must be >= 1, and 1 with --mode sync")
    ok = Successes(a.processes)

    def report(port: int) -> None:
        metrics_port = serve_metrics(a.host, ok)
        a.port_file.write_text(json.dumps({"grpc_port": port, "metrics_port": metrics_port}))

    with contextlib.suppress(KeyboardInterrupt):
        if a.mode == "sync":
            serve_sync(a.model, a.host, a.port, ok, report)
        elif a.processes == 1:
            asyncio.run(serve(a.mode, a.model, a.host, a.port, ok, False, report))
        else:
            return supervise(a.mode, a.model, a.host, a.port, ok, a.processes, report)
    return 0


def supervise(mode: str, model: Path | None, host: str, port: int, ok: Successes, processes: int,
              report: Callable[[int], None]) -> int:
    """Run ``processes`` servers until SIGTERM (then stop them, 0) or until one dies (1)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children, bound = serve_processes(mode, model, host, port, ok, processes)
    try:
        report(bound)
        while not stop.wait(0.5):
            if not all(c.is_alive() for c in children):
                return 1
        return 0
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.join(10)


if __name__ == "__main__":
    sys.exit(main())
