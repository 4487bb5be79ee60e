"""The README's REST examples run as written (curl and bash, then tritonclient.http) against a live server.

The curl block's answers are checked against ONNX Runtime in-process (the JSON tensor) and against the
gRPC API's answer for the same PNG (the binary-tensor classification).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing.prerequisites import require_binary, require_module

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## v2 HTTP/REST API"
DOCUMENTED = "localhost:8000"
BUNDLED = ROOT / "model_repository"


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + len(SECTION) + 2)
    return text[start:end]


def _block(lang: str) -> str:
    (block,) = re.findall(rf"^```{lang}\n(.*?)^```", _section(), flags=re.S | re.M)
    return block


@pytest.fixture
def bundled(server_factory: Any, tmp_path: Path, encode_png: Any) -> Any:
    handle = server_factory(model_repository=BUNDLED)
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "digit.png").write_bytes(encode_png(pixels))
    return handle


def test_curl_examples(bundled: Any, tmp_path: Path, run_reference: Any) -> None:
    require_binary("curl", "curl is not installed (make system-deps)")
    script = _block("sh")
    assert DOCUMENTED in script
    script = script.replace(DOCUMENTED, f"127.0.0.1:{bundled.http_port}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert json.loads(lines[0]) == {"ready": True}
    metadata, config, logits, classes, stats = (json.loads(line) for line in lines[1:])

    cfg = json.loads((BUNDLED / "digits_lenet" / "config.json").read_text())
    assert metadata["name"] == "digits_lenet" and metadata["inputs"][0]["shape"] == [
        -1,
        *cfg["input"]["shape"],
    ]
    assert config["max_batch_size"] == cfg["max_batch_size"] and config["input"][0]["dims"] == [1, 28, 28]

    (out,) = logits["outputs"]
    expected = run_reference(
        BUNDLED / "digits_lenet" / "1" / "model.onnx", np.zeros((1, 1, 28, 28), np.float32)
    )
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), expected, atol=1e-4)

    (top,) = classes["outputs"]
    assert (top["datatype"], top["shape"]) == ("BYTES", [1, 3])
    from convserve.client import Client

    with Client(bundled.address) as client:
        sdk = client.classify(str(tmp_path / "digit.png"), model="digits_lenet", top_k=3)
    got = [entry.split(":") for entry in top["data"]]
    assert [int(index) for _, index, _ in got] == [p.index for p in sdk]
    assert [float(score) for score, _, _ in got] == pytest.approx([p.probability for p in sdk], abs=1e-5)

    (s,) = stats["model_stats"]
    assert s["inference_stats"]["success"]["count"] == 2 and s["inference_count"] == 2


def test_tritonclient_example(bundled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    require_module(
        "tritonclient", "tritonclient[http] is not installed (pip install -e '.[dev]')", module_level=False
    )
    code = _block("python")
    assert DOCUMENTED in code
    exec(compile(code.replace(DOCUMENTED, f"127.0.0.1:{bundled.http_port}"), "<REST example>", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(
        json.loads((BUNDLED / "digits_lenet" / "config.json").read_text())["max_batch_size"]
    )
    assert re.match(r"\[\[b'[0-9.]+:\d:\d'", printed[1])
