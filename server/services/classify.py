"""convserve.v1 Classifier servicer: proto ↔ domain objects, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc

from ..errors import InvalidInputError, ModelNotFoundError, PermissionDeniedError
from ..health import Health
from ..interceptors import current_call
from ..logging_setup import echo_request_id
from ..metrics import Metrics
from ..postprocess import probabilities, resolve_top_k, top_k
from ..preprocess import stack, tensor_to_array
from ..repository import ModelEntry, ModelRepository
from ..served_model import ModelState, ServedModel
from ..settings import Settings
from .common import check_count, deadline_of, decode_all, image_limits, lookup, observed, stream_replies

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
        self, repository: ModelRepository, settings: Settings, metrics: Metrics, health: Health
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.limits = image_limits(settings)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)
        call = current_call()

        async def handle(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
            response = await self._classify(request, deadline)
            return pb.ClassifyStreamResponse(response=response, request_id=response.request_id)

        def reply_error(
            request: pb.ClassifyRequest, code: grpc.StatusCode, message: str
        ) -> pb.ClassifyStreamResponse:
            return pb.ClassifyStreamResponse(
                error_code=code.value[0],
                error_message=message,
                request_id=echo_request_id(getattr(request, "request_id", ""), call.request_id)
                or call.request_id,
            )

        async for reply in stream_replies(request_iterator, self.health, handle, reply_error):
            yield reply

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        call = current_call()
        call.model = request.model
        served = lookup(self.repository, self.metrics, request.model, request.version, API)
        model, version, cfg = served.name, served.version_label, served.cfg
        call.version = version
        with observed(self.metrics, model, version, API):
            k = resolve_top_k(request.top_k, cfg.num_classes, self.settings.top_k)
            with self.metrics.stage("preprocess", model, version):
                batch = await self._batch(request, served)
            call.images = n = len(batch)
            outputs = await served.infer(batch, deadline)
            with self.metrics.stage("postprocess", model, version):
                indices, scores = top_k(probabilities(outputs, cfg.output.kind), k)
                labels = cfg.labels
                results = [
                    pb.Classification(
                        predictions=[
                            pb.Prediction(index=i, label=labels[i], probability=p)
                            for i, p in zip(row_i, row_p, strict=False)
                        ]
                    )
                    for row_i, row_p in zip(indices.tolist(), scores.tolist(), strict=False)
                ]
                response = pb.ClassifyResponse(
                    model=model,
                    version=served.version,
                    results=results,
                    request_id=echo_request_id(request.request_id, call.request_id) or call.request_id,
                )
            self.metrics.images(model, version, API, n)
        return response

    async def _batch(self, request: pb.ClassifyRequest, served: ServedModel) -> np.ndarray:
        """The request's images as one (N, C, H, W) float32 batch, in request order."""
        images = request.images
        limit = self.settings.max_images_per_request
        if not images:
            raise InvalidInputError(
                "images: expected at least one image (encoded bytes or a tensor), got none"
            )
        check_count(len(images), limit)
        parts: list[np.ndarray | None] = []
        blobs: list[tuple[str, bytes]] = []
        rows = 0
        for i, image in enumerate(images):
            kind = image.WhichOneof("content")
            where = f"images[{i}]"
            if kind == "encoded":
                blobs.append((where, image.encoded))
                parts.append(None)
                rows += 1
            elif kind == "tensor":
                t = image.tensor
                dtype = _DTYPE_NAMES.get(t.dtype)
                if dtype is None:
                    raise InvalidInputError(
                        f"{where}.tensor.dtype: expected one of "
                        f"{sorted(pb.DataType.Name(d) for d in _DTYPE_NAMES)}, "
                        f"got {pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype}"
                    )
                arr = tensor_to_array(t.data, dtype, tuple(t.shape), served.cfg, f"{where}.tensor")
                rows += len(arr)
                check_count(rows, limit, "images (tensor rows included)")
                parts.append(arr)
            else:
                raise InvalidInputError(f"{where}: expected encoded bytes or a tensor, got an empty image")
        if blobs:
            decoded = iter(await decode_all(blobs, served, self.limits))
            parts = [next(decoded) if p is None else p for p in parts]
        return stack(parts)  # type: ignore[arg-type]

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
        b = served.batching if served is not None else {}
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
                enabled=bool(b.get("enabled")),
                max_batch_size=cfg.max_batch_size,
                max_queue_delay_us=int(b.get("max_queue_delay_us", 0)),
                max_queue_size=int(b.get("max_queue_size", 0)),
                preferred_batch_sizes=list(b.get("preferred_batch_sizes", ())),
                instances=int(b.get("instances", 0)),
            ),
            architecture=cfg.architecture,
        )

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        self._check_model_control()
        current_call().model = request.model
        entry = await self.repository.reload(request.model)
        return pb.LoadModelResponse(model=pb.ModelSummary(name=entry.name, versions=_versions(entry)))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        self._check_model_control()
        current_call().model = request.model
        entry = await self.repository.unload(request.model, request.version)
        return pb.UnloadModelResponse(model=pb.ModelSummary(name=entry.name, versions=_versions(entry)))

    def _check_model_control(self) -> None:
        if not self.settings.allow_model_control:
            raise PermissionDeniedError(
                "model control is off on this server; start it with --allow-model-control (which needs auth)"
            )


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
