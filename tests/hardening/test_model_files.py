"""Bring your own model: graphs with external data serve from any working directory, and no file outside a
model's folder is ever read for it (external data by a bare name, '..' or an absolute path, a label file
linked out of the repository); hostile config.pbtxt dims and sizes are refused by name.

The references are ONNX Runtime sessions on the original files, opened here without convserve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.testing.file_trace import opened_files, traced

from ..conftest import reference_logits

X = np.random.default_rng(5).normal(size=(2, 1, 8, 8)).astype(np.float32)


def _save_external(source: Path, target: Path, *, one_file: bool) -> None:
    """``source`` re-saved at ``target`` with every initializer in external data: one ``model.onnx.data``
    (torch's default layout) or one file per tensor (the >2 GB layout)."""
    import onnx

    model = onnx.load(str(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="model.onnx.data" if one_file else None,
        size_threshold=0,
    )


def _relocate(model_path: Path, location: str) -> None:
    """Point every external tensor of ``model_path`` at ``location`` (the bytes are not moved)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def _config(name: str) -> str:
    return json.dumps({
        "name": name, "input": {"name": "input", "shape": [1, 8, 8]}, "output": {"name": "logits"},
        "preprocessing": {"color_mode": "L", "resize": [8, 8], "mean": [0.0], "std": [1.0]},
        "labels": ["a", "b", "c", "d"], "max_batch_size": 8,
    })  # fmt: skip


def _classify(address: str, model: str) -> tuple[np.ndarray, list[str]]:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 8, 8], data=X[:1].tobytes()))
    with grpc.insecure_channel(address) as ch:
        reply = classifier_pb2_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model=model, images=[image, image], top_k=4), timeout=20
        )
    first = reply.results[0]
    return np.array([p.probability for p in first.predictions]), [p.label for p in first.predictions]


def _status(address: str, model: str) -> grpc.RpcError:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 8, 8], data=X[:1].tobytes()))
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
        classifier_pb2_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model=model, images=[image]), timeout=20
        )
    return err.value


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def hostile_repository(tmp_path: Path, make_model: Any) -> tuple[Path, Path, Path]:
    """(repository, a working directory holding a planted data file, a label file outside the repository).

    ``single`` and ``split`` serve external data the two ways; ``bare`` names a data file that only the
    working directory holds; ``parent`` reaches it with '..'; ``absolute`` by its absolute path;
    ``short`` names a file too short for its tensors; ``linked_labels`` has a config.pbtxt whose
    label_filename is a symlink to a file outside the repository."""
    repo, work, outside = tmp_path / "repository", tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    plain = make_model(tmp_path / "plain" / "model.onnx", seed=7)
    for name, one_file in (("single", True), ("split", False)):
        _save_external(plain, repo / name / "1" / "model.onnx", one_file=one_file)
        (repo / name / "config.json").write_text(_config(name))
    planted = work / "planted.data"
    _save_external(plain, tmp_path / "donor" / "model.onnx", one_file=True)
    planted.write_bytes((tmp_path / "donor" / "model.onnx.data").read_bytes())
    for name, location in (("bare", "planted.data"), ("parent", "../../../work/planted.data"),
                           ("absolute", str(planted)), ("short", "model.onnx.data")):
        _save_external(plain, repo / name / "1" / "model.onnx", one_file=True)
        if name == "short":
            data = repo / name / "1" / "model.onnx.data"
            data.write_bytes(data.read_bytes()[:100])
        else:
            (repo / name / "1" / "model.onnx.data").unlink()
            _relocate(repo / name / "1" / "model.onnx", location)
        (repo / name / "config.json").write_text(_config(name))
    labels = outside / "secret.txt"
    labels.write_text("s1\ns2\ns3\ns4\n")
    make_model(repo / "linked_labels" / "1" / "model.onnx", seed=8)
    (repo / "linked_labels" / "labels.txt").symlink_to(labels)
    (repo / "linked_labels" / "config.pbtxt").write_text(
        "max_batch_size: 8\n"
        "output [{name: 'logits' data_type: TYPE_FP32 dims: [4] label_filename: 'labels.txt'}]\n"
    )
    return repo, work, labels


REFUSED = {
    "bare": "planted.data: No such file",
    "parent": "expected a plain path relative to",
    "absolute": "expected a plain path relative to",
    "short": "the tensor needs bytes",
    "linked_labels": "leading outside the model repository",
}


def test_external_data_serves_from_any_working_directory_and_nothing_outside_is_read(
    spawn_server: Any, hostile_repository: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    repo, work, _ = hostile_repository
    srv = spawn_server(repo, "--no-strict-readiness", cwd=work)
    for name in ("single", "split"):
        scores, labels = _classify(srv.address, name)
        expected = _softmax(reference_logits(tmp_path / "plain" / "model.onnx", X[:1])[0])
        order = np.argsort(-expected, kind="stable")
        assert labels == [["a", "b", "c", "d"][i] for i in order]
        np.testing.assert_allclose(scores, expected[order], rtol=1e-5, atol=1e-6)
    for name, reason in REFUSED.items():
        err = _status(srv.address, name)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err.details())
        assert reason in err.details(), (name, err.details())
        if name != "absolute":  # which echoes the model's own location string
            assert str(tmp_path) not in err.details()  # repository-relative paths only
    assert _classify(srv.address, "single")[1]  # still serving


def test_strace_sees_no_open_outside_the_model_folders(
    hostile_repository: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The server under strace: of every path it opens beneath the test's folder, none is outside the
    repository's model folders (ONNX Runtime opens external data from C++, out of Python's sight)."""
    repo, work, labels = hostile_repository
    run = tmp_path / "run"  # the trace, log and port file: written by the test's own tools
    run.mkdir()
    trace, log = run / "open.trace", run / "server.log"
    cmd = traced([
        sys.executable, "-m", "convserve.server", "--model-repository", str(repo), "--host", "127.0.0.1",
        "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", "--port-file", str(run / "ports"),
    ], trace)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(s in log.read_text(errors="replace") for s in LOADED):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the server did not finish loading within 120 s"
            time.sleep(0.1)
    finally:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            os.kill(int(pid), signal.SIGTERM)  # the traced server; strace exits with it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    opened = opened_files(trace, writes=False)  # files read: a model's files are only ever read
    resolved = [str(Path(p).resolve()) for p in opened]
    mine = [p for p in resolved if p.startswith(f"{tmp_path}/") and not p.startswith(f"{run}/")]
    outside = [p for p in mine if not p.startswith(f"{repo}/")]
    assert outside == [], outside
    assert str(labels) not in resolved and str(work / "planted.data") not in resolved
    assert any(p.endswith("single/1/model.onnx.data") for p in opened), "the trace saw no external data"


# What the server logs once every model has loaded or failed (with or without strict readiness).
LOADED = ("model(s) are not ready", "serving ", "no model version is ready")


def test_strace_sees_import_open_nothing_outside_the_source_folder_and_the_repository(
    tmp_path: Path, make_model: Any
) -> None:
    """``convserve import`` of a graph with external data, run from a folder that holds a same-named data
    file: every file it opens beneath the test's folder is in the source model's folder or the repository."""
    source = tmp_path / "source" / "model.onnx"
    _save_external(make_model(tmp_path / "build" / "plain.onnx"), source, one_file=True)
    labels = source.parent / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    work, repo, run = tmp_path / "work", tmp_path / "repo", tmp_path / "run"
    for folder in (work, run):
        folder.mkdir()
    (work / "model.onnx.data").write_bytes((source.parent / "model.onnx.data").read_bytes())
    trace = run / "open.trace"
    cmd = traced([
        sys.executable, "-m", "convserve.cli", "import", str(source), "--name", "tiny",
        "--labels", str(labels), "--repository", str(repo),
    ], trace)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = [str(Path(p).resolve()) for p in opened_files(trace)]
    mine = [p for p in resolved if p.startswith(f"{tmp_path}/") and not p.startswith(f"{run}/")]
    outside = [p for p in mine if not p.startswith((f"{source.parent}/", f"{repo}/"))]
    assert outside == [], outside
    assert str(source.parent / "model.onnx.data") in mine, "the trace saw no external data read"
    staged = [p for p in mine if p.startswith(f"{repo}/") and p.endswith("/1/model.onnx.data")]
    assert staged, "the trace saw no verification of the staged copy"
