"""Which files a process opens, as strace sees them: the repository-boundary tests watch the server and
``convserve import`` from outside Python, because ONNX Runtime opens external data from C++."""

from __future__ import annotations

import re
from pathlib import Path

from convserve.testing.prerequisites import require_binary

__all__ = ["opened_files", "traced"]

# With -y strace prints each returned descriptor with the file it opened, links followed.
_OPENED = re.compile(r"= \d+<(/.*)>$")
_WRITES = ("O_WRONLY", "O_RDWR", "O_CREAT")


def traced(command: list[str], trace: Path) -> list[str]:
    """``command`` run under strace, every open of it and its threads and children recorded in
    ``<trace>.<tid>``: one file per thread, so no call is split into "unfinished" and "resumed" lines
    that hide its flags."""
    strace = require_binary("strace", "strace is not installed: bash scripts/install_system_deps.sh")
    return [
        strace, "-ff", "-qq", "-y", "--seccomp-bpf", "-e", "trace=open,openat,openat2", "-o", str(trace),
        *command,
    ]  # fmt: skip


def opened_files(trace: Path, *, writes: bool = True) -> list[str]:
    """The paths ``traced`` saw opened (never directories, which are listed, not read); opens for writing
    only when ``writes``."""
    lines = [
        line
        for part in sorted(trace.parent.glob(f"{trace.name}.*"))
        for line in part.read_text(errors="replace").splitlines()
    ]
    if not lines:
        raise FileNotFoundError(f"{trace}.*: strace wrote no trace")
    return [
        m[1]
        for line in lines
        if (m := _OPENED.search(line))
        and "O_DIRECTORY" not in line
        and (writes or not any(flag in line for flag in _WRITES))
    ]
