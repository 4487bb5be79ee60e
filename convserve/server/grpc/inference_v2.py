"""KServe v2 / Open Inference Protocol servicer (inference.GRPCInferenceService): proto ↔ domain objects.

Tensors: one FP32 input ``[N, C, H, W]`` (typed ``contents.fp32_contents`` or ``raw_input_contents``), or
a BYTES input ``[N]`` / ``[N, 1]`` of encoded images. Outputs come back in ``raw_output_contents``: the
model's raw FP32 output ``[N, K]``, or with the classification extension (an output parameter
``classification = k``, as tritonclient's ``InferRequestedOutput(name, class_count=k)`` sends, or the same
request-level parameter) a BYTES ``[N, k]`` tensor of ``"probability:index:label"`` strings, best first.
Unlike Triton, which ranks raw output values, the score is the softmax probability for logits models,
the same number the convserve.v1 API reports.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import grpc
import numpy as np

from convserve.common.model_config import ModelConfig
from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

from ..calls import current_call
from ..core.control import ControlPlane
from ..core.inference import (
    Backpressure,
    EncodedImage,
    InferenceCore,
    InferenceRequest,
    InferenceResult,
    Input,
    RequestedOutput,
    TensorInput,
)
from ..core.v2_tensors import classification_strings, deserialize_bytes, serialize_bytes
from ..errors import InvalidInputError, status_message
from ..health import Health
from ..observability.metrics import Metrics
from ..observability.request_ids import echo_request_id, error_reply_id
from ..repository.model_repository import ModelRepository, parse_version
from ..settings import Settings
from .common import deadline_of, stream_replies
from .triton_extensions import TritonExtensions

API = "v2"
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Answered while draining so probes can watch a replica go away.
PROBES = ("ServerLive", "ServerReady", "ModelReady")
CLASSIFICATION = "classification"


class InferenceService(TritonExtensions, pb_grpc.GRPCInferenceServiceServicer):
    """The v2 protocol over the same repository and models as the convserve.v1 API."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        core: InferenceCore | None = None,
        control: ControlPlane | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.core = core or InferenceCore(repository, settings, metrics)
        self.control = control or ControlPlane(repository, settings, health)

    # ---- server and model status: the control plane's answers ------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.control.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        why = self.control.not_ready_reason(request.name, request.version)
        return pb.ModelReadyResponse(ready=why is None)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self.control.server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self.control.model_metadata(request.name, request.version)

    # ---- inference -------------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def handle(request: pb.ModelInferRequest, valve: Backpressure) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline, valve))

        def reply_error(
            request: pb.ModelInferRequest, code: grpc.StatusCode, message: str
        ) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=status_message(f"{code.name}: {message}"),
                infer_response=pb.ModelInferResponse(
                    model_name=status_message(getattr(request, "model_name", "")),
                    id=error_reply_id(getattr(request, "id", "")),
                ),
            )

        async with contextlib.aclosing(
            stream_replies(request_iterator, self.health, handle, reply_error)
        ) as replies:
            async for reply in replies:
                yield reply

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, valve: Backpressure | None = None
    ) -> pb.ModelInferResponse:
        call = current_call()
        call.model = request.model_name
        request_id = echo_request_id(request.id, "id")
        return await self.core.infer(
            InferenceRequest(
                model=request.model_name,
                version=parse_version(request.model_version),
                inputs=lambda cfg: _inputs(request, cfg),
                outputs=_requested_outputs(request),
                deadline=deadline,
                request_id=call.request_id,
                api=API,
                model_field="model_name",
                trace=call,
                backpressure=valve,
            ),
            lambda result: _reply(result, request_id),
        )


def _reply(result: InferenceResult, request_id: str) -> pb.ModelInferResponse:
    """The domain result as a ModelInferResponse: raw FP32, or BYTES "probability:index:label" strings."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request_id
    )
    labels = result.labels
    for out in result.outputs:
        if out.raw is None:
            indices, scores = out.indices, out.scores
            strings = [s.encode() for s in classification_strings(indices, scores, labels)]  # type: ignore[arg-type]
            response.outputs.add(name=out.name, datatype="BYTES", shape=list(indices.shape))  # type: ignore[union-attr]
            response.raw_output_contents.append(serialize_bytes(strings))
        else:
            response.outputs.add(name=out.name, datatype="FP32", shape=list(out.raw.shape))
            response.raw_output_contents.append(np.ascontiguousarray(out.raw, dtype="<f4").tobytes())
    return response


def _inputs(request: pb.ModelInferRequest, cfg: ModelConfig) -> list[Input]:
    """The request's single input tensor as domain inputs: one float tensor, or one per encoded image."""
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"inputs: expected exactly one input tensor named {cfg.input.name!r}, got {len(request.inputs)}"
        )
    inp = request.inputs[0]
    where = f"inputs[{inp.name!r}]"
    if inp.name != cfg.input.name:
        raise InvalidInputError(f"inputs[0].name: expected {cfg.input.name!r}, got {inp.name!r}")
    raw = request.raw_input_contents
    if raw and len(raw) != 1:
        raise InvalidInputError(f"raw_input_contents: expected one entry (one per input), got {len(raw)}")
    if raw and inp.HasField("contents") and inp.contents.ListFields():
        # Triton and KServe refuse this too: which of the two tensors was meant is unknowable.
        raise InvalidInputError(
            f"{where}.contents: expected the tensor in either contents or raw_input_contents, got both"
        )
    shape = tuple(inp.shape)
    if inp.datatype == "FP32":
        if len(shape) != 4:
            raise InvalidInputError(
                f"{where}.shape: expected [N, {', '.join(map(str, cfg.input.shape))}], got {list(shape)}"
            )
        # Typed contents cost a copy; raw_input_contents is wrapped as it is.
        data = raw[0] if raw else np.asarray(inp.contents.fp32_contents, dtype="<f4").tobytes()
        return [TensorInput(data, "float32", shape, where)]
    if inp.datatype == "BYTES":
        blobs = deserialize_bytes(raw[0], where) if raw else list(inp.contents.bytes_contents)
        if not blobs:
            raise InvalidInputError(f"{where}: expected at least one encoded image, got none")
        if shape not in ((len(blobs),), (len(blobs), 1)):
            raise InvalidInputError(
                f"{where}.shape: {len(blobs)} encoded images need shape [{len(blobs)}] or "
                f"[{len(blobs)}, 1], got {list(shape)}"
            )
        return [EncodedImage(b, f"{where}[{i}]") for i, b in enumerate(blobs)]
    raise InvalidInputError(
        f"{where}.datatype: expected FP32 (a [N, C, H, W] tensor) or BYTES "
        f"(encoded images), got {inp.datatype!r}"
    )


# A class count written as a string: ASCII digits only (str.isdigit() also accepts "²", which int()
# refuses) and at most 18 of them (int() refuses more than 4300 digits; no model has 10**18 classes).
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def _param_int(param: pb.InferParameter, where: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(param, kind))
    if kind == "string_param":
        text = param.string_param.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text)
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidInputError(
            f"{where}: expected an integer class count (ASCII digits, at most 18), got string {shown!r}"
        )
    raise InvalidInputError(f"{where}: expected an integer class count, got {kind or 'an empty parameter'}")


# No outputs named and no classification parameter: the raw output (the common case, one shared object).
_RAW = (RequestedOutput(),)


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[RequestedOutput, ...]:
    """Each requested output (classification k, or None for the raw tensor); the model's output when none
    is named. Names and duplicates are checked by the core against the model."""
    default_k = 0
    if CLASSIFICATION in request.parameters:
        default_k = _param_int(request.parameters[CLASSIFICATION], "parameters['classification']")
    if not request.outputs:
        return _RAW if not default_k else (RequestedOutput("", default_k, "parameters['classification']"),)
    wanted = []
    for i, out in enumerate(request.outputs):
        k, where = default_k, "parameters['classification']"
        if CLASSIFICATION in out.parameters:
            where = f"outputs[{i}].parameters['classification']"
            k = _param_int(out.parameters[CLASSIFICATION], where)
        wanted.append(RequestedOutput(out.name, k or None, where))
    return tuple(wanted)

