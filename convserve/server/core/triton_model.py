"""Our model config, repository and statistics as Triton's messages: one conversion for every front end.

The gRPC extension handlers reply with these messages as they are; the REST front end turns the same
messages into Triton's JSON with ``google.protobuf.json_format.MessageToDict``. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from convserve.common.model_config import ModelConfig
from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import model_config_pb2 as mc

from ..observability.stats import Duration, StatsSnapshot
from ..repository.model_repository import ModelEntry
from ..runtime.served_model import ModelState
from ..settings import Settings

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

# Our dtype names → Triton's DataType; the v2 datatype strings ("FP32") are these without "TYPE_".
DATA_TYPES = {
    "float32": mc.TYPE_FP32,
    "uint8": mc.TYPE_UINT8,
    "float16": mc.TYPE_FP16,
    "float64": mc.TYPE_FP64,
}

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

# Triton's repository index states (its model lifecycle words).
_INDEX_STATES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADING: "UNLOADING",
}


def model_config(cfg: ModelConfig, settings: Settings, provider: str = "") -> mc.ModelConfig:
    """Triton's ModelConfig for one of our models, with server-wide batching defaults filled in.

    ``provider`` is the ONNX Runtime provider a loaded version runs on ("" when none is loaded); it picks
    the instance group kind (GPU for CUDA/TensorRT, else CPU).
    """
    b = cfg.batching
    explicit = [cfg.batch_dim] if cfg.unbatched else []  # Triton's dims then carry the batch dimension
    out = mc.ModelConfig(
        name=cfg.name,
        platform=PLATFORM if cfg.platform in ("", PLATFORM) else cfg.platform,
        backend=BACKEND,
        max_batch_size=0 if cfg.unbatched else cfg.max_batch_size,
        default_model_filename=cfg.default_model_filename,
        input=[
            mc.ModelInput(
                name=cfg.input.name,
                data_type=DATA_TYPES.get(cfg.input.dtype, mc.TYPE_FP32),
                format=mc.ModelInput.FORMAT_NCHW,
                dims=[*explicit, *cfg.input.shape],
            )
        ],
        output=[
            mc.ModelOutput(
                name=cfg.output.name,
                data_type=mc.TYPE_FP32,
                dims=[*explicit, cfg.num_classes],
                label_filename=cfg.output.label_filename,
            )
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{cfg.name}_0",
                count=settings.instances if b.instances is None else b.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU
                if provider in _GPU_PROVIDERS
                else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
    )
    vp = cfg.version_policy
    if vp.specific:
        out.version_policy.specific.versions.extend(vp.specific)
    elif vp.all:
        out.version_policy.all.SetInParent()
    else:
        out.version_policy.latest.num_versions = vp.latest or 1
    if b.enabled:
        db = out.dynamic_batching
        db.preferred_batch_size.extend(b.preferred_batch_sizes)
        db.max_queue_delay_microseconds = (
            settings.max_queue_delay_us if b.max_queue_delay_us is None else b.max_queue_delay_us
        )
        db.default_queue_policy.max_queue_size = (
            settings.max_queue_size if b.max_queue_size is None else b.max_queue_size
        )
    return out


def repository_index(entries: Iterable[ModelEntry], ready_only: bool = False) -> pb.RepositoryIndexResponse:
    """One row per model version, in Triton's words (READY, LOADING, UNAVAILABLE, UNLOADING).

    A model with no version served (unreadable config, unloaded by request) gets one row without a version,
    UNAVAILABLE, with the reason, as Triton lists an unloaded model.
    """
    index = pb.RepositoryIndexResponse()
    for entry in sorted(entries, key=lambda e: e.name):
        if not entry.versions:
            if not ready_only:
                index.models.add(name=entry.name, state="UNAVAILABLE", reason=entry.describe_failure())
            continue
        for version, sm in sorted(entry.versions.items()):
            if ready_only and not sm.ready:
                continue
            index.models.add(
                name=entry.name, version=str(version), state=_INDEX_STATES[sm.state], reason=sm.reason
            )
    return index


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(s: StatsSnapshot) -> pb.ModelStatistics:
    """Triton's ModelStatistics for one version's snapshot (durations as count + total nanoseconds)."""
    return pb.ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for b in s.batch_stats
        ],
    )
