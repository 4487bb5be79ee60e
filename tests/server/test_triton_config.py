"""Triton's config.pbtxt and bare ``<version>/model.onnx`` folders read into our one ModelConfig."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from convserve.common.model_config import ModelConfigError, write_config
from convserve.server.repository.autocomplete import complete_from_graph
from convserve.server.repository.config_source import read_model_config
from convserve.server.repository.triton_config import read_pbtxt

FULL = """
# A Triton model configuration as Triton's docs write them.
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 16, 16 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 5 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 32 }
  priority_levels: 2
}
instance_group [ { count: 2, kind: KIND_CPU }, { count: 1, kind: KIND_CPU } ]
optimization { graph { level: 1 } }
model_warmup [ { name: "w", batch_size: 1 } ]
parameters { key: "mean" value: { string_value: "0.5,0.5,0.5" } }
parameters { key: "std" value: { string_value: "0.25,0.25,0.25" } }
"""


def _folder(tmp_path: Path, make_model: Any, pbtxt: str | None, name: str = "resnet", **model: Any) -> Path:
    folder = tmp_path / name
    for version in (1, 2, 3):
        make_model(folder / str(version) / "model.onnx", **{"channels": 3, "size": 16, "classes": 5, **model})
    if pbtxt is not None:
        (folder / "config.pbtxt").write_text(pbtxt)
    return folder


def test_full_pbtxt_reads_every_supported_field_and_warns_about_the_rest(
    tmp_path: Path, make_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder(tmp_path, make_model, FULL)
    labels = ["cat", "dog", "cow", "ant", "bee"]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    with caplog.at_level(logging.WARNING):
        cfg = read_model_config(folder)
    assert cfg.name == "resnet" and cfg.max_batch_size == 8
    assert (cfg.input.name, cfg.input.shape) == ("input", (3, 16, 16))
    assert (cfg.output.name, cfg.labels) == ("logits", tuple(labels))
    assert cfg.version_policy.specific == (1, 3) and cfg.version_policy.select([1, 2, 3]) == [1, 3]
    b = cfg.batching
    assert (b.enabled, b.max_queue_delay_us, b.max_queue_size) == (True, 100, 32)
    assert (b.preferred_batch_sizes, b.instances) == ((4, 8), 3)
    assert cfg.execution_providers == ("cpu",)
    assert cfg.preprocessing.color_mode == "RGB" and cfg.preprocessing.resize == (16, 16)
    assert cfg.preprocessing.mean == (0.5, 0.5, 0.5) and cfg.preprocessing.std == (0.25, 0.25, 0.25)
    warned = [r.getMessage() for r in caplog.records if "not read by convserve" in r.getMessage()]
    assert len(warned) == 1
    assert "dynamic_batching.priority_levels, optimization, model_warmup are not read" in warned[0]


def test_minimal_pbtxt_is_completed_from_the_graph(tmp_path: Path, make_model: Any) -> None:
    folder = _folder(tmp_path, make_model, 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n', classes=7)
    cfg = read_pbtxt(folder)
    assert (cfg.input.name, cfg.input.shape, cfg.output.name) == ("input", (3, 16, 16), "logits")
    assert cfg.labels == tuple(str(i) for i in range(7))
    assert cfg.batching.enabled is False  # no dynamic_batching: each request runs alone, as in Triton
    assert cfg.version_policy.select([1, 2, 3]) == [3]


def test_max_batch_size_zero_strips_the_explicit_batch_dimension(tmp_path: Path, make_model: Any) -> None:
    pbtxt = """
    platform: "onnxruntime_onnx"
    max_batch_size: 0
    input [ { name: "input", data_type: TYPE_FP32, dims: [ -1, 3, 16, 16 ] } ]
    output [ { name: "logits", data_type: TYPE_FP32, dims: [ -1, 5 ] } ]
    dynamic_batching { }
    """
    cfg = read_pbtxt(_folder(tmp_path, make_model, pbtxt))
    assert cfg.input.shape == (3, 16, 16) and cfg.num_classes == 5
    assert cfg.max_batch_size == 64 and cfg.batching.enabled is False  # Triton never merges these requests
    assert cfg.unbatched and cfg.batch_dim == -1  # reported as max_batch_size 0 with the dims as written


def test_bare_folder_is_completed_from_its_latest_graph(tmp_path: Path, make_model: Any) -> None:
    folder = tmp_path / "bare"
    make_model(folder / "1" / "model.onnx", channels=1, size=8, classes=4)
    make_model(
        folder / "2" / "model.onnx", channels=1, size=8, classes=6, input_name="pixels", output_name="scores"
    )
    cfg = read_model_config(folder)
    assert cfg == complete_from_graph(folder)
    assert (cfg.name, cfg.input.name, cfg.output.name) == ("bare", "pixels", "scores")
    assert cfg.input.shape == (1, 8, 8) and cfg.num_classes == 6
    assert cfg.preprocessing.color_mode == "L" and cfg.preprocessing.std == (1.0,)


@pytest.mark.parametrize(
    ("pbtxt", "expected"),
    [
        ('platform: "tensorflow_savedmodel"\nmax_batch_size: 4', "convserve serves ONNX models"),
        ('backend: "python"\nmax_batch_size: 4', "convserve serves ONNX models"),
        ('platform: "onnxruntime_onnx"\nmax_batch_size: -1', "max_batch_size must be >= 0"),
        (
            "max_batch_size: 0\ninput [{name: 'input' data_type: TYPE_FP32 dims: [3, 16, 16]}]",
            "must start with the batch dimension",
        ),
        ('name: "other"\nmax_batch_size: 4', "differs from folder name"),
        (
            "max_batch_size: 4\n"
            "input [{name: 'input' data_type: TYPE_FP32 format: FORMAT_NHWC dims: [16, 16, 3]}]",
            "FORMAT_NHWC",
        ),
        (
            "max_batch_size: 4\ninput [{name: 'input' data_type: TYPE_UINT8 dims: [3, 16, 16]}]",
            "expected TYPE_FP32",
        ),
        (
            "max_batch_size: 4\n"
            "output [{name: 'logits' data_type: TYPE_FP32 dims: [5] label_filename: 'x.txt'}]",
            "cannot read label_filename 'x.txt'",
        ),
        ("max_batch_size: {", "not a Triton model config"),
    ],
)
def test_bad_pbtxt_names_the_field(tmp_path: Path, make_model: Any, pbtxt: str, expected: str) -> None:
    folder = _folder(tmp_path, make_model, pbtxt)
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt") as err:
        read_model_config(folder)
    assert expected in str(err.value)


def test_config_json_wins_over_pbtxt(tmp_path: Path, make_model: Any) -> None:
    folder = _folder(tmp_path, make_model, "this is not a Triton config {")
    write_config(folder, complete_from_graph(folder).replace(labels=tuple("abcde")))
    assert read_model_config(folder).labels == tuple("abcde")


def test_empty_folder_says_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "1").mkdir(parents=True)
    with pytest.raises(
        ModelConfigError, match=r"no config.json, no config.pbtxt and no <version>/model.onnx"
    ):
        read_model_config(empty)


def test_polling_reloads_an_edited_config_pbtxt(server_factory: Any, tmp_path: Path, make_model: Any) -> None:
    """Hot reload watches config.pbtxt as it watches config.json: an edit to the version policy serves the
    versions it now selects, without a restart."""
    import time

    import grpc

    from convserve.protos.inference import grpc_service_pb2 as pb
    from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

    repo = tmp_path / "repo"
    _folder(repo, make_model, 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    srv = server_factory(model_repository=str(repo), repository_poll_seconds=0.2)

    def ready_versions(stub: Any) -> list[str]:
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
        return sorted(m.version for m in index.models if m.name == "resnet")

    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert ready_versions(stub) == ["3"]
        edited = repo / "resnet" / "config.pbtxt.tmp"
        edited.write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 4\nversion_policy: { all { } }\n')
        edited.replace(repo / "resnet" / "config.pbtxt")
        deadline = time.monotonic() + 15
        while ready_versions(stub) != ["1", "2", "3"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready_versions(stub) == ["1", "2", "3"]
        config = stub.ModelConfig(pb.ModelConfigRequest(name="resnet"), timeout=10).config
        assert config.version_policy.WhichOneof("policy_choice") == "all"
