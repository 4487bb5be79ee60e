"""The control plane: everything the gRPC and REST front ends share besides inference.

Readiness, server and model metadata, Triton's model configuration, statistics, the repository index, and
model load / unload, decided once here. Answers are the Open Inference Protocol's own messages (the
protobuf types gRPC sends and REST prints as JSON), so the two front ends convert arguments in and the
reply out and cannot drift apart; neither calls the other.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from importlib import metadata

from convserve.protos.inference import grpc_service_pb2 as pb

from ..calls import current_call
from ..errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotSupportedError,
    PermissionDeniedError,
)
from ..health import Health
from ..repository.model_repository import ModelEntry, ModelRepository, parse_version
from ..settings import Settings
from . import triton_model

# The Triton extension names (as ServerMetadata lists them) served by every front end.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")

# Triton's RPCs for the extensions convserve does not serve, with the extension each belongs to.
NOT_SERVED: dict[str, str] = {
    "SystemSharedMemoryStatus": "system shared memory (system_shared_memory)",
    "SystemSharedMemoryRegister": "system shared memory (system_shared_memory)",
    "SystemSharedMemoryUnregister": "system shared memory (system_shared_memory)",
    "CudaSharedMemoryStatus": "CUDA shared memory (cuda_shared_memory)",
    "CudaSharedMemoryRegister": "CUDA shared memory (cuda_shared_memory)",
    "CudaSharedMemoryUnregister": "CUDA shared memory (cuda_shared_memory)",
    "TraceSetting": "trace (trace)",
    "LogSettings": "log settings (logging)",
}


def not_served(rpc: str) -> NotSupportedError:
    """The refusal (UNIMPLEMENTED, 501 over REST) of one of Triton's ``NOT_SERVED`` RPCs."""
    return NotSupportedError(
        f"{rpc}: convserve does not serve Triton's {NOT_SERVED[rpc]} extension; "
        f"ServerMetadata lists the extensions it serves"
    )


def require_model_control(settings: Settings) -> None:
    """Load/unload (v1 and v2) needs --allow-model-control, which needs auth (the edge checks the token)."""
    if not settings.allow_model_control:
        raise PermissionDeniedError(
            "model control is off on this server; start it with --allow-model-control (which needs auth)"
        )


def server_version() -> str:
    """The installed package's version (what ServerMetadata reports)."""
    try:
        return metadata.version("convserve")
    except metadata.PackageNotFoundError:
        return "0"


class ControlPlane:
    """The server's state and model control, over one repository, for every front end."""

    def __init__(self, repository: ModelRepository, settings: Settings, health: Health) -> None:
        self.repository = repository
        self.settings = settings
        self.health = health
        self.version = server_version()

    # ---- readiness and metadata ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The server is ready: serving (every model, and every worker, ready) and not draining."""
        return self.health.serving

    def server_not_ready_reason(self) -> str | None:
        """Why the server is not ready, or None when it is."""
        if self.health.serving:
            return None
        if self.health.draining:
            return "server is not ready: shutting down"
        return "server is not ready: no model version is ready yet (loading or failed)"

    def not_ready_reason(self, name: str, version_text: str) -> str | None:
        """Why the model (version) cannot serve now, or None when it can.

        An unknown model or version is not ready rather than an error, as Triton answers, so readiness
        probes get ``ready: false``; a malformed name or version still raises InvalidInputError.
        """
        version = parse_version(version_text, "version")
        try:
            self.repository.resolve(name, version, "name")
        except (ModelNotFoundError, ModelNotReadyError) as exc:
            return str(exc)
        return "the server is shutting down" if self.health.draining else None

    def server_metadata(self, extra_extensions: Sequence[str] = ()) -> pb.ServerMetadataResponse:
        """Name, version and extensions; a front end adds the extensions only it serves."""
        return pb.ServerMetadataResponse(
            name="convserve", version=self.version, extensions=[*EXTENSIONS, *extra_extensions]
        )

    def model_metadata(self, name: str, version_text: str) -> pb.ModelMetadataResponse:
        current_call().model = name
        entry = self.repository.entry(name, "name")
        cfg = entry.config
        if cfg is None:
            raise ModelNotReadyError(f"model {entry.name!r} is not ready: {entry.error}")
        version = parse_version(version_text, "version")
        if version:
            self.repository.resolve(entry.name, version, "name")
            versions = [str(version)]
        else:
            ready = [str(v) for v, sm in sorted(entry.versions.items()) if sm.ready]
            versions = ready or [str(v) for v in sorted(entry.versions)]
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=versions,
            platform=cfg.platform,
            inputs=[T(name=cfg.input.name, datatype="FP32", shape=[cfg.batch_dim, *cfg.input.shape])],
            outputs=[T(name=cfg.output.name, datatype="FP32", shape=[cfg.batch_dim, cfg.num_classes])],
        )

    # ---- Triton's model configuration and statistics -------------------------------------------------

    def model_config(self, name: str, version_text: str) -> pb.ModelConfigResponse:
        current_call().model = name
        entry = self.repository.entry(name, "name")
        version = parse_version(version_text, "version")
        if entry.config is None:
            raise ModelNotReadyError(f"model {entry.name!r} has no readable config: {entry.error}")
        served = self.repository.resolve(entry.name, version, "name") if version else entry.latest_ready()
        provider = served.provider if served is not None else ""
        return pb.ModelConfigResponse(config=triton_model.model_config(entry.config, self.settings, provider))

    def model_statistics(self, name: str, version_text: str) -> pb.ModelStatisticsResponse:
        """Every served version's counters; an empty name means every model, an empty version every one."""
        current_call().model = name
        version = parse_version(version_text, "version")
        if name:
            entries = [self.repository.entry(name, "name")]
            if version:
                self.repository.resolve(name, version, "name")
        elif version:
            raise InvalidInputError("version: a version needs a model name, got a version and no name")
        else:
            entries = self.repository.entries()
        reply = pb.ModelStatisticsResponse()
        for entry in sorted(entries, key=lambda e: e.name):
            for v, served in sorted(entry.versions.items()):
                if version in (0, v):
                    reply.model_stats.append(triton_model.model_statistics(served.stats.snapshot()))
        return reply

    # ---- the model repository ------------------------------------------------------------------------

    def repository_index(self, repository_name: str, ready_only: bool) -> pb.RepositoryIndexResponse:
        _one_repository(repository_name)
        return triton_model.repository_index(self.repository.entries(), ready_only=ready_only)

    async def load(
        self, model_name: str, repository_name: str = "", parameters: Collection[str] = ()
    ) -> None:
        """(Re)load a model from its repository folder; a failed load is an error naming why."""
        require_model_control(self.settings)
        current_call().model = model_name
        _one_repository(repository_name)
        _no_parameters(parameters, "load")
        entry = await self.repository.reload(model_name, "model_name")
        if not _loaded(entry):
            raise ModelNotReadyError(f"model {entry.name!r} failed to load: {entry.describe_failure()}")

    async def unload(
        self, model_name: str, repository_name: str = "", parameters: Collection[str] = ()
    ) -> None:
        """Stop serving every version of a model until it is loaded again."""
        require_model_control(self.settings)
        current_call().model = model_name
        _one_repository(repository_name)
        # tritonclient sends unload_dependents; convserve has no ensembles, so there are none to unload.
        _no_parameters(parameters, "unload", allowed=("unload_dependents",))
        await self.repository.unload(model_name, 0, "model_name")


def _loaded(entry: ModelEntry) -> bool:
    return entry.config is not None and entry.latest_ready() is not None


def _one_repository(name: str) -> None:
    """convserve serves one repository; Triton's repository_name may be empty or that one's name."""
    if name:
        raise InvalidInputError(
            f"repository_name: convserve serves a single model repository; send an empty name, got {name!r}"
        )


def _no_parameters(params: Collection[str], what: str, allowed: tuple[str, ...] = ()) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise InvalidInputError(
            f"parameters: convserve {what}s a model from its repository folder as it is and takes no "
            f"parameters{' but ' + ', '.join(allowed) if allowed else ''}; got {extra}"
        )
