"""Triton's gRPC extensions on inference.GRPCInferenceService: model configuration, statistics, repository.

A mixin of ``InferenceService``: it reads ``self.repository`` and ``self.settings`` and converts through
``server/core/triton_model.py``, which the REST front end shares. The extensions Triton has and convserve does
not serve (system and CUDA shared memory, trace, log settings) answer UNIMPLEMENTED naming the extension,
so a client learns what is missing instead of a bare "Method not implemented".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convserve.protos.inference import grpc_service_pb2 as pb

from ..core import triton_model
from ..errors import InvalidInputError, ModelNotReadyError, NotSupportedError, PermissionDeniedError
from ..calls import current_call
from ..repository.model_repository import ModelEntry, parse_version
from ..runtime.served_model import ServedModel

if TYPE_CHECKING:
    from ..repository.model_repository import ModelRepository
    from ..settings import Settings

# The Triton extension names (as ServerMetadata lists them) this mixin serves.
SERVED = ("model_configuration", "model_repository", "statistics")


def require_model_control(settings: Settings) -> None:
    """Repository load/unload needs --allow-model-control, which needs auth (the edge checks the token)."""
    if not settings.allow_model_control:
        raise PermissionDeniedError(
            "model control is off on this server; start it with --allow-model-control (which needs auth)"
        )


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


def _refusal(rpc: str) -> Any:
    async def refuse(self: Any, request: Any, context: Any) -> Any:
        raise not_served(rpc)

    refuse.__name__ = refuse.__qualname__ = rpc
    return refuse


class TritonExtensions:
    """Triton's extension RPCs over the same repository and models as the v2 core RPCs."""

    repository: ModelRepository
    settings: Settings

    # ---- model configuration -------------------------------------------------------------------------

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        current_call().model = request.name
        entry = self.repository.entry(request.name, "name")
        version = parse_version(request.version, "version")
        if entry.config is None:
            raise ModelNotReadyError(f"model {entry.name!r} has no readable config: {entry.error}")
        served = self.repository.resolve(entry.name, version, "name") if version else entry.latest_ready()
        provider = served.provider if served is not None else ""
        return pb.ModelConfigResponse(config=triton_model.model_config(entry.config, self.settings, provider))

    # ---- statistics ----------------------------------------------------------------------------------

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        """Every served version's counters; an empty name means every model, an empty version every one."""
        current_call().model = request.name
        version = parse_version(request.version, "version")
        if request.name:
            entries = [self.repository.entry(request.name, "name")]
            if version:
                self.repository.resolve(request.name, version, "name")
        elif version:
            raise InvalidInputError("version: a version needs a model name, got a version and no name")
        else:
            entries = self.repository.entries()
        reply = pb.ModelStatisticsResponse()
        for entry in sorted(entries, key=lambda e: e.name):
            for v, served in sorted(entry.versions.items()):
                if version in (0, v):
                    reply.model_stats.append(triton_model.model_statistics(_stats(served)))
        return reply

    # ---- model repository ----------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        return triton_model.repository_index(self.repository.entries(), ready_only=request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        """(Re)load a model from the repository folder, as LoadModel does; a failed load is an error."""
        require_model_control(self.settings)
        current_call().model = request.model_name
        _one_repository(request.repository_name)
        _no_parameters(request.parameters, "load")
        entry = await self.repository.reload(request.model_name, "model_name")
        if _loaded(entry):
            return pb.RepositoryModelLoadResponse()
        raise ModelNotReadyError(f"model {entry.name!r} failed to load: {entry.describe_failure()}")

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving every version of a model until it is loaded again, as UnloadModel does."""
        require_model_control(self.settings)
        current_call().model = request.model_name
        _one_repository(request.repository_name)
        # tritonclient sends unload_dependents; convserve has no ensembles, so there are none to unload.
        _no_parameters(request.parameters, "unload", allowed=("unload_dependents",))
        await self.repository.unload(request.model_name, 0, "model_name")
        return pb.RepositoryModelUnloadResponse()


# Triton's RPCs that convserve declares but does not serve: each answers ``not_served``.
for _rpc in NOT_SERVED:
    setattr(TritonExtensions, _rpc, _refusal(_rpc))


def _stats(served: ServedModel) -> triton_model.StatsSnapshot:
    """The version's cumulative counters since it loaded (``served.stats``, kept by the request path)."""
    return served.stats.snapshot()


def _loaded(entry: ModelEntry) -> bool:
    return entry.config is not None and entry.latest_ready() is not None


def _one_repository(name: str) -> None:
    """convserve serves one repository; Triton's repository_name may be empty or that one's name."""
    if name:
        raise InvalidInputError(
            f"repository_name: convserve serves a single model repository; send an empty name, got {name!r}"
        )


def _no_parameters(params: Any, what: str, allowed: tuple[str, ...] = ()) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise InvalidInputError(
            f"parameters: convserve {what}s a model from its repository folder as it is and takes no "
            f"parameters{' but ' + ', '.join(allowed) if allowed else ''}; got {extra}"
        )
