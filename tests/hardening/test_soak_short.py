"""A short run of ``benchmarks/soak.py`` (the 5-minute soak's code path): mixed good and bad traffic on both
APIs and both stream types (some streams cancelled by the client) at concurrency 32 for ~12 s. No wrong
answers, no unexpected statuses, /metrics failure counts equal to the bad requests sent, no fd or thread
growth after warm-up, bounded RSS growth, and a server log that stays small although failures are logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RSS_GROWTH_LIMIT_MB = 25.0  # a leak of even 1 kB per request would pass this within seconds


def test_short_soak(hardening_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--duration",
            "12",
            "--warmup",
            "4",
            "--concurrency",
            "32",
            "--interval",
            "0.5",
            "--model-repository",
            str(hardening_repository),
            "--model",
            "gray",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.exists(), proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    summary = proc.stdout + proc.stderr
    assert report["requests"] > 500, summary
    assert report["good_sent"] > 0 and report["bad_sent"] > 0, summary
    assert report["wrong_answers"] == 0, summary
    assert report["unexpected"] == {}, summary
    metrics = report["metrics"]
    assert report["streams"] > 20 and report["streams_cancelled"] > 0, summary
    assert metrics["failures"] == report["bad_sent"], summary
    slack = report["unanswered"]  # messages of cancelled streams: counted by the server or never read
    assert report["bad_sent"] <= metrics["not_ok"] <= report["bad_sent"] + slack, summary
    assert report["good_sent"] <= metrics["ok"] <= report["good_sent"] + slack, summary
    assert report["log_mb_per_min"] <= report["max_log_mb_per_min"], summary
    assert report["fds_end"] <= report["fds_baseline"], summary
    assert report["threads_end"] <= report["threads_baseline"], summary  # threads besides gRPC's pool
    assert report["grpc_threads_end"] <= report["grpc_threads_baseline"] + 2, summary
    assert report["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, summary
    assert report["exit_code"] == 0, summary
    assert proc.returncode == 0, summary
