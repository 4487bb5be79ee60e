"""Bounded soak: mixed good and bad traffic at high concurrency against a server subprocess.

Both APIs (convserve.v1 Classify, KServe v2 ModelInfer) and both stream types (ClassifyStream,
ModelStreamInfer, some of them cancelled half-way by the client) carry good and bad requests. Samples the
server's resident memory (VmRSS), open file descriptors and threads from /proc and the size of its log
(failures are logged at the default level) while the load runs; checks every good answer against an
in-process ONNX Runtime reference and every bad request's status; at the end, checks that the server's
/metrics counted the bad requests sent as failures.

    python -m benchmarks.soak                       # 5 minutes against the bundled model_repository
    python -m benchmarks.soak --duration 15 --json soak.json --model-repository DIR --model NAME

Exit status 0 when every check passes (see ``Report.problems``); the JSON report holds every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.testing import child_env, loopback_command

CLASSIFY = "/convserve.v1.Classifier/Classify"
STREAM = "/convserve.v1.Classifier/ClassifyStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAM_OF = {CLASSIFY: STREAM, INFER: INFER_STREAM}
STREAM_MESSAGES = 8  # messages per stream
CANCEL_EVERY = 5  # every 5th stream is cancelled by the client after its first reply
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- the model and its reference answers ----------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    path: Path
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str  # "logits" or "probabilities"
    classes: int
    ink: bool = False  # the config normalises ink (polarity other than as_is, or fit_ink)


def model_spec(repository: Path, name: str | None) -> ModelSpec:
    """Read the model's config.json directly (not through the server's code) and pick its latest version."""
    names = sorted(p.name for p in repository.iterdir() if (p / "config.json").is_file())
    name = name or names[0]
    cfg = json.loads((repository / name / "config.json").read_text())
    versions = sorted(int(p.name) for p in (repository / name).iterdir() if p.name.isdigit())
    c, h, w = cfg["input"]["shape"]
    pre = cfg["preprocessing"]
    return ModelSpec(
        name,
        versions[-1],
        repository / name / str(versions[-1]) / "model.onnx",
        (c, h, w),
        tuple(cfg["preprocessing"]["mean"]),
        tuple(cfg["preprocessing"]["std"]),
        cfg.get("output", {}).get("kind", "logits"),
        len(cfg["labels"]),
        pre.get("polarity", "as_is") != "as_is" or pre.get("fit_ink") is not None,
    )


def reference_probabilities(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
    if spec.kind != "logits":
        return out
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ink_reference(spec: ModelSpec, pixels: np.ndarray) -> np.ndarray:
    """Model inputs for PNGs of a model whose config normalises ink (polarity / fit_ink): that geometry is
    not retyped here but taken from ``image_to_array``, the one preprocessing function training also uses
    (its own tests check it); the plain /255, mean, std path above stays independent."""
    from PIL import Image

    from convserve.common.model_config import load_config
    from convserve.server.runtime.preprocess import image_to_array

    cfg = load_config(spec.path.parent.parent)
    images = [Image.fromarray(p[:, :, 0] if p.shape[2] == 1 else p) for p in pixels]
    return np.stack([image_to_array(img, cfg) for img in images]).astype(np.float32)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels if pixels.shape[-1] != 1 else pixels[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(side: int = 6000) -> bytes:
    """A real 36-megapixel all-black grayscale PNG from ~35 kB: over the default 16 M pixel limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress((b"\x00" * (side + 1)) * side, 9))
        + chunk(b"IEND", b"")
    )


# ---- traffic ----------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of request: pre-serialized payloads, the method, the expected status, how to check a reply."""

    name: str
    method: str
    payloads: tuple[bytes, ...]
    expected: grpc.StatusCode
    weight: float
    answers: tuple[np.ndarray, ...] = ()  # per payload, the expected probabilities (good kinds)
    images: int = 1


def build_traffic(spec: ModelSpec, pool: int = 16, seed: int = 0) -> list[Kind]:
    c, h, w = spec.shape
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (pool, h, w, c), dtype=np.uint8)
    mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    x_png = ((pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    if spec.ink:
        x_png = _ink_reference(spec, pixels)
    x_raw = rng.normal(size=(pool, c, h, w)).astype(np.float32)
    p_png = reference_probabilities(spec, x_png)
    p_raw = reference_probabilities(spec, x_raw)
    pngs = [_png(p) for p in pixels]
    k = spec.classes

    def classify(images: list[pb.Image], **kw: Any) -> bytes:
        fields = {"model": spec.name, "top_k": k, **kw}
        return pb.ClassifyRequest(images=images, **fields).SerializeToString()

    def tensor(x: np.ndarray, dtype: int = pb.DATA_TYPE_FLOAT32, shape: list[int] | None = None) -> pb.Image:
        return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape or list(x.shape), data=x.tobytes()))

    def infer(data: bytes, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
        request = v2pb.ModelInferRequest(model_name=spec.name, model_version=str(spec.version))
        request.inputs.add(name="input", datatype=datatype, shape=shape or [1, c, h, w])
        request.raw_input_contents.append(data)
        return request.SerializeToString()

    corrupt = bytearray(pngs[0])
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 16] = bytes(16)
    nan = x_raw[0].copy()
    nan[0, 0, 0] = np.nan
    bad = grpc.StatusCode.INVALID_ARGUMENT
    return [
        Kind(
            "good: tensor",
            CLASSIFY,
            tuple(classify([tensor(x)]) for x in x_raw),
            grpc.StatusCode.OK,
            3,
            tuple(p_raw),
        ),
        Kind(
            "good: png",
            CLASSIFY,
            tuple(classify([pb.Image(encoded=p)]) for p in pngs),
            grpc.StatusCode.OK,
            3,
            tuple(p_png),
        ),
        Kind(
            "good: batch of 4 png",
            CLASSIFY,
            tuple(classify([pb.Image(encoded=pngs[(i + j) % pool]) for j in range(4)]) for i in range(pool)),
            grpc.StatusCode.OK,
            1,
            tuple(np.stack([p_png[(i + j) % pool] for j in range(4)]) for i in range(pool)),
            images=4,
        ),
        Kind(
            "good: v2 fp32",
            INFER,
            tuple(infer(x[None].tobytes()) for x in x_raw),
            grpc.StatusCode.OK,
            2,
            tuple(p_raw),
        ),
        Kind("bad: corrupt png", CLASSIFY, (classify([pb.Image(encoded=bytes(corrupt))]),), bad, 0.5),
        Kind(
            "bad: non-image bytes", CLASSIFY, (classify([pb.Image(encoded=b"not an image" * 8)]),), bad, 0.5
        ),
        Kind("bad: decompression bomb", CLASSIFY, (classify([pb.Image(encoded=_bomb())]),), bad, 0.3),
        Kind("bad: wrong shape", CLASSIFY, (classify([tensor(x_raw[0], shape=[c, h + 1, w])]),), bad, 0.5),
        Kind("bad: NaN tensor", CLASSIFY, (classify([tensor(nan)]),), bad, 0.4),
        Kind("bad: top_k too large", CLASSIFY, (classify([tensor(x_raw[0])], top_k=k + 1),), bad, 0.4),
        Kind(
            "bad: unknown model",
            CLASSIFY,
            (pb.ClassifyRequest(model="no_such_model", images=[tensor(x_raw[0])]).SerializeToString(),),
            grpc.StatusCode.NOT_FOUND,
            0.4,
        ),
        Kind(
            "bad: path traversal",
            CLASSIFY,
            (pb.ClassifyRequest(model="../" + spec.name, images=[tensor(x_raw[0])]).SerializeToString(),),
            bad,
            0.3,
        ),
        Kind("bad: v2 wrong datatype", INFER, (infer(x_raw[0].tobytes(), "INT32"),), bad, 0.4),
        Kind("bad: v2 byte length", INFER, (infer(x_raw[0].tobytes()[:-4]),), bad, 0.4),
    ]


def check_answer(kind: Kind, index: int, reply: bytes) -> bool:
    expected = np.atleast_2d(kind.answers[index])
    if kind.method == INFER:
        msg = v2pb.ModelInferResponse.FromString(reply)
        return (
            False
            if not msg.raw_output_contents
            else bool(
                np.allclose(
                    _softmax_rows(np.frombuffer(msg.raw_output_contents[0], "<f4").reshape(expected.shape)),
                    expected,
                    rtol=1e-3,
                    atol=1e-5,
                )
            )
        )
    msg = pb.ClassifyResponse.FromString(reply)
    if len(msg.results) != len(expected):
        return False
    for result, probs in zip(msg.results, expected, strict=True):
        got = np.zeros(len(probs))
        for p in result.predictions:
            got[p.index] = p.probability
        if not np.allclose(got, probs, rtol=1e-3, atol=1e-5):
            return False
    return True


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- the server under test ----------------------------------------


def start_server(
    repository: Path, work: Path, timeout: float = 120.0
) -> tuple[subprocess.Popen[bytes], int, int]:
    """``python -m convserve.server`` on loopback ephemeral ports; (process, grpc port, metrics port)."""
    port_file = work / "ports.json"
    # The default log level: failed requests log at WARNING, rate-limited per reason, and the soak measures
    # that the log stays bounded although it sends thousands of bad requests.
    cmd = loopback_command(port_file, "--model-repository", str(repository))
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    wait_serving(f"127.0.0.1:{ports['grpc_port']}", deadline)
    return proc, int(ports["grpc_port"]), int(ports["metrics_port"])


def wait_serving(address: str, deadline: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING in time")


# gRPC core's EventEngine names its threads; its pool grows and shrinks with load by design (bounded by
# gRPC), so those are judged with a small allowance while every other thread must not grow at all.
GRPC_THREAD_PREFIXES = ("event_engine", "lifeguard", "grpc_")
GRPC_THREAD_ALLOWANCE = 2


@dataclass(frozen=True)
class Sample:
    t: float
    rss_kb: int
    fds: int
    threads: int
    grpc_threads: int
    log_bytes: int = 0


def sample(pid: int, t: float, log_path: Path | None = None) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    grpc_threads = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended between listing and reading
            grpc_threads += Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith(GRPC_THREAD_PREFIXES)
    return Sample(
        round(t, 2),
        int(fields["VmRSS"].split()[0]),
        len(os.listdir(f"/proc/{pid}/fd")),
        int(fields["Threads"]),
        grpc_threads,
        log_path.stat().st_size if log_path is not None and log_path.exists() else 0,
    )


def scrape(metrics_port: int) -> dict[str, float]:
    """Totals from /metrics: requests by code class, failures, images."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "convserve_request_failures_total":
                totals["failures"] += s.value
            elif s.name == "convserve_requests_total":
                totals["ok" if s.labels.get("code") == "OK" else "not_ok"] += s.value
            elif s.name == "convserve_images_total":
                totals["images"] += s.value
    return dict(totals)


# ---- the run ----------------------------------------


@dataclass
class Report:
    model: str
    duration_s: float
    warmup_s: float
    concurrency: int
    requests: int = 0
    good_sent: int = 0
    bad_sent: int = 0
    images_ok: int = 0
    wrong_answers: int = 0
    unexpected: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, float]] = field(default_factory=list)
    rss_mb_baseline: float = 0.0
    rss_mb_end: float = 0.0
    rss_mb_max: float = 0.0
    rss_growth_mb: float = 0.0
    rss_slope_mb_per_min: float = 0.0
    fds_baseline: int = 0
    fds_end: int = 0
    fds_max: int = 0
    fds_after_load: int = 0
    threads_baseline: int = 0  # threads other than gRPC's EventEngine pool
    threads_end: int = 0
    threads_max: int = 0
    grpc_threads_baseline: int = 0
    grpc_threads_end: int = 0
    streams: int = 0
    streams_cancelled: int = 0
    stream_messages: int = 0
    unanswered: int = 0  # messages of cancelled streams sent but not answered (the server may count them)
    log_mb: float = 0.0
    log_mb_per_min: float = 0.0  # growth after warm-up
    max_log_mb_per_min: float = 1.0
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


async def _load(
    address: str,
    kinds: list[Kind],
    concurrency: int,
    t_end: float,
    report: Report,
    seed: int,
    stream_workers: int | None = None,
) -> None:
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(min(4, concurrency))
    ]
    calls = {(i, kind.method): ch.unary_unary(kind.method) for i, ch in enumerate(channels) for kind in kinds}
    streams = {(i, m): ch.stream_stream(m) for i, ch in enumerate(channels) for m in (STREAM, INFER_STREAM)}
    weights = [k.weight for k in kinds]
    unexpected: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()

    def account(kind: Kind, index: int, code: grpc.StatusCode, reply: bytes) -> None:
        report.requests += 1
        by_kind[kind.name] += 1
        if code != kind.expected:
            unexpected[f"{kind.name}: {code.name}"] += 1
        elif code == grpc.StatusCode.OK:
            report.good_sent += 1
            report.images_ok += kind.images
            if not check_answer(kind, index, reply):
                report.wrong_answers += 1
        else:
            report.bad_sent += 1

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        ch = w % len(channels)
        for _ in range(10_000_000):  # bounded by t_end long before this
            if time.monotonic() >= t_end:
                return
            kind = rng.choices(kinds, weights)[0]
            index = rng.randrange(len(kind.payloads))
            try:
                reply = await calls[(ch, kind.method)](kind.payloads[index], timeout=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                code, reply = err.code(), b""
            account(kind, index, code, reply)

    async def stream_worker(w: int) -> None:
        """Streams of STREAM_MESSAGES good and bad messages, alternating APIs; some cancelled early."""
        rng = random.Random(seed * 1000 + 500 + w)
        ch = w % len(channels)
        for n in range(10_000_000):  # bounded by t_end long before this
            if time.monotonic() >= t_end:
                return
            method = (CLASSIFY, INFER)[n % 2]
            pool = [k for k in kinds if k.method == method]
            picked = [rng.choices(pool, [k.weight for k in pool])[0] for _ in range(STREAM_MESSAGES)]
            indices = [rng.randrange(len(k.payloads)) for k in picked]
            cancel = (n // 2) % CANCEL_EVERY == CANCEL_EVERY - 1
            if cancel:  # only good messages: whatever the server did with them, it was right
                picked = [k for k in pool if k.expected == grpc.StatusCode.OK][:1] * STREAM_MESSAGES
                indices = [rng.randrange(len(picked[0].payloads)) for _ in picked]
            call = streams[(ch, STREAM_OF[method])](
                iter([k.payloads[i] for k, i in zip(picked, indices, strict=True)]), timeout=30
            )
            report.streams += 1
            got = 0
            try:
                async for raw in call:
                    kind, index = picked[got], indices[got]
                    code, reply = _stream_reply(method, raw)
                    account(kind, index, code, reply)
                    report.stream_messages += 1
                    got += 1
                    if cancel:
                        call.cancel()
                        report.streams_cancelled += 1
                        report.unanswered += STREAM_MESSAGES - got
                        break
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if not cancel:
                    unexpected[f"stream ended: {err.code().name}"] += 1
            if not cancel and got != STREAM_MESSAGES:
                unexpected[f"stream answered {got} of {STREAM_MESSAGES}"] += 1

    try:
        if stream_workers is None:
            stream_workers = max(2, concurrency // 8)
        stream_workers = min(stream_workers, concurrency)
        await asyncio.gather(
            *(worker(w) for w in range(concurrency - stream_workers)),
            *(stream_worker(w) for w in range(stream_workers)),
        )
    finally:
        for ch in channels:
            await ch.close()
    report.unexpected = dict(unexpected)
    report.by_kind = dict(by_kind)


def _stream_reply(method: str, raw: bytes) -> tuple[grpc.StatusCode, bytes]:
    """A stream reply as (status of its message, the unary reply bytes it carries)."""
    if method == CLASSIFY:
        msg = pb.ClassifyStreamResponse.FromString(raw)
        if msg.error_code:
            return _CODES.get(msg.error_code, grpc.StatusCode.UNKNOWN), b""
        return grpc.StatusCode.OK, msg.response.SerializeToString()
    msg = v2pb.ModelStreamInferResponse.FromString(raw)
    if msg.error_message:
        name = msg.error_message.split(":", 1)[0]
        return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN), b""
    return grpc.StatusCode.OK, msg.infer_response.SerializeToString()


_CODES = {c.value[0]: c for c in grpc.StatusCode}


async def _sampler(
    pid: int, t0: float, t_end: float, interval: float, out: list[Sample], log_path: Path
) -> None:
    while time.monotonic() < t_end:
        out.append(sample(pid, time.monotonic() - t0, log_path))
        await asyncio.sleep(interval)
    out.append(sample(pid, time.monotonic() - t0, log_path))


def soak(
    repository: Path,
    model: str | None,
    duration: float,
    concurrency: int,
    warmup: float | None = None,
    interval: float = 1.0,
    seed: int = 0,
    max_log_mb_per_min: float = 1.0,
    stream_workers: int | None = None,
) -> Report:
    spec = model_spec(repository, model)
    kinds = build_traffic(spec, seed=seed)
    warmup = warmup if warmup is not None else max(2.0, min(30.0, duration * 0.1))
    report = Report(spec.name, duration, warmup, concurrency, max_log_mb_per_min=max_log_mb_per_min)
    with tempfile.TemporaryDirectory(prefix="convserve-soak-") as tmp:
        proc, grpc_port, metrics_port = start_server(repository, Path(tmp))
        try:
            samples: list[Sample] = []

            async def main() -> None:
                t0 = time.monotonic()
                t_end = t0 + duration
                await asyncio.gather(
                    _load(f"127.0.0.1:{grpc_port}", kinds, concurrency, t_end, report, seed, stream_workers),
                    _sampler(proc.pid, t0, t_end, interval, samples, Path(tmp) / "server.log"),
                )

            t_start = time.monotonic()
            asyncio.run(main())
            report.throughput_rps = round(report.requests / (time.monotonic() - t_start), 1)
            report.metrics = scrape(metrics_port)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                report.exit_code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                report.exit_code = proc.wait(10)
    summarize(report, samples)
    return report


def summarize(report: Report, samples: list[Sample]) -> None:
    """Growth figures. The last sample is taken after the load stopped; the others while it ran.

    Connections and gRPC's own thread pool settle during warm-up, so fds and threads are judged as
    "the most seen in the last third of the run" against "the most seen in the first half": a leak grows
    past anything seen earlier, a pool that reached its size does not.
    """
    report.samples = [asdict(s) for s in samples]
    loaded = samples[:-1] or samples
    steady = [s for s in loaded if s.t >= report.warmup_s] or loaded[-1:]
    half = report.warmup_s + (report.duration_s - report.warmup_s) / 2
    last_third = report.duration_s - (report.duration_s - report.warmup_s) / 3
    first = [s for s in loaded if 0 < s.t <= half] or loaded[:1]
    last = [s for s in loaded if s.t >= last_third] or loaded[-1:]
    base, end = steady[0], loaded[-1]
    report.rss_mb_baseline, report.rss_mb_end = round(base.rss_kb / 1024, 1), round(end.rss_kb / 1024, 1)
    report.rss_mb_max = round(max(s.rss_kb for s in samples) / 1024, 1)
    report.rss_growth_mb = round((end.rss_kb - base.rss_kb) / 1024, 1)
    if len(steady) >= 3 and steady[-1].t > steady[0].t:
        ts = [s.t for s in steady]
        report.rss_slope_mb_per_min = round(
            statistics.linear_regression(ts, [s.rss_kb / 1024 for s in steady]).slope * 60, 2
        )
    report.fds_baseline, report.fds_end = max(s.fds for s in first), max(s.fds for s in last)
    report.fds_max, report.fds_after_load = max(s.fds for s in samples), samples[-1].fds
    own = [s.threads - s.grpc_threads for s in first], [s.threads - s.grpc_threads for s in last]
    report.threads_baseline, report.threads_end = max(own[0]), max(own[1])
    report.threads_max = max(s.threads for s in samples)
    report.grpc_threads_baseline = max(s.grpc_threads for s in first)
    report.grpc_threads_end = max(s.grpc_threads for s in last)
    ends = [s for s in samples if s.t >= report.warmup_s] or samples
    report.log_mb = round(samples[-1].log_bytes / 2**20, 3)
    if len(ends) >= 2 and ends[-1].t > ends[0].t:
        report.log_mb_per_min = round(
            (ends[-1].log_bytes - ends[0].log_bytes) / 2**20 / (ends[-1].t - ends[0].t) * 60, 3
        )
    m = report.metrics
    if report.log_mb_per_min > report.max_log_mb_per_min:
        report.problems.append(
            f"server log grew {report.log_mb_per_min} MB/min after warm-up "
            f"(bound {report.max_log_mb_per_min}; {report.log_mb} MB in all)"
        )
    if report.wrong_answers:
        report.problems.append(f"{report.wrong_answers} wrong answers")
    if report.unexpected:
        report.problems.append(f"unexpected statuses: {report.unexpected}")
    # Messages of cancelled streams that were sent but not answered may have been counted by the server
    # (OK if it finished them, CANCELLED if not) or never read: they are the only slack allowed.
    slack = report.unanswered
    if m.get("failures", 0) != report.bad_sent:
        report.problems.append(
            f"/metrics failures {m.get('failures', 0):.0f} != bad requests sent {report.bad_sent}"
        )
    if not report.bad_sent <= m.get("not_ok", 0) <= report.bad_sent + slack:
        report.problems.append(
            f"/metrics non-OK requests {m.get('not_ok', 0):.0f} != bad requests {report.bad_sent}"
            + (f" (+ up to {slack} unanswered)" if slack else "")
        )
    if not report.good_sent <= m.get("ok", 0) <= report.good_sent + slack:
        report.problems.append(
            f"/metrics OK requests {m.get('ok', 0):.0f} != good requests {report.good_sent}"
            + (f" (+ up to {slack} unanswered)" if slack else "")
        )
    if report.fds_end > report.fds_baseline:
        report.problems.append(f"open fds grew {report.fds_baseline} -> {report.fds_end}")
    if report.threads_end > report.threads_baseline:
        report.problems.append(f"threads grew {report.threads_baseline} -> {report.threads_end}")
    if report.grpc_threads_end > report.grpc_threads_baseline + GRPC_THREAD_ALLOWANCE:
        report.problems.append(
            f"gRPC threads grew {report.grpc_threads_baseline} -> {report.grpc_threads_end}"
        )
    if report.exit_code != 0:
        report.problems.append(f"server exit code {report.exit_code}")


def render(report: Report) -> str:
    lines = [
        f"soak: model {report.model}, {report.duration_s:.0f} s (warm-up {report.warmup_s:.0f} s), "
        f"concurrency {report.concurrency}",
        f"requests {report.requests} ({report.throughput_rps} req/s): good {report.good_sent} "
        f"({report.images_ok} images), bad {report.bad_sent}, wrong answers {report.wrong_answers}, "
        f"unexpected statuses {sum(report.unexpected.values())}",
        f"streams {report.streams} ({report.stream_messages} messages answered, "
        f"{report.streams_cancelled} cancelled by the client, {report.unanswered} messages unanswered)",
        f"/metrics: OK {report.metrics.get('ok', 0):.0f}, non-OK {report.metrics.get('not_ok', 0):.0f}, "
        f"failures {report.metrics.get('failures', 0):.0f}, images {report.metrics.get('images', 0):.0f}",
        f"RSS MB: baseline {report.rss_mb_baseline}, end {report.rss_mb_end}, max {report.rss_mb_max}, "
        f"growth {report.rss_growth_mb} ({report.rss_slope_mb_per_min} MB/min after warm-up)",
        f"open fds: first half {report.fds_baseline}, last third {report.fds_end}, "
        f"after load {report.fds_after_load}; "
        f"threads (besides gRPC's pool): first half {report.threads_baseline}, last third "
        f"{report.threads_end}; gRPC's pool: {report.grpc_threads_baseline} -> {report.grpc_threads_end}; "
        f"total max {report.threads_max}",
        f"server log {report.log_mb} MB, {report.log_mb_per_min} MB/min after warm-up "
        f"(bound {report.max_log_mb_per_min})",
        f"server exit code {report.exit_code}",
        "PASS" if not report.problems else "FAIL: " + "; ".join(report.problems),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the memory baseline is taken (default 10%% of the duration, 2..30)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between /proc samples")
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--model", default=None, help="model name (default: the first in the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-log-mb-per-min",
        type=float,
        default=1.0,
        help="fail when the server log grows faster than this after warm-up (default 1.0)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the full report (with samples) here")
    parser.add_argument(
        "--stream-workers",
        type=int,
        default=None,
        help="how many of the concurrent clients run streams (default concurrency/8, at least 2; 0 = none)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    report = soak(
        args.model_repository,
        args.model,
        args.duration,
        args.concurrency,
        args.warmup,
        args.interval,
        args.seed,
        args.max_log_mb_per_min,
        args.stream_workers,
    )
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
