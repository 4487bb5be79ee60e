"""The repository's rules as a user meets them: config.pbtxt dims and sizes validated before a model is
served, a config too big to be real refused by its size, strict readiness (Triton's default) and a
missing repository at start that is one error line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from convserve.common.model_config import ModelConfigError
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc
from convserve.server.repository.config_source import read_model_config

from ...conftest import start_server_thread, test_settings

MAX_CONFIG_BYTES = 64 * 1024  # the limit docs/concepts.md documents for config.json and config.pbtxt
OUTPUT = "output [{name: 'logits' data_type: TYPE_FP32 dims: [4]}]\n"


def _model(folder: Path, make_model: Any, pbtxt: str | None = None) -> Path:
    make_model(folder / "1" / "model.onnx", channels=1, size=8, classes=4)
    if pbtxt is not None:
        (folder / "config.pbtxt").write_text(pbtxt)
    return folder


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ("[1, -5, 8]", "expected -1 (variable) or a positive size, got -5"),
        ("[1, 0, 8]", "expected -1 (variable) or a positive size, got 0"),
        ("[1, 8, 8, 1, 1, 1, 1, 1, 1]", "has rank 9; at most 8"),
        ("[1, 100000, 100000]", "hold more than"),
    ],
)
def test_pbtxt_dims_other_than_minus_one_or_positive_are_refused(
    tmp_path: Path, make_model: Any, dims: str, expected: str
) -> None:
    folder = _model(
        tmp_path / "m", make_model,
        f"max_batch_size: 4\ninput [{{name: 'input' data_type: TYPE_FP32 dims: {dims}}}]\n{OUTPUT}",
    )  # fmt: skip
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt") as err:
        read_model_config(folder)
    assert "input 'input'" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("name", ["config.pbtxt", "config.json"])
def test_a_config_over_the_size_limit_is_refused_before_parsing(
    tmp_path: Path, make_model: Any, name: str
) -> None:
    folder = _model(tmp_path / "m", make_model)
    filler = "#" * (MAX_CONFIG_BYTES + 1) + "\n"
    if name == "config.json":
        text = json.dumps({"name": "m", "labels": ["a", "b", "c", "d"], "pad": " " * MAX_CONFIG_BYTES})
    else:
        text = "max_batch_size: 4\n" + filler + OUTPUT
    (folder / name).write_text(text)
    with pytest.raises(ModelConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        read_model_config(folder)


def _ready(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        return stub.ServerReady(v2pb.ServerReadyRequest(), timeout=10).ready


def test_strict_readiness_by_default_a_failed_model_makes_the_server_not_ready(
    tmp_path: Path, make_model: Any
) -> None:
    repo = tmp_path / "repository"
    _model(repo / "good", make_model)
    broken = _model(repo / "broken", make_model, f"max_batch_size: 4\n{OUTPUT}".replace("[4]", "[7]"))
    strict = start_server_thread(test_settings(repo, strict_readiness=True))
    lenient = start_server_thread(test_settings(repo, strict_readiness=False))
    try:
        assert not _ready(strict.address)
        assert _ready(lenient.address)
        # Fixing the broken model and reloading it makes the strict server ready.
        (broken / "config.pbtxt").write_text(f"max_batch_size: 4\n{OUTPUT}")
        strict.call(strict.running.repository.reload("broken"))
        assert _ready(strict.address)
    finally:
        strict.stop()
        lenient.stop()


def test_a_missing_repository_is_one_error_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repository"
    cmd = [sys.executable, "-m", "convserve.server", "--model-repository", str(missing), "--host",
           "127.0.0.1", "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(missing) in errors[0] and "--wait-for-repository" in errors[0], errors


def test_label_filename_is_reported_in_the_model_config(tmp_path: Path, make_model: Any) -> None:
    from convserve.server.core.triton_model import model_config
    from convserve.server.settings import Settings

    folder = _model(tmp_path / "m", make_model, f"max_batch_size: 4\n{OUTPUT}".replace(
        "dims: [4]", "dims: [4] label_filename: 'names.txt'"))  # fmt: skip
    (folder / "names.txt").write_text("w\nx\ny\nz\n")
    cfg = read_model_config(folder)
    assert cfg.labels == ("w", "x", "y", "z")
    reported = model_config(cfg, Settings(model_repository=str(tmp_path)))
    assert reported.output[0].label_filename == "names.txt"
