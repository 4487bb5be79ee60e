"""convserve.v1 Classifier servicer: proto ↔ domain objects, nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from convserve.common.model_config import ModelConfig
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc

from ..calls import current_call
from ..core.control import require_model_control
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
from ..errors import InvalidInputError, ModelNotFoundError
from ..health import Health
from ..observability.metrics import Metrics
from ..observability.request_ids import echo_request_id, error_reply_id
from ..repository.model_repository import ModelEntry, ModelRepository
from ..runtime.served_model import ModelState
from ..settings import Settings
from .common import deadline_of, stream_replies

API = "classify"
SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"]

_DTYPE_NAMES = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_UINT8: "uint8",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_FLOAT64: "float64",
}
_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
}


class ClassifierService(pb_grpc.ClassifierServicer):
    """Classify / ClassifyStream / ListModels / DescribeModel over the repository."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        core: InferenceCore | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.core = core or InferenceCore(repository, settings, metrics)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)
        call = current_call()

        async def handle(request: pb.ClassifyRequest, valve: Backpressure) -> pb.ClassifyStreamResponse:
            response = await self._classify(request, deadline, valve)
            return pb.ClassifyStreamResponse(response=response, request_id=response.request_id)

        def reply_error(
            request: pb.ClassifyRequest, code: grpc.StatusCode, message: str
        ) -> pb.ClassifyStreamResponse:
            return pb.ClassifyStreamResponse(
                error_code=code.value[0],
                error_message=message,
                request_id=error_reply_id(getattr(request, "request_id", "")) or call.request_id,
            )

        async with contextlib.aclosing(
            stream_replies(request_iterator, self.health, handle, reply_error)
        ) as replies:
            async for reply in replies:
                yield reply

    async def _classify(
        self, request: pb.ClassifyRequest, deadline: float | None, valve: Backpressure | None = None
    ) -> pb.ClassifyResponse:
        call = current_call()
        call.model = request.model
        request_id = echo_request_id(request.request_id, "request_id") or call.request_id

        def encode(result: InferenceResult) -> pb.ClassifyResponse:
            out, labels = result.outputs[0], result.labels
            return pb.ClassifyResponse(
                model=result.model,
                version=result.version,
                results=[
                    pb.Classification(
                        predictions=[
                            pb.Prediction(index=i, label=labels[i], probability=p)
                            for i, p in zip(row_i, row_p, strict=False)
                        ]
                    )
                    for row_i, row_p in zip(out.indices.tolist(), out.scores.tolist(), strict=False)  # type: ignore[union-attr]
                ],
                request_id=request_id,
            )

        return await self.core.infer(
            InferenceRequest(
                model=request.model,
                version=request.version,
                inputs=lambda cfg: _inputs(request, cfg),
                outputs=(RequestedOutput(classification=request.top_k),),
                deadline=deadline,
                request_id=call.request_id,
                api=API,
                trace=call,
                backpressure=valve,
            ),
            encode,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[pb.ModelSummary(name=e.name, versions=_versions(e)) for e in self.repository.entries()]
        )

    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelDescription:
        call = current_call()
        call.model = request.model
        entry = self.repository.entry(request.model)
        versions = _versions(entry)
        cfg = entry.config
        if cfg is None:
            return pb.ModelDescription(name=entry.name, versions=versions, ready=False)
        if request.version:
            served = entry.versions.get(request.version)
            if served is None:
                raise ModelNotFoundError(
                    f"model {entry.name!r} has no version {request.version}; "
                    f"served versions: {sorted(entry.versions)}"
                )
        else:
            served = entry.latest_ready() or (entry.versions[max(entry.versions)] if entry.versions else None)
        b = served.batching if served is not None else None
        return pb.ModelDescription(
            name=entry.name,
            version=served.version if served else 0,
            versions=versions,
            input=pb.InputSpec(
                name=cfg.input.name,
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=list(cfg.input.shape),
                layout=cfg.input.layout,
                color_mode=cfg.preprocessing.color_mode,
                mean=list(cfg.preprocessing.mean),
                std=list(cfg.preprocessing.std),
            ),
            labels=list(cfg.labels),
            execution_provider=served.provider if served else "",
            max_batch_size=cfg.max_batch_size,
            ready=bool(served and served.ready),
            batching=pb.BatchingSpec(
                enabled=b.enabled,
                max_batch_size=cfg.max_batch_size,
                max_queue_delay_us=b.max_queue_delay_us,
                max_queue_size=b.max_queue_size,
                preferred_batch_sizes=list(b.preferred_batch_sizes),
                instances=b.instances,
            )
            if b is not None
            else pb.BatchingSpec(max_batch_size=cfg.max_batch_size),
            architecture=cfg.architecture,
        )

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        require_model_control(self.settings)
        current_call().model = request.model
        entry = await self.repository.reload(request.model)
        return pb.LoadModelResponse(model=pb.ModelSummary(name=entry.name, versions=_versions(entry)))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        require_model_control(self.settings)
        current_call().model = request.model
        entry = await self.repository.unload(request.model, request.version)
        return pb.UnloadModelResponse(model=pb.ModelSummary(name=entry.name, versions=_versions(entry)))



def _inputs(request: pb.ClassifyRequest, cfg: ModelConfig) -> list[Input]:
    """The request's images as domain inputs, in request order."""
    inputs: list[Input] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("content")
        where = f"images[{i}]"
        if kind == "encoded":
            inputs.append(EncodedImage(image.encoded, where))
        elif kind == "tensor":
            t = image.tensor
            dtype = _DTYPE_NAMES.get(t.dtype)
            if dtype is None:
                raise InvalidInputError(
                    f"{where}.tensor.dtype: expected one of "
                    f"{sorted(pb.DataType.Name(d) for d in _DTYPE_NAMES)}, "
                    f"got {pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype}"
                )
            inputs.append(TensorInput(t.data, dtype, tuple(t.shape), f"{where}.tensor"))
        else:
            raise InvalidInputError(f"{where}: expected encoded bytes or a tensor, got an empty image")
    return inputs


def _versions(entry: ModelEntry) -> list[pb.VersionStatus]:
    if entry.config is None:
        return [
            pb.VersionStatus(version=v, state=pb.MODEL_STATE_FAILED, reason=entry.error)
            for v in entry.on_disk
        ]
    return [
        pb.VersionStatus(version=v, state=_STATES[sm.state], reason=sm.reason, execution_provider=sm.provider)
        for v, sm in sorted(entry.versions.items())
    ]
