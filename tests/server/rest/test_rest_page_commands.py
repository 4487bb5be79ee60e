"""The REST page's examples run as written (curl and bash, then tritonclient.http) against a live server.

The curl session's answers are checked against what the page shows, against ONNX Runtime in-process (the
JSON tensor) and against the gRPC API's answer for the same PNG (the binary-tensor classification).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing.prerequisites import require_binary, require_module

from ...docs.pages import check, code_blocks, console_commands, read, run_console, section

ROOT = Path(__file__).resolve().parents[3]
PAGE = "docs/rest.md"
DOCUMENTED = "localhost:8000"
BUNDLED = ROOT / "model_repository"


@pytest.fixture
def bundled(server_factory: Any, tmp_path: Path, encode_png: Any) -> Any:
    handle = server_factory(model_repository=BUNDLED)
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "digit.png").write_bytes(encode_png(pixels))
    return handle


def test_curl_examples(bundled: Any, tmp_path: Path, run_reference: Any) -> None:
    require_binary("curl", "curl is not installed (make system-deps)")
    commands = console_commands(section(read(PAGE), "Examples with curl"))
    assert all(DOCUMENTED in c.command for c in commands if c.command.startswith("curl"))
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ran = run_console(commands, tmp_path, env, {DOCUMENTED: f"127.0.0.1:{bundled.http_port}"}, timeout=60)
    for result in ran:
        check(result)
    lines = [result.output[0] for result in ran if result.command.command.startswith("curl")]
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
    (code,) = code_blocks(section(read(PAGE), "With tritonclient.http"), "python")
    assert DOCUMENTED in code
    exec(compile(code.replace(DOCUMENTED, f"127.0.0.1:{bundled.http_port}"), "<REST example>", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(
        json.loads((BUNDLED / "digits_lenet" / "config.json").read_text())["max_batch_size"]
    )
    assert re.match(r"\[\[b'[0-9.]+:\d:\d'", printed[1])
