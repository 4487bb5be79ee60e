"""The physical ceiling: in-process ONNX Runtime throughput on the served model at given batch sizes.

It builds the session as the server does (``convserve.server.runtime.session.OnnxSession`` with the server's
default Settings) and, because on a small shared machine one intra-op thread is sometimes faster than
ONNX Runtime's default (one per core), also with one thread, each with its threads sleeping between
operators and spinning during runs; the best figure per batch size is the ceiling, so the
served/ceiling ratio never flatters the server.
Run it as its own process so nothing else holds the GIL:
``python -m benchmarks.ceiling --model-dir DIR --batches 1,8,64 --duration 3 --out ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from convserve.common.model_config import load_config
from convserve.server.runtime.session import OnnxSession, SessionOptions
from convserve.server.settings import Settings

from .models import latest_version


def measure(model_dir: Path, batches: list[int], duration: float) -> dict[int, float]:
    """Best images per second of back-to-back ``session.run`` calls per batch size, over the server's
    default session options and one intra-op thread, spinning or not (each bounded by ``duration``)."""
    cfg = load_config(model_dir)
    version = latest_version(model_dir)
    if version is None:
        raise FileNotFoundError(f"no model version under {model_dir}")
    s = Settings()
    best: dict[int, float] = {}
    for intra in dict.fromkeys((s.intra_op_threads, 1)):
        for spin in (False, True):
            options = SessionOptions(intra, s.inter_op_threads, s.graph_optimization_level, spin)
            session = OnnxSession(version / "model.onnx", cfg, s.execution_providers, options)
            for b, v in _run(session, cfg.input.shape, batches, duration).items():
                best[b] = max(best.get(b, 0.0), v)
    return best


def _run(session: OnnxSession, shape: tuple[int, ...], batches: list[int],
         duration: float) -> dict[int, float]:
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        for _ in range(3):
            session.run(x)
        runs = 0
        t0 = time.perf_counter()
        t_end = t0 + duration
        while True:
            session.run(x)
            runs += 1
            t = time.perf_counter()
            if t >= t_end:
                break
        out[b] = runs * b / (t - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per batch size")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    result = measure(a.model_dir, [int(b) for b in a.batches.split(",")], a.duration)
    a.out.write_text(json.dumps({str(k): v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
