"""Generate the Python stubs for every .proto under protos/ (run as `make protos`).

protoc writes absolute imports that follow the .proto path (``from convserve.v1 import x_pb2``);
the stubs live inside the ``convserve.protos`` package, so those imports are rewritten to
relative ones. The staleness test calls ``generate`` into a temporary folder and compares.

The generator is pinned (scripts/protoc-requirements.txt): protoc stamps its own version into every stub
and the stubs refuse older runtimes, so the stubs must come from one pinned grpcio-tools whose version is
pyproject's grpcio/protobuf floor, not from whatever the developer's venv holds. ``generate`` runs protoc
from a dedicated venv, .venv-protoc, created on first use from the pip cache.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
REQUIREMENTS = ROOT / "scripts" / "protoc-requirements.txt"
TOOLS_VENV = ROOT / ".venv-protoc"
_IMPORT = re.compile(r"^from ((?:[a-z_0-9]+\.)*[a-z_0-9]+) import (\w+_pb2) as (\w+)$", re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(p for p in proto_root.rglob("*.proto"))


def _relativize(source: str, own_package: str) -> str:
    def repl(match: re.Match[str]) -> str:
        package, module, alias = match.groups()
        if package.startswith("google."):
            return match.group(0)
        if package == own_package:
            return f"from . import {module} as {alias}"
        up = own_package.count(".") + 1
        return f"from {'.' * (up + 1)}{package} import {module} as {alias}"

    return _IMPORT.sub(repl, source)


def pinned_tools() -> str:
    """The grpcio-tools requirement line from scripts/protoc-requirements.txt."""
    lines = [ln.strip() for ln in REQUIREMENTS.read_text().splitlines()]
    return next(ln for ln in lines if ln and not ln.startswith("#"))


def tools_python() -> Path:
    """The interpreter of .venv-protoc, created (and the pinned grpcio-tools installed) when missing."""
    python = TOOLS_VENV / "bin" / "python"
    stamp = TOOLS_VENV / ".installed"
    if not stamp.is_file() or stamp.read_text() != pinned_tools():
        venv.create(TOOLS_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", REQUIREMENTS],
            check=True,
            timeout=600,
        )
        stamp.write_text(pinned_tools())
    return python


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out_root`` (mirroring the tree) and return the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
        # protoc runs in the pinned tools venv; its well-known-type protos (-I) come from there too.
        script = (
            "import sys, pathlib; from grpc_tools import protoc; "
            "inc = pathlib.Path(protoc.__file__).parent / '_proto'; "
            "sys.exit(protoc.main(['grpc_tools.protoc', f'-I{inc}'] + sys.argv[1:]))"
        )
        args = [
            f"-I{proto_root}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *files,
        ]
        done = subprocess.run([str(tools_python()), "-c", script, *args], timeout=300)
        if done.returncode != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted(Path(tmp).rglob("*.py*")):
            rel = path.relative_to(tmp)
            package = ".".join(rel.parent.parts)
            text = _relativize(path.read_text(), package)
            target = out_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out) if args.out != PROTO_ROOT else path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
