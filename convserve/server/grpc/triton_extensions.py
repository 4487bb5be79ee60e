"""Triton's gRPC extensions on inference.GRPCInferenceService: model configuration, statistics, repository.

A mixin of ``InferenceService``: each RPC converts its request's fields for the control plane
(``server/core/control.py``, which REST calls too) and returns its answer. The extensions Triton has and
convserve does not serve (system and CUDA shared memory, trace, log settings) answer UNIMPLEMENTED naming
the extension, so a client learns what is missing instead of a bare "Method not implemented".
"""

from __future__ import annotations

from typing import Any

from convserve.protos.inference import grpc_service_pb2 as pb

from ..core.control import NOT_SERVED, ControlPlane, not_served


def _refusal(rpc: str) -> Any:
    async def refuse(self: Any, request: Any, context: Any) -> Any:
        raise not_served(rpc)

    refuse.__name__ = refuse.__qualname__ = rpc
    return refuse


class TritonExtensions:
    """Triton's extension RPCs over the control plane the v2 core RPCs and REST share."""

    control: ControlPlane

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return self.control.model_config(request.name, request.version)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        return self.control.model_statistics(request.name, request.version)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        return self.control.repository_index(request.repository_name, request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self.control.load(request.model_name, request.repository_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.control.unload(request.model_name, request.repository_name, list(request.parameters))
        return pb.RepositoryModelUnloadResponse()


# Triton's RPCs that convserve declares but does not serve: each answers ``not_served``.
for _rpc in NOT_SERVED:
    setattr(TritonExtensions, _rpc, _refusal(_rpc))
