"""One served version on its own (server/runtime/served_model.py): load, serve, refuse, unload, release.

Real ONNX Runtime sessions over the shared test repository; outputs are compared with ONNX Runtime run
directly on the same file (``run_reference``), not with stored numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.server.errors import DeadlineExpiredError, ModelNotReadyError
from convserve.server.observability.metrics import Metrics
from convserve.server.repository.config_source import read_model_config
from convserve.server.runtime.served_model import ModelState, ServedModel

from ...conftest import test_settings


def _served(
    model_repository: Path, name: str, version: int = 1, **overrides: Any
) -> tuple[ServedModel, list[ModelState]]:
    seen: list[ModelState] = []
    model_dir = model_repository / name
    served = ServedModel(
        name, version, model_dir / str(version) / "model.onnx", read_model_config(model_dir),
        test_settings(model_repository, **overrides), Metrics(enabled=False),
        on_state=lambda m: seen.append(m.state),
    )  # fmt: skip
    return served, seen


def test_a_version_loads_serves_the_graphs_outputs_and_releases_everything_on_unload(
    model_repository: Path, run_reference: Callable[[Path, np.ndarray], np.ndarray]
) -> None:
    served, seen = _served(model_repository, "gray")
    served.load()
    assert served.ready and seen == [ModelState.LOADING, ModelState.READY]
    assert served.provider == "CPUExecutionProvider" and served.session is not None
    rng = np.random.default_rng(11)

    async def main() -> None:
        for n in (1, 3):  # one image (inline when cheap) and a batch (through the batcher)
            x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
            got = await served.infer(x)
            np.testing.assert_allclose(got, run_reference(served.path, x), rtol=1e-5, atol=1e-6)
        with pytest.raises(DeadlineExpiredError, match="never ran"):
            await served.infer(np.zeros((1, 1, 8, 8), np.float32), deadline=time.monotonic() - 1)
        await served.unload(grace=1.0)
        with pytest.raises(ModelNotReadyError, match="version 1 is unloading"):
            await served.infer(np.zeros((1, 1, 8, 8), np.float32))

    asyncio.run(asyncio.wait_for(main(), 60))
    assert seen[-1] is ModelState.UNLOADING
    # Released at once, not when the last reference goes (the batcher's bound method is a cycle).
    assert served.session is None and served.inline_session is None and served.lone_session is None
    assert served.batcher is None and not served.plans


def test_a_version_that_cannot_load_is_failed_with_its_reason_and_refuses_requests(
    model_repository: Path,
) -> None:
    served, seen = _served(model_repository, "broken_onnx")
    served.load()
    assert seen == [ModelState.LOADING, ModelState.FAILED]
    assert "not an ONNX model" in served.reason and served.session is None

    async def main() -> None:
        with pytest.raises(ModelNotReadyError, match=r"is failed: ModelFileError: .*not an ONNX model"):
            await served.infer(np.zeros((1, 1, 8, 8), np.float32))
        await served.unload()  # a failed version still unloads

    asyncio.run(asyncio.wait_for(main(), 30))
    assert seen[-1] is ModelState.UNLOADING


def test_batching_policy_is_the_models_config_over_the_server_defaults(model_repository: Path) -> None:
    served, _ = _served(model_repository, "gray", max_queue_size=77, instances=2)
    policy = served.batching
    assert policy.max_batch_size == served.cfg.max_batch_size
    assert policy.max_queue_size == (served.cfg.batching.max_queue_size or 77)
    assert policy.instances == (served.cfg.batching.instances or 2)
