"""In-process float32 vs int8 variants of the benchmark ResNet-18: ``python -m benchmarks.quantize_variants``.

The measurement behind ``convserve quantize``'s scheme: each ``onnxruntime.quantization`` variant that
matters on an AVX2 CPU (QDQ or QOperator, per-channel or per-tensor weights, activations u8 or s8, weights
s8 or u8, reduce_range) is made from the same float graph and calibration (16 random inputs: the weights
are random too), then timed at batch 1 and 32 on 2 intra-op threads in interleaved rounds; medians are
printed beside float32 with the top-1 agreement on a random batch of 32.

    python -m benchmarks.quantize_variants --rounds 3      # about 4 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from . import models

# name → (format, activation type, weight type, per_channel, reduce_range)
VARIANTS = {
    "qdq u8/s8 per-channel": ("QDQ", "QUInt8", "QInt8", True, False),
    "qdq u8/s8 per-channel rr": ("QDQ", "QUInt8", "QInt8", True, True),
    "qdq s8/s8 per-channel": ("QDQ", "QInt8", "QInt8", True, False),
    "qdq u8/u8 per-channel": ("QDQ", "QUInt8", "QUInt8", True, False),
    "qdq u8/s8 per-tensor rr": ("QDQ", "QUInt8", "QInt8", False, True),
    "qoperator u8/s8 per-channel rr": ("QOperator", "QUInt8", "QInt8", True, True),
    "qoperator u8/u8 per-channel": ("QOperator", "QUInt8", "QUInt8", True, False),
}


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice
    cache = Path("bench_results/models")
    cache.mkdir(parents=True, exist_ok=True)
    models.prepare_resnet(cache)
    source = models.model_file(cache, models.RESNET)
    rng = np.random.default_rng(0)
    calibration = [rng.normal(size=(1, 3, 224, 224)).astype(np.float32) for _ in range(16)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {"input": x}

    def session(path: Path) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory(prefix="convserve-bench-qvariants-") as tmp:
        sessions = {"float32": session(source)}
        for name, (fmt, act, weight, per_channel, rr) in VARIANTS.items():
            out = Path(tmp) / f"{len(sessions)}.onnx"
            quantize_static(str(source), str(out), Reader(), quant_format=getattr(QuantFormat, fmt),
                            activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                            per_channel=per_channel, reduce_range=rr)
            sessions[name] = session(out)
        x1 = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
        x32 = rng.normal(size=(32, 3, 224, 224)).astype(np.float32)
        rates: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in sessions}
        for s in sessions.values():
            s.run(None, {"input": x1})
            s.run(None, {"input": x32})
        loads = []
        for _ in range(a.rounds):
            for name, s in sessions.items():
                started = time.perf_counter()
                for _ in range(10):
                    s.run(None, {"input": x1})
                rates[name][1].append(10 / (time.perf_counter() - started))
                started = time.perf_counter()
                s.run(None, {"input": x32})
                rates[name][32].append(32 / (time.perf_counter() - started))
            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
        reference = sessions["float32"].run(None, {"input": x32})[0].argmax(1)
        base = {b: float(np.median(rates["float32"][b])) for b in (1, 32)}
        print(f"ResNet-18 224x224 in-process, 2 intra-op threads, {a.rounds} interleaved rounds, medians; "
              f"1-min load average {np.median(loads):.2f}")
        print(f"{'variant (activations/weights)':32}{'b1 img/s':>10}{'vs fp32':>9}{'b32 img/s':>11}"
              f"{'vs fp32':>9}{'agree':>7}")
        for name, s in sessions.items():
            agree = float(np.mean(s.run(None, {"input": x32})[0].argmax(1) == reference))
            b1, b32 = (float(np.median(rates[name][b])) for b in (1, 32))
            print(f"{name:32}{b1:>10.1f}{b1 / base[1]:>8.2f}x{b32:>11.1f}{b32 / base[32]:>8.2f}x"
                  f"{agree:>7.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
