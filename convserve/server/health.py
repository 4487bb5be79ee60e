"""grpc.health.v1, overall and per service: NOT_SERVING until models load; a one-way drain latch."""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The server's readiness: ``""`` (overall) plus one entry per service, all moving together.

    ``drain()`` is a latch: once called, every service reads NOT_SERVING and nothing sets it back
    (grpc's ``enter_graceful_shutdown`` ignores later ``set`` calls).
    """

    def __init__(self, services: Sequence[str]) -> None:
        self.servicer = HealthServicer()
        self.services = ("", *services)
        self.serving = False
        self.draining = False
        self.loaded = False
        # A worker process's siblings: the supervisor closes the gate while any worker is not ready, so
        # that readiness on the shared port is the conjunction of the workers' (always open alone).
        self.gate_open = True

    async def start(self) -> None:
        """Register every service as NOT_SERVING (models are not loaded yet)."""
        for name in self.services:
            await self.servicer.set(name, NOT_SERVING)

    async def set_serving(self) -> None:
        """Models are loaded: report SERVING (while the gate is open), unless the server is draining."""
        self.loaded = True
        await self._publish()

    async def set_gate(self, open_: bool) -> None:
        """Open or close the sibling gate: SERVING needs loaded models and an open gate."""
        self.gate_open = open_
        await self._publish()

    async def _publish(self) -> None:
        if self.draining:
            return
        serving = self.loaded and self.gate_open
        if serving == self.serving:
            return
        self.serving = serving
        for name in self.services:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def set_ready(self, ready: bool) -> None:
        """Follow the models' readiness after a load, reload or unload (strict readiness); SERVING still
        needs the sibling gate open, and the drain latch still wins."""
        self.loaded = ready
        await self._publish()

    async def drain(self) -> None:
        """Shutdown began: NOT_SERVING everywhere, for good."""
        self.draining = True
        self.serving = False
        await self.servicer.enter_graceful_shutdown()
