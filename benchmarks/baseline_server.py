"""The baselines convserve is measured against, both speaking convserve.v1 Classify and v2 ModelInfer:

- ``--mode plain``: a plain grpc.aio server doing one ``session.run`` per request in the loop's default
  executor, and nothing else: no validation beyond reshaping, no metrics, no batching. It is what one
  writes first, and what convserve must beat.
- ``--mode sync``: grpc's synchronous thread-pool server, each call's thread running a one-thread ONNX
  Runtime session inline: no event loop and no executor hop (a design issue #12 cites).
- ``--mode empty``: an empty servicer answering every request with a canned reply of the right size; no
  model at all. It is the ceiling grpc.aio itself puts on a Python server on this machine.

``python -m benchmarks.baseline_server --mode plain --model PATH/model.onnx --port-file FILE``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc
from convserve.protos.inference import grpc_service_pb2 as vpb
from convserve.protos.inference import grpc_service_pb2_grpc as vpb_grpc

_MAX = 256 * 1024 * 1024
Ctx = grpc.aio.ServicerContext


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

    def __init__(self, session) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.shape = tuple(session.get_inputs()[0].shape[1:])

    def batch(self, request: pb.ClassifyRequest) -> dict[str, np.ndarray]:
        t = request.images[0].tensor
        return {self.input: np.frombuffer(t.data, dtype=np.float32).reshape(-1, *self.shape)}

    def reply(self, request: pb.ClassifyRequest, logits: np.ndarray) -> pb.ClassifyResponse:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return _classify_reply(request, e / e.sum(axis=1, keepdims=True))

    async def Classify(self, request: pb.ClassifyRequest, ctx: Ctx) -> pb.ClassifyResponse:
        loop = asyncio.get_running_loop()
        logits = (await loop.run_in_executor(None, self.session.run, None, self.batch(request)))[0]
        return self.reply(request, logits)


class PlainInference(vpb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer with one ``session.run`` per request; the raw FP32 output goes back as it is."""

    def __init__(self, session) -> None:
        self.session = session
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
        return reply

    async def ModelInfer(self, request: vpb.ModelInferRequest, ctx: Ctx) -> vpb.ModelInferResponse:
        loop = asyncio.get_running_loop()
        out = (await loop.run_in_executor(None, self.session.run, None, self.batch(request)))[0]
        return self.reply(request, out)


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

    async def Classify(self, request: pb.ClassifyRequest, ctx: Ctx) -> pb.ClassifyResponse:
        n = max(1, request.images[0].tensor.shape[0]) if request.images else 1
        return pb.ClassifyResponse(
            model=request.model, version=1,
            results=[pb.Classification(predictions=[pb.Prediction(index=0, label="0", probability=1.0)])] * n,
        )  # fmt: skip


class EmptyInference(vpb_grpc.GRPCInferenceServiceServicer):
    """A canned zero output of the request's row count (10 classes); no model."""

    async def ModelInfer(self, request: vpb.ModelInferRequest, ctx: Ctx) -> vpb.ModelInferResponse:
        n = int(request.inputs[0].shape[0]) if request.inputs else 1
        reply = vpb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        reply.outputs.add(name="logits", datatype="FP32", shape=[n, 10])
        reply.raw_output_contents.append(bytes(40 * n))
        return reply


def serve_sync(model: Path, port_file: Path, host: str, port: int, threads: int = 8) -> None:
    """The design issue #12 cites as the fastest at C=1-32: grpc's thread-pool server, each call's thread
    running a one-intra-op-thread session inline (no executor hop, no event loop)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    server = grpc.server(futures.ThreadPoolExecutor(threads),
                         options=[("grpc.max_receive_message_length", _MAX),
                                  ("grpc.max_send_message_length", _MAX)])  # fmt: skip
    pb_grpc.add_ClassifierServicer_to_server(SyncClassifier(session), server)
    vpb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncInference(session), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    port_file.write_text(json.dumps({"grpc_port": bound}))
    server.wait_for_termination()


async def serve(mode: str, model: Path | None, port_file: Path, host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", _MAX),
                                      ("grpc.max_send_message_length", _MAX)])  # fmt: skip
    if mode == "plain":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        pb_grpc.add_ClassifierServicer_to_server(PlainClassifier(session), server)
        vpb_grpc.add_GRPCInferenceServiceServicer_to_server(PlainInference(session), server)
    else:
        pb_grpc.add_ClassifierServicer_to_server(EmptyClassifier(), server)
        vpb_grpc.add_GRPCInferenceServiceServicer_to_server(EmptyInference(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    port_file.write_text(json.dumps({"grpc_port": bound}))
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("plain", "empty", "sync"), default="plain")
    p.add_argument("--model", type=Path, help="model.onnx to serve (plain and sync modes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, required=True)
    a = p.parse_args(argv)
    if a.mode in ("plain", "sync") and a.model is None:
        p.error(f"--mode {a.mode} needs --model")
    with contextlib.suppress(KeyboardInterrupt):
        if a.mode == "sync":
            serve_sync(a.model, a.port_file, a.host, a.port)
        else:
            asyncio.run(serve(a.mode, a.model, a.port_file, a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
