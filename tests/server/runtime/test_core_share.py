"""Expensive runs across worker processes (server/runtime/core_share.py): every core, one run at a time.

The lock is checked between real processes (a child holds it; a run in this process waits for it), and an
expensive served version is checked to build its session with every core's thread and to run under it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from convserve.server.observability.metrics import Metrics
from convserve.server.repository.config_source import read_model_config
from convserve.server.runtime import core_share, served_model
from convserve.server.runtime.core_share import CoreShare
from convserve.server.runtime.served_model import ServedModel
from convserve.testing.waits import poll_until

from ...conftest import test_settings

# A child process: take the lock, say so, hold it until told to let go.
HOLDER = """
import fcntl, os, sys, time
from pathlib import Path
lock, held, go = map(Path, sys.argv[1:])
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
held.touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Start a process holding ``tmp_path/cores.lock``; calling the fixture's value lets it go."""
    lock, held, go = tmp_path / "cores.lock", tmp_path / "held", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(held), str(go)])
    try:
        assert poll_until(held.exists, timeout=30), "the child never took the lock"
        yield go.touch
    finally:
        go.touch()
        child.wait(30)


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _loaded_gray(model_repository: Path, share: CoreShare) -> ServedModel:
    """The gray test model loaded in a worker whose core share is ``share`` (one thread of its own)."""
    core_share.configure(share)
    try:
        model_dir = model_repository / "gray"
        settings = test_settings(model_repository, intra_op_threads=1, inline_inference_us=0)
        cfg, path = read_model_config(model_dir), model_dir / "1" / "model.onnx"
        served = ServedModel("gray", 1, path, cfg, settings, Metrics(enabled=False))
        served.load()
    finally:
        core_share.configure(None)
    return served


def test_a_run_waits_while_another_process_holds_the_cores(
    tmp_path: Path, holder: Callable[[], None]
) -> None:
    share = CoreShare(2, tmp_path / "cores.lock")

    def run() -> str:
        with share.held():
            return "ran"

    thread, out = _in_thread(run)
    thread.join(0.3)
    assert thread.is_alive() and not out, "the run did not wait for the other process's lock"
    holder()
    thread.join(30)
    assert out == ["ran"]


def test_threads_of_one_process_take_turns_too(tmp_path: Path) -> None:
    share = CoreShare(2, tmp_path / "cores.lock")
    inside = threading.Event()
    release = threading.Event()

    def first() -> None:
        with share.held():
            inside.set()
            release.wait(30)

    def second() -> str:
        with share.held():
            return "second"

    a, _ = _in_thread(first)
    assert inside.wait(30)
    b, out = _in_thread(second)
    b.join(0.3)
    assert b.is_alive() and not out, "a second thread of the same process entered while the first held it"
    release.set()
    a.join(30)
    b.join(30)
    assert out == ["second"]


def test_an_expensive_version_takes_every_core_and_runs_under_the_share(
    tmp_path: Path,
    model_repository: Path,
    holder: Callable[[], None],
    run_reference: Callable[[Path, np.ndarray], np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(served_model, "EXPENSIVE_RUN_S", 0.0)  # the tiny test model counts as expensive
    share = CoreShare(2, tmp_path / "cores.lock")
    served = _loaded_gray(model_repository, share)
    assert served.ready and served.core_share is share
    assert served.session is not None and served.session.options.intra_op_threads == 2
    x = np.random.default_rng(2).normal(size=(3, 1, 8, 8)).astype(np.float32)

    async def infer() -> np.ndarray:
        try:
            return await served.infer(x)
        finally:
            await served.unload(1.0)

    thread, out = _in_thread(lambda: asyncio.run(asyncio.wait_for(infer(), 60)))
    thread.join(0.3)
    assert thread.is_alive() and not out, "the expensive run did not wait for the core share"
    holder()
    thread.join(60)
    np.testing.assert_allclose(out[0], run_reference(served.path, x), rtol=1e-5, atol=1e-6)


def test_a_cheap_version_keeps_its_share_of_threads_and_never_takes_the_lock(
    tmp_path: Path, model_repository: Path, holder: Callable[[], None]
) -> None:
    served = _loaded_gray(model_repository, CoreShare(2, tmp_path / "cores.lock"))
    assert served.core_share is None
    assert served.session is not None and served.session.options.intra_op_threads == 1

    async def infer() -> np.ndarray:
        try:
            return await served.infer(np.zeros((3, 1, 8, 8), np.float32))
        finally:
            await served.unload(1.0)

    assert asyncio.run(asyncio.wait_for(infer(), 60)).shape == (3, 4)  # while the other process holds it
