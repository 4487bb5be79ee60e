"""Server RSS under rejected max-size messages: start, peak, and how fast it comes back when idle.

Starts ``python -m convserve.server`` on loopback (optionally token-protected), has ``--senders`` clients
send ``--messages`` messages of nearly ``max_message_bytes`` in all, each refused (an encoded image over
max_image_bytes on Classify, a raw tensor of the wrong size on v2 ModelInfer; UNAUTHENTICATED when
``--no-token`` hits a token server), then samples the server's RSS each 0.1 s for ``--idle`` seconds.
Linux only (reads /proc). Prints one JSON object::

    python -m benchmarks.memory_rejected --messages 60 --senders 4 [--token] [--no-token] [--env K=V]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

MiB = 1024 * 1024


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (10**6 bytes), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _requests(size: int) -> tuple[Any, Any]:
    from convserve.protos.convserve.v1 import classifier_pb2 as pb
    from convserve.protos.inference import grpc_service_pb2 as v2pb

    blob = b"\x89PNG" + b"\0" * (size - 4)
    classify = pb.ClassifyRequest(model="digits_lenet", images=[pb.Image(encoded=blob)])
    inp = v2pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    v2 = v2pb.ModelInferRequest(model_name="digits_lenet", inputs=[inp], raw_input_contents=[blob])
    return classify, v2


def run(
    repository: str,
    messages: int = 60,
    senders: int = 4,
    token: bool = False,
    send_token: bool = True,
    idle: float = 10.0,
    env: dict[str, str] | None = None,
    max_message_bytes: int = 64 * MiB,
) -> dict[str, Any]:
    """Start a server, send the messages, watch RSS; return the figures (MB) and the status codes seen."""
    from convserve.protos.convserve.v1 import classifier_pb2_grpc
    from convserve.protos.inference import grpc_service_pb2_grpc
    from convserve.testing import child_env, loopback_command

    secret = "memory-benchmark-token"
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "ports.json"
        flags = ["--model-repository", repository, "--max-message-bytes", str(max_message_bytes)]
        extra = dict(env or {})
        if token:
            extra["CONVSERVE_AUTH_TOKENS"] = secret
        proc = subprocess.Popen(
            loopback_command(port_file, *flags, metrics_port=-1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(extra),
        )
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
            address = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
            metadata = (("authorization", f"Bearer {secret}"),) if token and send_token else ()
            opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            with grpc.insecure_channel(address, opts) as ch:
                grpc.channel_ready_future(ch).result(timeout=60)
                classifier = classifier_pb2_grpc.ClassifierStub(ch)
                _wait_serving(ch)
                time.sleep(1.0)  # let the server settle after loading its models
                start = rss_mb(proc.pid)
                peak = [start]
                codes: dict[str, int] = {}
                lock = threading.Lock()
                stop_sampling = threading.Event()

                def sample() -> None:
                    while not stop_sampling.wait(0.05):
                        value = rss_mb(proc.pid)
                        with lock:
                            peak[0] = max(peak[0], value)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                classify, v2 = _requests(max_message_bytes - 64 * 1024)
                v2stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
                counter = iter(range(messages))

                def send() -> None:
                    for i in counter:
                        call = classifier.Classify if i % 2 == 0 else v2stub.ModelInfer
                        request = classify if i % 2 == 0 else v2
                        try:
                            call(request, timeout=60, metadata=metadata)
                            code = "OK"
                        except grpc.RpcError as err:
                            code = err.code().name
                        with lock:
                            codes[code] = codes.get(code, 0) + 1

                t0 = time.monotonic()
                threads = [threading.Thread(target=send) for _ in range(senders)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(600)
                sent_s = time.monotonic() - t0
                after: list[tuple[float, float]] = []
                t1 = time.monotonic()
                while (elapsed := time.monotonic() - t1) < idle:
                    after.append((round(elapsed, 2), rss_mb(proc.pid)))
                    time.sleep(0.1)
                stop_sampling.set()
                sampler.join(5)
                # The server still answers a good request afterwards (with the token, if it needs one).
                good = "OK"
                auth = (("authorization", f"Bearer {secret}"),) if token else ()
                try:
                    classifier.Classify(_good_request(), timeout=30, metadata=auth)
                except grpc.RpcError as err:
                    good = err.code().name
            end = rss_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    first_within = next((t for t, v in after if v <= start + 300), None)
    return {
        "messages": messages,
        "senders": senders,
        "token": token,
        "send_token": send_token,
        "env": env or {},
        "codes": codes,
        "good_request_after": good,
        "send_seconds": round(sent_s, 2),
        "rss_start_mb": round(start, 1),
        "rss_peak_mb": round(max(peak[0], *(v for _, v in after)), 1),
        "rss_after_1s_mb": round(next((v for t, v in after if t >= 1.0), end), 1),
        "rss_after_idle_mb": round(end, 1),
        "back_within_300mb_after_s": first_within,
    }


def _wait_serving(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    serving = health_pb2.HealthCheckResponse.SERVING
    while stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != serving:
        if time.monotonic() > deadline:
            raise TimeoutError("server not SERVING")
        time.sleep(0.1)


def _good_request() -> Any:
    from convserve.protos.convserve.v1 import classifier_pb2 as pb

    zeros = bytes(4 * 28 * 28)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 28, 28], data=zeros)
    return pb.ClassifyRequest(model="digits_lenet", images=[pb.Image(tensor=tensor)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bundled = Path(__file__).resolve().parents[1] / "model_repository"
    parser.add_argument("--model-repository", default=str(bundled))
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--token", action="store_true", help="the server requires a bearer token")
    parser.add_argument("--no-token", action="store_true", help="clients send none (with --token)")
    parser.add_argument("--env", action="append", default=[], help="K=V for the server's environment")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    report = run(
        args.model_repository, args.messages, args.senders, args.token, not args.no_token, args.idle, env
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
