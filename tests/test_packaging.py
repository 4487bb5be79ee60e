"""Packaging as a user meets it: `convserve --version`, one `error:` line naming the extra a command
needs when it is missing, extras that never install two ONNX Runtimes, and the declared metadata."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import metadata, requires, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _convserve(tmp_path: Path, *args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The `convserve` command in a child process with ``blocked`` modules made unimportable, as when
    the extra that brings them is not installed."""
    runner = tmp_path / "convserve_runner.py"
    runner.write_text(
        "import sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ModuleNotFoundError\n"
        "from convserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True, timeout=60)


def test_version_flag_prints_the_installed_version(tmp_path: Path) -> None:
    result = _convserve(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"convserve {version('convserve')}"


@pytest.mark.parametrize(
    ("command", "blocked", "extra"),
    [
        (["serve", "--model-repository", str(ROOT / "model_repository")], "grpc_reflection", "server"),
        (["serve", "--model-repository", str(ROOT / "model_repository")], "onnxruntime", "server"),
        (["archs"], "torch", "train"),
        (["train", "--epochs", "1"], "torch", "train"),
        (["quantize", str(ROOT / "model_repository" / "digits_lenet")], "onnx", "train"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    tmp_path: Path, command: list[str], blocked: str, extra: str
) -> None:
    result = _convserve(tmp_path, *command, blocked=(blocked,))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: convserve {command[0]} needs the {extra} extra")
    assert repr(blocked) in line and f"pip install 'convserve[{extra}]'" in line


def test_a_missing_convserve_module_is_a_bug_not_an_extra(tmp_path: Path) -> None:
    result = _convserve(tmp_path, "serve", blocked=("convserve.server.app",))
    assert result.returncode != 0 and "Traceback" in result.stderr  # kept loud: not the user's fault


def _extra(name: str) -> list[str]:
    return [r.split(";")[0].strip() for r in requires("convserve") or [] if f'extra == "{name}"' in r]


def test_gpu_serving_extra_replaces_the_cpu_onnx_runtime() -> None:
    def runtimes(extra: str) -> set[str]:
        found: set[str] = set()
        for req in _extra(extra):
            if inner := re.match(r"convserve\[([\w,-]+)\]", req):
                for e in inner[1].split(","):
                    found |= runtimes(e)
            elif req.startswith("onnxruntime"):
                found.add(re.split(r"[<>=!~ ]", req, maxsplit=1)[0])
        return found

    assert runtimes("server") == {"onnxruntime"}
    assert runtimes("server-gpu") == {"onnxruntime-gpu"}
    assert runtimes("server-base") == set()
    assert "gpu" not in (metadata("convserve").get_all("Provides-Extra") or [])  # the old additive extra


def test_metadata_declares_an_osi_license_and_classifiers() -> None:
    meta = metadata("convserve")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3" in classifiers
    requires_python = meta["Requires-Python"]
    minimum = re.fullmatch(r">=3\.(\d+)", requires_python)
    assert minimum is not None
    versions = [int(c.rsplit(".", 1)[1]) for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c)]
    assert versions and min(versions) == int(minimum[1])  # classifiers start where Requires-Python does


def test_the_wheel_carries_the_bundled_model(tmp_path: Path) -> None:
    """A bare `convserve serve` from a wheel serves the bundled digits model: it is package data."""
    import shutil

    # A clean copy: setuptools would reuse a stale build/ folder of the working tree.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import zipfile

    (wheel,) = tmp_path.glob("convserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    files = [p for p in (ROOT / "model_repository").rglob("*") if p.is_file()]
    bundled = {f"convserve/{p.relative_to(ROOT).as_posix()}" for p in files}
    assert bundled and bundled <= names, sorted(bundled - names)


def test_make_serve_installs_only_the_serving_extra(tmp_path: Path) -> None:
    """`make serve` on a fresh clone installs convserve[server] (no torch, no test tools); `make test` the
    dev extra. Read from make's own dry run against a venv that does not exist yet."""
    venv = tmp_path / "venv"

    def dry_run(target: str) -> str:
        out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout

    serve = dry_run("serve")
    assert "pip install -q -e '.[server]'" in serve and "[dev]" not in serve, serve
    assert "convserve serve" in serve
    assert "pip install -q -e '.[dev]'" in dry_run("test")
    server_extra = [r for r in requires("convserve") or [] if 'extra == "server"' in r]
    assert server_extra and not any(r.split(";")[0].strip().startswith("torch") for r in server_extra)
