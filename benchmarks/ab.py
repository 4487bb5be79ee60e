"""Interleaved A/B of server variants (LeNet or ResNet-18, any request batch): ``python -m benchmarks.ab``.

Every variant (convserve with extra CLI flags, and the plain baseline) stays up for the whole run and the
rounds alternate between them, so load from elsewhere on a shared box hits all variants alike; medians
over rounds are printed, with each variant's throughput as a ratio of the baseline's in the same round.

    python -m benchmarks.ab --variant "default=" --variant "intra1=--intra-op-threads 1" -C 1,32 --rounds 4
    python -m benchmarks.ab --model resnet -C 1,8 --variant "spin=" --variant "never=--spin-above-us -1"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import models
from .run import Case, _process, baseline_server, drive


def _convserve(
    repository: Path, work: Path, name: str, extra: list[str]
) -> contextlib.AbstractContextManager:
    port_file = work / f"ab-{name}-{time.monotonic_ns()}.json"
    # Leading "@switch=S" / "@opt=KEY=VALUE" / "@env=KEY=VALUE" flags run the server with
    # sys.setswitchinterval(S), extra grpc.aio server options or an environment variable: experiments
    # that need no server setting. "@path=DIR" runs the server from the convserve packages under DIR (a
    # baseline checkout laid out as DIR/convserve/<package>), to compare code before and after a change.
    pre = []
    while extra and extra[0].startswith("@"):
        key, _, value = extra.pop(0)[1:].partition("=")
        if key == "switch":
            pre.append(f"sys.setswitchinterval({float(value)})")
        elif key == "env":  # an environment variable set in the server process before it starts
            k, _, v = value.partition("=")
            pre.append(f"import os; os.environ[{k!r}] = {v!r}")
        elif key == "path":
            pre.append(f"sys.path.insert(0, {value!r})")
        elif key == "opt":
            k, _, v = value.partition("=")
            pre.append(f"_o.append(({k!r}, {int(v) if v.lstrip('-').isdigit() else v!r}))")
    launch = ["-m", "convserve.server"]
    if pre:
        launch = ["-c", "import sys, runpy, grpc.aio; _o = []; _s = grpc.aio.server; "
                  "grpc.aio.server = lambda *a, options=(), **k: _s(*a, options=[*options, *_o], **k); "
                  + "; ".join(pre) + "; sys.argv[0] = 'convserve'; "
                  "runpy.run_module('convserve.server', run_name='__main__')"]
    cmd = [sys.executable, *launch, "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "-1",
           "--model-repository", str(repository), "--port-file", str(port_file),
           "--metrics-port", "-1", "--log-level", "WARNING", *extra]
    return _process(cmd, port_file, work / "servers.log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=EXTRA-SERVER-FLAGS (metrics are off unless the flags turn them on)")
    p.add_argument("-C", "--concurrency", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--api", default="classify", choices=("classify", "v2", "stream"))
    p.add_argument("--model", default="lenet", choices=("lenet", "resnet"))
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--baseline", default="plain", choices=("plain", "sync"),
                   help="plain: grpc.aio + session.run in the default executor; sync: grpc's thread-pool "
                   "server running a one-thread session inline (benchmarks/baseline_server.py)")
    p.add_argument("--no-baseline", action="store_true")
    a = p.parse_args(argv)
    variants = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in a.variant or ["convserve="]]
    conc = [int(c) for c in a.concurrency.split(",")]
    repository = Path("bench_results/models")
    repository.mkdir(parents=True, exist_ok=True)
    if a.model == "resnet":
        models.prepare_resnet(repository)
    else:
        models.prepare_lenet(repository)
    model = models.RESNET if a.model == "resnet" else models.LENET
    from convserve.common.model_config import load_config

    shape = tuple(load_config(repository / model).input.shape)
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="convserve-ab-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        targets = {name: stack.enter_context(_convserve(repository, work, name, extra))
                   for name, extra in variants}
        if not a.no_baseline:
            targets["baseline"] = stack.enter_context(
                baseline_server(a.baseline, models.model_file(repository, model), work))
        for rnd in range(a.rounds):
            for c in conc:
                order = list(targets) if rnd % 2 == 0 else list(reversed(targets))
                for name in order:
                    api = "classify" if name == "baseline" and a.api == "stream" else a.api
                    case = Case(name, model, api, a.batch, c)
                    res, cpu = drive(targets[name], case, shape, a.warmup, a.duration, 1, work)
                    sm = res.summary()
                    cpu_us = 1e6 * cpu / max(1, int(sm["requests"]))  # server CPU per request, all threads
                    results.setdefault((name, c), []).append(
                        (sm["images_per_s"], sm["p50_ms"], sm["p99_ms"], cpu_us))
                    print(f"round {rnd + 1} C={c:<3} {name:<12} {sm['images_per_s']:8.0f} img/s "
                          f"p50 {sm['p50_ms']:.2f} p99 {sm['p99_ms']:.2f} ms  cpu {cpu_us:5.0f} us/req  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nmedians over {a.rounds} rounds ({a.model}, {a.batch} image(s) per request, {a.api}; "
          "ratio = img/s over the baseline's in the same round)")
    for c in conc:
        for name in targets:
            rs = results[(name, c)]
            ips, p50, p99, cpu_us = (float(np.median([r[i] for r in rs])) for i in range(4))
            ratio = ""
            if "baseline" in targets and name != "baseline":
                base = results[("baseline", c)]
                ratio = f"  x{np.median([r[0] / b[0] for r, b in zip(rs, base, strict=True)]):.2f}"
            print(f"C={c:<3} {name:<12} {ips:8.0f} img/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  "
                  f"cpu {cpu_us:5.0f} us/req{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
