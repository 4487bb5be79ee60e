"""Generate the Python stubs for every .proto under protos/ (run as `make protos`).

protoc writes absolute imports that follow the .proto path (``from convserve.v1 import x_pb2``);
the stubs live inside the ``convserve.protos`` package, so those imports are rewritten to
relative ones. The staleness test calls ``generate`` into a temporary folder and compares.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
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


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out_root`` (mirroring the tree) and return the files written."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *files,
        ]
        if protoc.main(args) != 0:
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
