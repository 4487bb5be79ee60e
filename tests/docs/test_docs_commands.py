"""The sessions of the README and the getting-started page run as written against a live server.

Each page's ```console blocks (format in ``pages.py``) run in one bash session in an empty folder, with the
venv's ``convserve`` and ``python`` first on PATH, ``CONVSERVE_SERVER`` at the test server's gRPC port (the
CLI's documented default address is what the variable overrides) and ``localhost:8000`` rewritten to its
REST port. Beyond matching what the pages show, what the commands printed is checked against independent
references: the model's config, and a fresh ONNX Runtime session fed by the server's preprocessing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .pages import ROOT, Ran, check, console_commands, read, run_console, section

BUNDLED = ROOT / "model_repository"
MODEL = BUNDLED / "digits_lenet"
DOCUMENTED_REST = "localhost:8000"
PAGES = ("README.md", "docs/getting-started.md")


def _reference_probabilities(image: Path, run_reference: Any) -> np.ndarray:
    from convserve.common.model_config import load_config
    from convserve.server.runtime.preprocess import image_to_array

    x = image_to_array(Image.open(image), load_config(MODEL))[None]
    logits = run_reference(MODEL / "1" / "model.onnx", x)[0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _check_against_references(ran: Ran, workdir: Path, run_reference: Any) -> None:
    command, out = ran.command.command, ran.output
    config = json.loads((MODEL / "config.json").read_text())
    if command == "convserve models":
        name, version, state, provider, _, spec, *_ = out[1].split()
        assert (name, state, provider) == ("digits_lenet", "ready", "CPUExecutionProvider")
        assert spec == "float32[" + "x".join(map(str, config["input"]["shape"])) + "]"
        assert int(version) == max(int(p.name) for p in MODEL.iterdir() if p.name.isdigit())
    elif command.startswith("convserve classify digit.png") and not ran.command.fails:
        probabilities = _reference_probabilities(workdir / "digit.png", run_reference)
        best = int(np.argmax(probabilities))
        if "--json" in command:
            predictions = json.loads(out[0])["predictions"]
            assert [p["index"] for p in predictions][:1] == [best]
            for p in predictions:
                assert p["probability"] == pytest.approx(probabilities[p["index"]], abs=1e-5)
        else:
            label = out[1].split()[1]
            assert label == config["labels"][best]
            assert label == ran.command.shown[1].split()[1], "the page names the label the model gives"
    elif "/v2/models/digits_lenet/infer" in command and "application/json" in command:
        (output,) = json.loads(out[0])["outputs"]
        expected = run_reference(MODEL / "1" / "model.onnx", np.zeros((1, 1, 28, 28), np.float32))
        np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]), expected, atol=1e-4)
    elif command.startswith("curl -s localhost:8000/v2/models/digits_lenet;"):
        metadata = json.loads(out[0])
        assert metadata["inputs"][0]["shape"] == [-1, *config["input"]["shape"]]


@pytest.mark.parametrize("page", PAGES)
def test_console_sessions_run_as_shown(
    page: str, server_factory: Any, tmp_path: Path, run_reference: Any
) -> None:
    from convserve.testing.prerequisites import require_binary

    require_binary("curl", "curl is not installed (make system-deps)")
    commands = console_commands(read(page))
    assert any(c.command.startswith("convserve classify") for c in commands), "it classifies an image"
    assert any(DOCUMENTED_REST in c.command for c in commands), "the session makes a v2 REST call"
    handle = server_factory(model_repository=BUNDLED)
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}:{os.environ['PATH']}", "CONVSERVE_SERVER": handle.address}
    ran = run_console(commands, tmp_path, env, {DOCUMENTED_REST: f"127.0.0.1:{handle.http_port}"})
    for result in ran:
        check(result)
        _check_against_references(result, tmp_path, run_reference)


def test_every_console_session_is_run_by_a_test() -> None:
    """A ```console block promises that its commands run as shown, so only pages a test runs have one."""
    run_elsewhere = {"docs/rest.md": ("Examples with curl", "tests/server/rest/test_rest_page_commands.py")}
    pages = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
    for page in pages:
        commands = console_commands(read(page))
        if page in run_elsewhere:
            title, test = run_elsewhere[page]
            assert commands == console_commands(section(read(page), title)), f"{test} runs only {title!r}"
        else:
            assert page in PAGES or not commands, f"{page} has console sessions that no test runs"
