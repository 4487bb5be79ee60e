"""Names and paths from outside: names are matched to the end of the string (no trailing newline slips
through), and a repository symlink leading outside the repository is refused unless the operator allows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

X = np.random.default_rng(3).normal(size=(1, 1, 8, 8)).astype(np.float32)


def _request(model: str, version: int = 0) -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 8, 8], data=X.tobytes()))
    return pb.ClassifyRequest(model=model, version=version, images=[image], top_k=1)


def _error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=10)
    return err.value


@pytest.mark.parametrize("name", ["gray\n", "gray\r\n", "\ngray"])
def test_names_with_a_newline_are_invalid(server: Any, name: str) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        err = _error(stub.Classify, _request(name))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "expected a model name matching" in err.details()
        err = _error(v2.ModelReady, v2pb.ModelReadyRequest(name=name))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        err = _error(v2.ModelReady, v2pb.ModelReadyRequest(name="gray", version="2\n"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "expected a positive integer version" in err.details()
        assert stub.Classify(_request("gray"), timeout=10).model == "gray"


def test_config_name_with_a_trailing_newline_is_refused() -> None:
    from convserve.common.model_config import ModelConfig, ModelConfigError

    with pytest.raises(ModelConfigError, match="name must match"):
        ModelConfig.from_dict({"name": "m\n", "labels": ["a"]})


@pytest.fixture
def linked_repository(tmp_path: Path, model_writer: Any) -> Path:
    """``inside`` (a plain model), ``linked`` (a folder symlink to a model outside the repository) and
    ``mixed`` (version 1 inside, version 2 a symlink to a version folder outside)."""
    repo, outside = tmp_path / "repository", tmp_path / "elsewhere"
    model_writer(repo, "inside", {1: {"seed": 1}})
    model_writer(outside, "linked", {1: {"seed": 2}})
    (repo / "linked").symlink_to(outside / "linked", target_is_directory=True)
    model_writer(repo, "mixed", {1: {"seed": 3}}, version_policy={"all": True})
    model_writer(outside, "mixed", {2: {"seed": 4}})
    (repo / "mixed" / "2").symlink_to(outside / "mixed" / "2", target_is_directory=True)
    return repo


def test_symlinks_out_of_the_repository_are_refused(server_factory: Any, linked_repository: Path) -> None:
    srv = server_factory(model_repository=str(linked_repository))
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        for model, version in (("linked", 0), ("mixed", 2)):
            err = _error(stub.Classify, _request(model, version))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "outside the model repository" in err.details()
            assert "allow_external_symlinks" in err.details()
            assert str(linked_repository) not in err.details()  # no server paths in client messages
        assert stub.Classify(_request("mixed", 1), timeout=10).version == 1
        assert stub.Classify(_request("inside"), timeout=10).model == "inside"
        # A reload (LoadModel, polling) applies the same rule.
        srv.call(srv.running.repository.reload("linked"))
        assert _error(stub.Classify, _request("linked")).code() == grpc.StatusCode.UNAVAILABLE
        assert stub.Classify(_request("inside"), timeout=10).model == "inside"


def test_symlinks_out_of_the_repository_serve_when_allowed(
    server_factory: Any, linked_repository: Path
) -> None:
    srv = server_factory(model_repository=str(linked_repository), allow_external_symlinks=True)
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert stub.Classify(_request("linked"), timeout=10).model == "linked"
        assert stub.Classify(_request("mixed", 2), timeout=10).version == 2


def test_symlinks_inside_the_repository_serve(
    server_factory: Any, tmp_path: Path, model_writer: Any, make_model: Any
) -> None:
    """A deployment that keeps model files in a hidden store inside the repository and links versions in."""
    repo = tmp_path / "repository"
    model_writer(repo, "m", {1: {"seed": 1}}, version_policy={"all": True})
    make_model(repo / ".store" / "m-v2" / "model.onnx", seed=2)
    (repo / "m" / "2").symlink_to(repo / ".store" / "m-v2", target_is_directory=True)
    srv = server_factory(model_repository=str(repo))
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert stub.Classify(_request("m", 2), timeout=10).version == 2
