"""``--port-file``: written as a regular file, atomically, never through or over anything that is not one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from convserve.server.app import write_port_file
from convserve.testing import child_env, loopback_command


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink(path: Path) -> Path:
    target = path.with_name("target.txt")
    target.write_text("precious\n")
    path.symlink_to(target)
    return path


NON_REGULAR: dict[str, tuple[Callable[[Path], Path], Callable[[int], bool]]] = {
    "fifo": (_fifo, stat.S_ISFIFO),
    "folder": (_folder, stat.S_ISDIR),
    "symlink": (_symlink, stat.S_ISLNK),
}


def test_writes_a_regular_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "ports.json"
    path.write_text("old contents\n")
    write_port_file(path, 1234, None, 4321)
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert json.loads(path.read_text()) == {
        "grpc_port": 1234, "http_port": 4321, "metrics_port": None, "pid": os.getpid()
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ports.json"]  # no temporary file left behind


@pytest.mark.parametrize("kind", sorted(NON_REGULAR))
def test_refuses_an_existing_non_regular_path(tmp_path: Path, kind: str) -> None:
    make, is_kind = NON_REGULAR[kind]
    path = make(tmp_path / "ports.json")
    with pytest.raises(ValueError, match="not a regular file"):
        write_port_file(path, 1234, 5678)
    assert is_kind(os.lstat(path).st_mode), f"the {kind} was replaced"
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    if kind == "symlink":
        assert (tmp_path / "target.txt").read_text() == "precious\n"


def test_the_server_refuses_to_start_on_a_fifo(tmp_path: Path) -> None:
    """One log line naming the problem, exit status 1, before any port is bound; the FIFO is untouched."""
    fifo = _fifo(tmp_path / "ports.json")
    start = time.monotonic()
    proc = subprocess.run(
        loopback_command(fifo, metrics_port=-1),
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
    )
    assert proc.returncode == 1, proc.stderr
    assert "port file" in proc.stderr and "not a regular file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "gRPC listening" not in proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert time.monotonic() - start < 60
