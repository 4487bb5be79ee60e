"""Deployment files parsed once: Dockerfile, docker-compose.yml, the server's settings, scripts/run_stack.py.

The deploy tests compare these files with each other and with the code they configure, so a port, a
path or a setting renamed on one side fails a test instead of a deployment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from convserve.testing.prerequisites import require_binary

# tests/deploy/live runs the built image and compose stack: only `make test-deploy` (scripts/test_deploy.sh,
# the last step of `make test`) prepares the engine and images it needs; the plain pytest run leaves it out.
collect_ignore = [] if os.environ.get("DEPLOY_TEST_RUN_ID") else ["live"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    """One FROM stage of a Dockerfile: its name, base image and (instruction, arguments) pairs."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs, in order (later ones win, as in Docker)."""
        values: dict[str, str] = {}
        for args in self.args_of("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def exec_form(self, instruction: str) -> list[str]:
        """The JSON (exec) form of ENTRYPOINT/CMD; fails on the shell form, which would swallow SIGTERM."""
        (args,) = self.args_of(instruction)
        return json.loads(args)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs before the first FROM, with their defaults
    stages: dict[str, Stage]
    order: list[str]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args[m[1]], text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped (as Docker reads them)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments are dropped even inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    order: list[str] = []
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            base, _, name = rest.partition(" AS ")
            current = Stage(name.strip(), base.strip())
            stages[current.name] = current
            order.append(current.name)
        elif current is None:
            if instruction == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            current.instructions.append((instruction, rest))
    return Dockerfile(args, stages, order)


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def settings_env() -> dict[str, str]:
    """Every CONVSERVE_* variable the server's Settings reads → the setting's field name."""
    from convserve.server.settings import ENV_PREFIX, Settings

    names = {ENV_PREFIX + f.name.upper(): f.name for f in fields(Settings)}
    names[ENV_PREFIX + "CONFIG"] = "config"  # the config-file path, read by settings.resolve()
    return names


@pytest.fixture(scope="session")
def settings_from_env(settings_env: dict[str, str]) -> Any:
    """``settings_from_env(env)`` → the Settings the server would build from those variables alone.

    Fails when a CONVSERVE_* name is not one the server reads (it would be silently ignored) or a
    value does not parse (the server would refuse to start).
    """
    from convserve.server.settings import resolve

    def build(env: dict[str, Any]) -> Any:
        env = {str(k): str(v) for k, v in env.items()}
        unknown = sorted(k for k in env if k.startswith("CONVSERVE_") and k not in settings_env)
        assert not unknown, f"variables the server does not read: {unknown}"
        return resolve({}, env=env)

    return build


# The server's listening ports by the name the deployment files give them, as Settings fields.
PORT_SETTINGS = {"http": "http_port", "grpc": "grpc_port", "metrics": "metrics_port"}


@pytest.fixture(scope="session")
def served_ports() -> Any:
    """``served_ports(settings)`` → {"http": 8000, "grpc": 8001, "metrics": 8002}: every port the server
    listens on with those settings. Fails when one is disabled or ephemeral, which no deployment wants."""

    def ports(settings: Any) -> dict[str, int]:
        found = {name: getattr(settings, field) for name, field in PORT_SETTINGS.items()}
        assert all(port > 0 for port in found.values()), f"a port is disabled or ephemeral: {found}"
        return found

    return ports


@pytest.fixture(scope="session")
def rest_route() -> Any:
    """``rest_route(path)`` → (route name, answered without a token, answered while draining) for a GET
    path of the server's REST API, read from the server's own route table and edge rules."""
    from aiohttp import web

    from convserve.server.rest.edge import PROBES, PUBLIC
    from convserve.server.rest.routes import Routes

    app = web.Application()
    Routes(None, None, 0).add_to(app)  # type: ignore[arg-type]  # handlers are only registered
    names = {r.canonical: r.name for r in app.router.resources() if r.name}

    def route(path: str) -> tuple[str, bool, bool]:
        assert path in names, f"{path}: the server has no such REST route"
        name = names[path]
        return name, name in PUBLIC, name in PROBES

    return route


@pytest.fixture(scope="session")
def run_stack() -> ModuleType:
    """scripts/run_stack.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_stack", ROOT / "scripts" / "run_stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def system_binary() -> Any:
    """``system_binary(name, debian_path)``: skip where missing on a developer's machine, fail in CI."""

    def find(name: str, fallback: str) -> str:
        hint = f"{name} is not installed: `bash scripts/install_system_deps.sh` (apt-get install {name})"
        return require_binary(name, hint, fallback)

    return find
