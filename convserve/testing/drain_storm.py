"""No-backoff clients across a SIGTERM: what each kind of client sees while a server subprocess drains.

Clients on both gRPC APIs and the REST front end call in tight loops (no back-off, no retries), each on
its own connection, from before the signal until the server has exited. Each call's outcome is counted
by API: a gRPC status name, an HTTP status, or the exception a REST call ended with. A drain must give
every call OK (it was already running) or UNAVAILABLE / 503 / a refused connection, never CANCELLED,
and never a REST request lost on a connection the server closed under it.

    python -m convserve.testing.drain_storm --rounds 5   # the bundled digits_lenet model
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from convserve.testing.server_process import start_server_process

__all__ = ["APIS", "BAD", "drain_round"]

APIS = ("classify", "v2", "rest")
# Outcomes that must never happen during a drain: CANCELLED is not retried by clients or retry policies,
# and a REST request that loses its connection (no status) may or may not have run.
BAD = frozenset(("CANCELLED", "rest:RemoteDisconnected", "rest:ConnectionResetError", "rest:BrokenPipeError"))


def _grpc_client(
    api: str, address: str, model: str, shape: Sequence[int], stop: threading.Event, out: Counter[str]
) -> None:
    import grpc
    import numpy as np

    from convserve.protos.convserve.v1 import classifier_pb2 as pb
    from convserve.protos.convserve.v1 import classifier_pb2_grpc
    from convserve.protos.inference import grpc_service_pb2 as v2pb
    from convserve.protos.inference import grpc_service_pb2_grpc

    data = np.zeros(shape, np.float32).tobytes()
    with grpc.insecure_channel(address) as channel:
        if api == "classify":
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(shape), data=data)
            request = pb.ClassifyRequest(model=model, images=[pb.Image(tensor=tensor)])
            call = stub.Classify
        else:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = v2pb.ModelInferRequest(model_name=model)
            request.inputs.add(name="input", datatype="FP32", shape=list(shape))
            request.raw_input_contents.append(data)
            call = stub.ModelInfer
        for _ in range(1_000_000):  # bounded; `stop` ends the loop
            if stop.is_set():
                return
            try:
                call(request, timeout=10)
                outcome = "OK"
            except grpc.RpcError as err:
                outcome = err.code().name
            out[outcome] += 1


def _rest_client(
    url: str, model: str, shape: Sequence[int], stop: threading.Event, out: Counter[str]
) -> None:
    host, _, port = url.removeprefix("http://").partition(":")
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": list(shape), "data": [0.0] * _size(shape)}
            ]
        }
    ).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for _ in range(1_000_000):  # bounded; `stop` ends the loop
            if stop.is_set():
                return
            fresh = conn.sock is None
            try:
                conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                outcome = f"rest:{response.status}"
                if response.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                # A reset on a fresh connection's first request: the kernel had queued the connection on
                # the listener, which closed before the server took it, so the request never reached it.
                reset_unseen = fresh and isinstance(exc, ConnectionResetError)
                outcome = "rest:reset-before-accept" if reset_unseen else f"rest:{type(exc).__name__}"
                conn.close()
            out[outcome] += 1
    finally:
        conn.close()


def _size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def drain_round(
    flags: Sequence[str],
    workdir: Path,
    model: str,
    shape: Sequence[int],
    *,
    clients_per_api: int = 2,
    warm_s: float = 0.5,
    timeout: float = 30.0,
) -> dict[str, Counter[str]]:
    """One server subprocess (``flags`` as for ``convserve serve``), ``clients_per_api`` no-backoff clients
    per API calling ``model`` with zero tensors of ``shape``; SIGTERM ``warm_s`` seconds after every client
    has had an answer, clients stop 0.3 s after the server exits. Returns each API's outcome counts."""
    server = start_server_process(flags, workdir)
    stop = threading.Event()
    counts: dict[str, list[Counter[str]]] = {api: [] for api in APIS}
    threads = []
    try:
        for api in APIS:
            for _ in range(clients_per_api):
                out: Counter[str] = Counter()
                counts[api].append(out)
                if api == "rest":
                    assert server.http_url is not None
                    target, args = _rest_client, (server.http_url, model, shape, stop, out)
                else:
                    target, args = _grpc_client, (api, server.address, model, shape, stop, out)  # type: ignore[assignment]
                threads.append(threading.Thread(target=target, args=args, daemon=True))
        for t in threads:
            t.start()
        # Every client has been answered at least once before the signal; then traffic flows for warm_s.
        deadline = time.monotonic() + timeout
        answered = ("OK", "rest:200")
        while not all(any(c[a] for a in answered) for cs in counts.values() for c in cs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every client was answered within {timeout} s: {counts}")
            time.sleep(0.01)
        time.sleep(warm_s)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout)
        server.stop(5)
    return {api: sum(cs, Counter()) for api, cs in counts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convserve.testing.drain_storm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--model", default="digits_lenet")
    p.add_argument("--shape", default="1,1,28,28", help="input tensor shape, batch first")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients-per-api", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/convserve-drain-storm")
    args = p.parse_args(argv)
    shape = [int(d) for d in args.shape.split(",")]
    total: Counter[str] = Counter()
    for r in range(args.rounds):
        got = drain_round(
            ["--model-repository", args.model_repository, "--drain-grace-seconds", "10"],
            Path(args.workdir),
            args.model,
            shape,
            clients_per_api=args.clients_per_api,
        )
        line = "; ".join(
            f"{api} " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())) for api, c in got.items()
        )
        print(f"round {r + 1}: {line}", flush=True)
        for api, c in got.items():
            total.update({f"{api}:{k}" if api != "rest" else k: v for k, v in c.items()})
    print("total: " + ", ".join(f"{k}={v}" for k, v in sorted(total.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
