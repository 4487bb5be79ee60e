"""Float32 vs int8 ResNet-18 served side by side by one server: ``python -m benchmarks.quantized``.

The benchmark ResNet-18 (random weights, benchmarks/models.py) is quantized by ``convserve quantize``'s own
code (``--force``: random weights make the accuracy gate meaningless, and the gate's in-process speed
table is printed either way), then served as version 1 (float32) and version 2 (int8) of one model under
an "all" version policy. Rounds alternate between the versions, so load from elsewhere on a shared box
hits both alike; the medians of served img/s are printed, and int8 as a multiple of float32 (the median
over rounds of each round's ratio).

    python -m benchmarks.quantized                # batch 32 and batch 1, 8 clients, 3 rounds: ~10 min
    python -m benchmarks.quantized --rounds 1 --duration 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from convserve.common.model_config import VersionPolicy, load_config, write_config

from . import models
from .run import Case, convserve_server, drive

MODEL = "resnet18_q"
TARGETS = {32: 2.5, 1: 1.8}  # the served int8/float32 targets per request batch


def prepare(work: Path) -> Path:
    """A repository holding the float ResNet-18 as version 1 and its int8 version 2, both served."""
    from PIL import Image

    from convserve.models import quantize

    cache = Path("bench_results/models")
    cache.mkdir(parents=True, exist_ok=True)
    models.prepare_resnet(cache)
    repository = work / "repo"
    (repository / MODEL / "1").mkdir(parents=True)
    shutil.copy2(models.model_file(cache, models.RESNET), repository / MODEL / "1" / "model.onnx")
    cfg = load_config(cache / models.RESNET)
    write_config(repository / MODEL, replace(cfg, name=MODEL, version_policy=VersionPolicy(all=True)))
    # Calibration: random-pixel images (the weights are random too, so nothing better exists).
    images = work / "calibration"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = quantize.quantize_model_dir(repository / MODEL, calibration=images, force=True)
    print(quantize.format_report(result), flush=True)
    return repository


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="clients (requests in flight); default 8")
    p.add_argument("--batches", default="32,1", help="images per request; default 32,1")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds measured per round and version; at batch 32 one request is 32 images")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="convserve-bench-quantized-") as tmp:
        work = Path(tmp)
        repository = prepare(work)
        rates: dict[tuple[int, int], list[float]] = {}
        loads: list[float] = []
        with convserve_server(repository, work, "convserve") as server:
            for r in range(a.rounds):
                for batch in batches:
                    for version in (1, 2):
                        case = Case("convserve", MODEL, "classify", batch, a.concurrency, version)
                        result, _ = drive(server, case, (3, 224, 224), a.warmup, a.duration, 1, work)
                        if result.errors:
                            raise RuntimeError(f"round {r + 1}, batch {batch}, v{version}: {result.errors}")
                        rates.setdefault((batch, version), []).append(result.images / result.seconds)
                        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                        print(f"round {r + 1} batch {batch:>2} v{version}: "
                              f"{rates[batch, version][-1]:.1f} img/s (load {loads[-1]:.2f})", flush=True)
    print(f"\nserved ResNet-18 224x224, classify API, {a.concurrency} clients, {a.rounds} interleaved rounds "
          f"of {a.duration:g} s; median 1-min load average {np.median(loads):.2f}")
    print(f"{'batch':>5} {'float32 img/s':>14} {'int8 img/s':>11} {'int8/float':>11} {'target':>7}")
    for batch in batches:
        f, q = np.median(rates[batch, 1]), np.median(rates[batch, 2])
        # The ratio within each round (the two versions ran back to back), then the median over rounds.
        ratio = np.median(np.divide(rates[batch, 2], rates[batch, 1]))
        target = TARGETS.get(batch)
        shown = f"{target:.1f}x" if target else "-"
        print(f"{batch:>5} {f:>14.1f} {q:>11.1f} {ratio:>10.2f}x {shown:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
