"""The committed stubs are exactly what `make protos` generates from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    gen = _generator()
    written = gen.generate(tmp_path)
    assert written, "protoc generated nothing"
    stale = []
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = ROOT / "protos" / rel
        if not committed.exists() or committed.read_text() != fresh.read_text():
            stale.append(str(rel))
    assert not stale, f"stubs are stale against protos/ (run `make protos`): {stale}"
    generated = {p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*_pb2*.py*")}
    orphans = sorted(str(p) for p in generated - {w.relative_to(tmp_path) for w in written})
    assert not orphans, f"stubs without a .proto: {orphans}"
