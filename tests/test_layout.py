"""Package layering: client/ never imports server/ or models/; models/ may import the shared contract
(convserve.common) but not the server; common/ imports none of them. Read from the source (every
import statement, those inside functions included), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "convserve"
# package folder → convserve packages its modules must never import
FORBIDDEN = {
    "client": {"convserve.server", "convserve.models", "convserve.cli", "convserve.testing"},
    "models": {"convserve.server", "convserve.cli", "convserve.testing"},
    "common": {
        "convserve.client", "convserve.server", "convserve.models", "convserve.cli", "convserve.testing",
    },
    "server": {"convserve.models", "convserve.cli", "convserve.testing", "convserve.client"},
}
# The one known crossing, on purpose: training, evaluation and inspection run the server's own
# preprocessing (image_to_array, decode_image and the InvalidInputError it raises) so that they see images
# exactly as serving does (models/data.py, models/inspection.py). It loads lazily, inside functions.
# The second, as deliberate: `convserve quantize` checks its int8 graph with the server's own load check,
# the one `convserve import` runs (models/quantize.py).
ALLOWED = {
    "convserve.server.repository.importer",
    "convserve.server.repository.importer.ImportModelError",
    "convserve.server.repository.importer.verify",
    "convserve.server.runtime.preprocess",
    "convserve.server.runtime.preprocess.image_to_array",
    "convserve.server.runtime.preprocess.decode_image",
    "convserve.server.errors",
    "convserve.server.errors.InvalidInputError",
}


def imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved within ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = f"convserve.{package}".split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_import_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ..server import app\n    import convserve.models.cli\n")
    found = imports(source, "client")
    assert "convserve.server.app" in found and "convserve.models.cli" in found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    offences = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in sorted(imports(path, package)):
            if name not in ALLOWED and any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


# Inside server/: the front ends convert and call the core; neither calls the other, and nothing below
# them (core, runtime, repository, observability and the shared modules) reaches up into a front end or
# into the processes that run the app.
FRONT_ENDS = {"grpc", "rest"}
ABOVE_THE_CORE = {"grpc", "rest", "app", "cli", "__main__", "processes"}
SERVER = PACKAGE / "server"


def _server_unit(path: Path) -> str:
    """The sub-package (core, grpc, ...) or top module (app, calls, ...) ``path`` belongs to."""
    parts = path.relative_to(SERVER).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _server_units_imported(path: Path) -> set[str]:
    package = "server." + ".".join(path.relative_to(SERVER).parts[:-1])
    prefix = "convserve.server."
    return {n[len(prefix):].split(".")[0] for n in imports(path, package.rstrip(".")) if n.startswith(prefix)}


def test_server_units_reader_sees_relative_imports_from_sub_packages() -> None:
    assert {"core", "calls", "errors"} <= _server_units_imported(SERVER / "rest" / "routes.py")
    assert {"core", "observability"} <= _server_units_imported(SERVER / "grpc" / "inference_v2.py")


def test_front_ends_call_the_core_and_never_each_other_or_upward() -> None:
    offences = []
    for path in sorted(SERVER.rglob("*.py")):
        unit = _server_unit(path)
        reached = _server_units_imported(path) - {unit}
        if unit in FRONT_ENDS:
            bad = reached & (FRONT_ENDS | {"app", "cli", "__main__", "processes"})
        elif unit in ABOVE_THE_CORE:
            continue
        else:
            bad = reached & ABOVE_THE_CORE
        offences += [f"{path.relative_to(ROOT)} ({unit}) imports server.{b}" for b in sorted(bad)]
    assert not offences, "\n".join(offences)


def test_server_shows_its_layers_with_few_modules_at_its_top() -> None:
    top = sorted(p.name for p in SERVER.glob("*.py"))
    assert len(top) <= 12, top
