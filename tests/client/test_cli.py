"""`convserve classify | models | health` on a real server, in-process through main() and as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sdk_testing import GRAY, digit_pixels, preprocess

from convserve.cli import main


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_classify_prints_a_table(server: Any, reference: Any, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    files = [write_png(tmp_path / f"d{i}.png", digit_pixels(i)) for i in range(3)]
    code, out, err = run(capsys, "classify", *map(str, files), "--server", server.address, "--model", GRAY,
                         "--top-k", "2")
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split() == ["FILE", "LABEL", "PROB", "OTHERS"]
    expected = reference(np.stack([preprocess(digit_pixels(i)) for i in range(3)]))
    for path, row, probabilities in zip(files, rows, expected, strict=True):
        first, second = np.argsort(-probabilities)[:2]
        assert row.split()[:3] == [str(path), f"class_{first}", f"{probabilities[first]:.1%}"]
        assert row.endswith(f"class_{second} ({probabilities[second]:.1%})")


def test_classify_json_lines(server: Any, reference: Any, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_png(tmp_path / "d.png", digit_pixels(4))
    code, out, _ = run(capsys, "classify", str(path), "--server", server.address, "--model", GRAY, "--json")
    assert code == 0
    [line] = out.strip().splitlines()
    record = json.loads(line)
    assert (record["file"], record["model"], record["version"]) == (str(path), GRAY, 2)
    probabilities = reference(preprocess(digit_pixels(4))[None])[0]
    assert [p["index"] for p in record["predictions"]] == np.argsort(-probabilities).tolist()
    sent = [p["probability"] for p in record["predictions"]]
    np.testing.assert_allclose(sent, np.sort(probabilities)[::-1], atol=1e-6)


def test_models_lists_versions_inputs_and_providers(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "--server", server.address)
    assert code == 0
    rows = [line.split(None, 4) for line in out.strip().splitlines()]
    assert rows[0] == ["MODEL", "VERSION", "STATE", "PROVIDER", "INPUT"]
    assert ["gray", "2", "ready", "CPUExecutionProvider", "input float32[1x8x8] NCHW L"] in rows
    assert ["rgb", "1", "ready", "CPUExecutionProvider", "input float32[3x16x16] NCHW RGB"] in rows
    assert any(row[0] == "broken_onnx" and row[2].startswith("failed") for row in rows)
    code, out, _ = run(capsys, "models", "--server", server.address, "--json")
    records = {r["name"]: r for r in map(json.loads, out.strip().splitlines())}
    assert records[GRAY]["input"]["shape"] == [1, 8, 8] and len(records[GRAY]["labels"]) == 4


def test_models_cuts_failure_reasons_to_the_terminal_and_wide_shows_them_whole(
    server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "models", "--server", server.address, "--json")
    reason = next(
        v["reason"] for r in map(json.loads, out.strip().splitlines()) for v in r["versions"] if v["reason"]
    )
    assert len(reason) > 100  # an ONNX Runtime error: the case the cut exists for
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run(capsys, "models", "--server", server.address)
    assert code == 0 and all(len(line) <= 100 for line in out.splitlines()), out
    failed = next(line for line in out.splitlines() if "failed" in line)
    assert "…" in failed and reason not in out
    code, out, _ = run(capsys, "models", "--server", server.address, "--wide")
    assert code == 0 and reason in out


def test_health_exit_status(server: Any, refused_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "health", "--server", server.address)[:2] == (0, "SERVING\n")
    code, out, err = run(capsys, "health", "--server", refused_address, "--timeout", "2")
    assert code == 1 and out == ""
    assert one_error_line(err).startswith(f"error: server {refused_address} unavailable: ")


def test_health_not_serving_while_models_load(small_server: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    loading = small_server(load_models=False)
    code, _, err = run(capsys, "health", "--server", loading.address)
    assert code == 1 and one_error_line(err) == f"error: server {loading.address} is NOT_SERVING"


def test_server_address_from_the_environment(server: Any, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVSERVE_SERVER", server.address)
    assert run(capsys, "health")[0] == 0


def test_one_line_errors(server: Any, refused_address: str, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    good = str(write_png(tmp_path / "good.png", digit_pixels(0)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    cases = {
        "unreadable file": (["classify", str(tmp_path / "missing.png")], "cannot read image file"),
        "unknown model": (["classify", good, "--model", "no_such_model"], "no_such_model"),
        "corrupt image names the file": (["classify", good, str(tmp_path / "bad.png"), "--model", GRAY],
                                         str(tmp_path / "bad.png")),
        "bad top-k": (["classify", good, "--model", GRAY, "--top-k", "0"], "top_k"),
        "unreadable token file": (["models", "--token-file", str(tmp_path / "nope")], "--token-file"),
    }
    for name, (argv, words) in cases.items():
        code, _, err = run(capsys, *argv, "--server", server.address)
        assert code == 1, name
        assert words in one_error_line(err), f"{name}: {err}"
    code, _, err = run(capsys, "classify", good, "--server", refused_address, "--timeout", "3")
    assert code == 1 and "unavailable" in one_error_line(err)


def test_token_file(small_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tokens").write_text("tok-1\n")
    guarded = small_server(auth_token_file=str(tmp_path / "tokens"))
    code, _, err = run(capsys, "models", "--server", guarded.address)
    assert code == 1 and "UNAUTHENTICATED" in one_error_line(err)
    (tmp_path / "mine").write_text("tok-1")
    assert run(capsys, "models", "--server", guarded.address, "--token-file", str(tmp_path / "mine"))[0] == 0


def test_real_process(server: Any, refused_address: str, tmp_path: Path) -> None:
    """The installed ``convserve`` command in its own process: a classification and a failing healthcheck."""
    script = Path(sys.executable).with_name("convserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "convserve.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    path = write_png(tmp_path / "d.png", digit_pixels(3))
    argv = ["classify", str(path), "--server", server.address, "--model", GRAY, "--json"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["file"] == str(path)
    failed = subprocess.run([*command, "health", "--server", refused_address, "--timeout", "2"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert failed.returncode == 1 and failed.stdout == ""
    assert one_error_line(failed.stderr).startswith(f"error: server {refused_address} unavailable")
