"""Refused max-size messages, with a valid token or none, leave the server's RSS within +300 MB of where
it started within 10 s, and the server answers a good request right after. Runs
``benchmarks/memory_rejected.py`` (a real server subprocess, 4 concurrent senders, both APIs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADROOM_MB = 300.0
IDLE_S = 10.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")


def _run(*flags: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_rejected", "--messages", "12", "--senders", "4",
         "--idle", str(IDLE_S), *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("flags", "code"),
    [(("--token",), "INVALID_ARGUMENT"), (("--token", "--no-token"), "UNAUTHENTICATED")],
    ids=["authenticated", "no-token"],
)
def test_refused_max_size_messages_release_their_memory(flags: tuple[str, ...], code: str) -> None:
    report = _run(*flags)
    assert report["codes"] == {code: 12}, report
    assert report["good_request_after"] == "OK", report
    start, end = float(report["rss_start_mb"]), float(report["rss_after_idle_mb"])  # type: ignore[arg-type]
    assert report["back_within_300mb_after_s"] is not None, report
    assert end <= start + HEADROOM_MB, report
