"""CI step (`make test`): install the LOWEST versions the SDK declares and run the SDK tests against them.

pyproject.toml's base dependencies (grpcio, protobuf, numpy, grpcio-health-checking) are pinned to their
``>=`` floors with a pip constraints file; the server extra and the test tools resolve around them. The
venv (.venv-floor) is kept between runs and rebuilt when pyproject.toml changes; convserve itself is
reinstalled from the working tree every run. Exits non-zero when the install or any SDK test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
FLOOR_VENV = ROOT / ".venv-floor"
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "onnx>=1.16")  # onnx builds the tests' tiny models
_FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)$")


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``name -> lowest version`` for each base dependency (each must be declared as ``name>=version``)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        match = _FLOOR.match(dep.strip())
        if match is None:
            raise SystemExit(f"pyproject.toml: base dependency {dep!r} is not of the form name>=version")
        out[match.group(1)] = match.group(2)
    return out


def _release(version: str) -> tuple[int, ...]:
    """"1.66" and "1.66.0" are the same release."""
    parts = [int(x) for x in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _pip(python: Path, *args: str, timeout: float = 600) -> None:
    subprocess.run([str(python), "-m", "pip", "-q", "--disable-pip-version-check", *args],
                   check=True, timeout=timeout)


def main() -> int:
    start = time.monotonic()
    pins = floors()
    python = FLOOR_VENV / "bin" / "python"
    stamp = FLOOR_VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "floor.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        if not stamp.is_file() or stamp.read_text() != digest:
            venv.create(FLOOR_VENV, with_pip=True, clear=True)
            _pip(python, "install", "-c", str(constraints), f"{ROOT}[server]", *TEST_TOOLS)
            stamp.write_text(digest)
        else:
            _pip(python, "install", "--no-deps", "--force-reinstall", str(ROOT))
    got = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json, sys; "
         "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))", *pins],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    print(f"dependency floor: {got.strip()}")
    wrong = {n: v for n, v in json.loads(got).items() if _release(v) != _release(pins[n])}
    if wrong:
        print(f"error: the floor venv has {wrong}, not the declared floors {pins}", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [str(python), "-m", "pytest", "tests/client", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT, env=env, timeout=900,
    )
    print(f"dependency floor: SDK tests {'passed' if done.returncode == 0 else 'FAILED'} "
          f"in {time.monotonic() - start:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
