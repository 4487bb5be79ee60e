"""A candidate version serves only after a warm-up at batch 1 and at a batch >= 2 gives [N, classes] finite
values; non-finite or non-positive normalisation is refused with the reason; a failed candidate never
retires a ready version (over LoadModel, i.e. the same reload that repository polling runs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc

TOKEN = "model-check-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CLASSES = 4


def _broken_model(path: Path, tail: str) -> Path:
    """Flatten → Gemm → ``tail``: "doubled" (2N rows), "collapsed" (1 row), "nan" (NaN outputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(CLASSES, 64)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b"),
        numpy_helper.from_array(np.array([np.nan], np.float32), "nan"),
    ]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["scores"], transB=1),
    ]
    if tail == "doubled":
        nodes.append(helper.make_node("Concat", ["scores", "scores"], ["logits"], axis=0))
    elif tail == "collapsed":
        nodes.append(helper.make_node("ReduceMean", ["scores"], ["logits"], axes=[0], keepdims=1))
    elif tail == "nan":
        nodes.append(helper.make_node("Add", ["scores", "nan"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        tail,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["M", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _request(x: np.ndarray, model: str = "m") -> pb.ClassifyRequest:
    images = [
        pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8, 8], data=row.tobytes()))
        for row in x
    ]
    return pb.ClassifyRequest(model=model, images=images, top_k=CLASSES)


def _probs(reply: pb.ClassifyResponse) -> np.ndarray:
    got = np.zeros((len(reply.results), CLASSES))
    for i, result in enumerate(reply.results):
        for p in result.predictions:
            got[i, p.index] = p.probability
    return got


def _versions(reply: Any) -> dict[int, tuple[str, str]]:
    return {v.version: (pb.ModelState.Name(v.state), v.reason) for v in reply.model.versions}


@pytest.fixture
def repo(tmp_path: Path, model_writer: Any) -> Path:
    root = tmp_path / "repository"
    model_writer(root, "m", {1: {"seed": 1}})
    return root


def _assert_v1_serves(stub: Any, repo: Path, run_reference: Callable[..., np.ndarray]) -> None:
    x = np.random.default_rng(4).normal(size=(3, 1, 8, 8)).astype(np.float32)
    reply = stub.Classify(_request(x), timeout=10, metadata=AUTH)
    assert reply.version == 1
    expected = softmax(run_reference(repo / "m" / "1" / "model.onnx", x))
    np.testing.assert_allclose(_probs(reply), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("tail", "words"),
    [
        ("doubled", ("warm-up at batch 1", "shape [2, 4]", "expected [1, 4]")),
        ("collapsed", ("warm-up at batch 3", "shape [1, 4]", "expected [3, 4]")),
        ("nan", ("warm-up at batch 1", "not finite")),
    ],
)
def test_a_candidate_that_fails_warm_up_never_retires_the_ready_version(
    server_factory: Any, repo: Path, run_reference: Any, tail: str, words: tuple[str, ...]
) -> None:
    srv = server_factory(model_repository=str(repo), allow_model_control=True, auth_tokens=(TOKEN,))
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        _assert_v1_serves(stub, repo, run_reference)

        # A new version 2 (the policy serves the latest one) that is broken: v1 keeps serving.
        _broken_model(repo / "m" / "2" / "model.onnx", tail)
        versions = _versions(stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=30, metadata=AUTH))
        assert versions[1][0] == "MODEL_STATE_READY", versions
        state, reason = versions[2]
        assert state == "MODEL_STATE_FAILED", versions
        for word in words:
            assert word in reason, (word, reason)
        _assert_v1_serves(stub, repo, run_reference)

        # The ready version's own file replaced in place by a broken one: the loaded session stays.
        (repo / "m" / "2" / "model.onnx").unlink()
        (repo / "m" / "2").rmdir()
        good = (repo / "m" / "1" / "model.onnx").read_bytes()
        _broken_model(repo / "m" / "1" / "model.onnx", tail)
        versions = _versions(stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=30, metadata=AUTH))
        state, reason = versions[1]
        assert state == "MODEL_STATE_READY" and "kept the loaded version" in reason, versions
        assert words[0] in reason, reason
        (repo / "m" / "1" / "model.onnx").write_bytes(good)
        _assert_v1_serves(stub, repo, run_reference)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("mean", float("nan"), "preprocessing.mean[0] must be a finite number, got nan"),
        ("std", float("inf"), "preprocessing.std[0] must be a finite number > 0, got inf"),
        ("std", 0.0, "preprocessing.std[0] must be a finite number > 0, got 0.0"),
        ("std", -0.5, "preprocessing.std[0] must be a finite number > 0, got -0.5"),
    ],
)
def test_non_finite_or_non_positive_normalisation_is_refused(
    server_factory: Any,
    repo: Path,
    model_writer: Any,
    run_reference: Any,
    field: str,
    value: float,
    words: str,
) -> None:
    # A second model whose config is bad from the start: FAILED with the reason, never SERVING nonsense.
    model_writer(repo, "bad", {1: {"seed": 3}})
    config = json.loads((repo / "bad" / "config.json").read_text())
    config["preprocessing"][field] = [value]
    (repo / "bad" / "config.json").write_text(json.dumps(config))  # writes NaN / Infinity literals
    srv = server_factory(model_repository=str(repo), allow_model_control=True, auth_tokens=(TOKEN,))
    x = np.zeros((1, 1, 8, 8), np.float32)
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(_request(x, "bad"), timeout=10, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert words in err.value.details()

        # The same change reloaded into the served model: it keeps serving with its loaded config.
        config = json.loads((repo / "m" / "config.json").read_text())
        config["preprocessing"][field] = [value]
        (repo / "m" / "config.json").write_text(json.dumps(config))
        versions = _versions(stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=30, metadata=AUTH))
        state, reason = versions[1]
        assert state == "MODEL_STATE_READY" and words in reason, versions
        _assert_v1_serves(stub, repo, run_reference)


def test_warm_up_batches_follow_the_config() -> None:
    from convserve.common.model_config import ModelConfig
    from convserve.server.repository.model_check import ModelCheckError, warm_up, warm_up_batches

    cfg = ModelConfig.from_dict(
        {
            "name": "m",
            "labels": ["a", "b"],
            "input": {"shape": [1, 2, 2]},
            "preprocessing": {"resize": [2, 2], "mean": [0.5], "std": [0.25]},
        }
    )
    sizes = [len(b) for b in warm_up_batches(cfg)]
    assert sizes == [1, 3]
    # Mid-gray, black and white through (x - mean) / std.
    np.testing.assert_allclose(warm_up_batches(cfg)[1][:, 0, 0, 0], [0.0, -2.0, 2.0])
    assert [len(b) for b in warm_up_batches(cfg.replace(max_batch_size=1))] == [1]
    assert [len(b) for b in warm_up_batches(cfg.replace(max_batch_size=2))] == [1, 2]
    warm_up(lambda batch: np.zeros((len(batch), 2), np.float32), cfg)
    with pytest.raises(
        ModelCheckError, match=r"batch 3: output 'logits' has shape \[1, 2\], expected \[3, 2\]"
    ):
        warm_up(lambda batch: np.zeros((1, 2), np.float32), cfg)
