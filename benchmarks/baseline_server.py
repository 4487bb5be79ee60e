"""The baseline: a plain grpc.aio server making one ONNX Runtime call per request, no batching.

It speaks the same ``convserve.v1.Classifier/Classify`` (raw float32 tensors only) so the same load
generator drives both servers side by side. It is what one writes first: decode the tensor, hand the
ONNX Runtime call to the default thread pool (never on the event loop), softmax, top-k, reply.

``python -m benchmarks.baseline_server --model PATH/model.onnx --port-file FILE``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc


class PlainClassifier(pb_grpc.ClassifierServicer):
    """Classify with one ``session.run`` per request, in the loop's default executor."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.shape = tuple(session.get_inputs()[0].shape[1:])

    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        arrays = []
        for image in request.images:
            t = image.tensor
            if t.dtype != pb.DATA_TYPE_FLOAT32 or tuple(t.shape[-3:]) != self.shape:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"expected a float32 tensor [N, {self.shape}], got {list(t.shape)}")
            arrays.append(np.frombuffer(t.data, dtype=np.float32).reshape(-1, *self.shape))
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        loop = asyncio.get_running_loop()
        logits = (await loop.run_in_executor(None, self.session.run, None, {self.input: x}))[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        k = max(1, request.top_k)
        top = np.argsort(-probs, axis=1)[:, :k]
        results = [pb.Classification(predictions=[pb.Prediction(index=int(i), label=str(int(i)),
                                                                probability=float(row[i])) for i in idx])
                   for row, idx in zip(probs, top, strict=True)]
        return pb.ClassifyResponse(model=request.model, version=1, results=results)


async def serve(model: Path, port_file: Path, host: str, port: int) -> None:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_ClassifierServicer_to_server(PlainClassifier(session), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    port_file.write_text(json.dumps({"grpc_port": bound}))
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="model.onnx to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, required=True)
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(a.model, a.port_file, a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
