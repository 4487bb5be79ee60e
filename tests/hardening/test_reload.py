"""Hot reload without a restart: repository polling picks up a new numeric version folder; the model-control
RPCs (LoadModel / UnloadModel, off by default, behind auth) load and unload; requests in flight on the old
version finish on it; a version that fails to load never replaces a working one."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.testing.waits import poll_until

TOKEN = "reload-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _tensor_request(x: np.ndarray, model: str = "m", version: int = 0) -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))
    return pb.ClassifyRequest(model=model, version=version, images=[image], top_k=4)


def _probs(reply: pb.ClassifyResponse) -> np.ndarray:
    got = np.zeros(4)
    for p in reply.results[0].predictions:
        got[p.index] = p.probability
    return got


def _states(stub: Any, model: str = "m") -> dict[int, str]:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=AUTH)
    for m in reply.models:
        if m.name == model:
            return {v.version: pb.ModelState.Name(v.state) for v in m.versions}
    return {}


@pytest.fixture
def repo(tmp_path: Path, model_writer: Any) -> Path:
    root = tmp_path / "repository"
    model_writer(root, "m", {1: {"seed": 1}})
    return root


def test_polling_serves_a_new_version_and_skips_a_broken_one(
    server_factory: Any, repo: Path, model_writer: Any, make_model: Any, run_reference: Any
) -> None:
    srv = server_factory(model_repository=str(repo), repository_poll_seconds=0.2)
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert stub.Classify(_tensor_request(x), timeout=10).version == 1

        # A new version folder, written the way a deployment would: under a temporary name, then renamed.
        make_model(repo / "m" / ".staging" / "model.onnx", seed=2)
        (repo / "m" / ".staging").rename(repo / "m" / "2")
        assert poll_until(lambda: stub.Classify(_tensor_request(x), timeout=10).version == 2)
        reply = stub.Classify(_tensor_request(x), timeout=10)
        expected = softmax(run_reference(repo / "m" / "2" / "model.onnx", x))[0]
        np.testing.assert_allclose(_probs(reply), expected, rtol=1e-4, atol=1e-6)
        # The default policy serves the latest one version: v1 is unloaded, not left running.
        assert poll_until(lambda: _states(stub) == {2: "MODEL_STATE_READY"}), _states(stub)

        # A broken version 3 fails to load and never replaces the working version 2.
        (repo / "m" / "3").mkdir()
        (repo / "m" / "3" / "model.onnx").write_bytes(b"definitely not an ONNX model")
        assert poll_until(lambda: _states(stub).get(3) == "MODEL_STATE_FAILED"), _states(stub)
        for _ in range(5):
            assert stub.Classify(_tensor_request(x), timeout=10).version == 2
        assert _states(stub)[2] == "MODEL_STATE_READY"

        # Fixing version 3 in place (a new file) is picked up on a later poll.
        shutil.copy(repo / "m" / "2" / "model.onnx", repo / "m" / "3" / "model.onnx.tmp")
        (repo / "m" / "3" / "model.onnx.tmp").replace(repo / "m" / "3" / "model.onnx")
        assert poll_until(lambda: stub.Classify(_tensor_request(x), timeout=10).version == 3)

        # A whole new model folder appears and serves.
        model_writer(repo, "n", {1: {"seed": 5}})
        assert poll_until(lambda: _states(stub, "n") == {1: "MODEL_STATE_READY"})
        assert stub.Classify(_tensor_request(x, model="n"), timeout=10).version == 1

        # Removing the folder unloads the model; lookups then say it does not exist.
        shutil.rmtree(repo / "n")
        assert poll_until(lambda: "n" not in {m.name for m in stub.ListModels(pb.ListModelsRequest()).models})
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(_tensor_request(x, model="n"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_control_is_off_by_default(server_factory: Any, repo: Path) -> None:
    srv = server_factory(model_repository=str(repo))
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        for call in (
            lambda: stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=10),
            lambda: stub.UnloadModel(pb.UnloadModelRequest(model="m"), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "allow-model-control" in (err.value.details() or "")


def test_model_control_needs_auth() -> None:
    from convserve.server.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="allow_model_control"):
        Settings(allow_model_control=True)


def test_load_and_unload_rpcs_keep_in_flight_requests(
    server_factory: Any, tmp_path: Path, model_writer: Any, run_reference: Any
) -> None:
    """30 requests queue on the slow model's v1; LoadModel brings in v2 meanwhile; all 30 finish on v1 with
    v1's answers; new requests go to v2; UnloadModel stops the model, LoadModel brings it back."""
    root = tmp_path / "repository"
    slow = {"channels": 3, "size": 48, "batching": {"enabled": False, "instances": 1}}
    model_writer(root, "m", {1: {"seed": 13, "filters": 32, "depth": 3}}, **slow)
    srv = server_factory(model_repository=str(root), allow_model_control=True, auth_tokens=(TOKEN,))
    xs = np.random.default_rng(1).normal(size=(30, 1, 3, 48, 48)).astype(np.float32)
    v1 = softmax(run_reference(root / "m" / "1" / "model.onnx", xs[:, 0]))

    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # model control is behind the token like everything else
            stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        futures = [stub.Classify.future(_tensor_request(x), timeout=60, metadata=AUTH) for x in xs]
        labels = {"model": "m", "version": "1", "api": "classify"}

        def accepted() -> int:  # requests the server holds for v1 now, plus those already answered
            inflight = srv.registry.get_sample_value("convserve_inflight_requests", labels) or 0
            return int(inflight) + sum(f.done() for f in futures)

        assert poll_until(lambda: accepted() == len(futures)), accepted()
        model_writer(root, "m", {2: {"seed": 14, "filters": 32, "depth": 3}}, **slow)
        reply = stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=60, metadata=AUTH)
        assert {v.version: v.state for v in reply.model.versions} == {2: pb.MODEL_STATE_READY}
        results = [f.result() for f in futures]
        assert all(r.version == 1 for r in results)
        for r, expected in zip(results, v1, strict=True):
            np.testing.assert_allclose(_probs(r), expected, rtol=1e-4, atol=1e-6)
        after = stub.Classify(_tensor_request(xs[0]), timeout=30, metadata=AUTH)
        assert after.version == 2
        np.testing.assert_allclose(
            _probs(after),
            softmax(run_reference(root / "m" / "2" / "model.onnx", xs[0]))[0],
            rtol=1e-4,
            atol=1e-6,
        )

        unloaded = stub.UnloadModel(pb.UnloadModelRequest(model="m"), timeout=60, metadata=AUTH)
        assert list(unloaded.model.versions) == []
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(_tensor_request(xs[0]), timeout=10, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reloaded = stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=60, metadata=AUTH)
        assert {v.version: v.state for v in reloaded.model.versions} == {2: pb.MODEL_STATE_READY}
        assert stub.Classify(_tensor_request(xs[0]), timeout=30, metadata=AUTH).version == 2

        for bad, code in (("../m", grpc.StatusCode.INVALID_ARGUMENT), ("nope", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as err:
                stub.LoadModel(pb.LoadModelRequest(model=bad), timeout=10, metadata=AUTH)
            assert err.value.code() == code, err.value.details()


def test_a_failed_reload_keeps_the_working_version(
    server_factory: Any, repo: Path, run_reference: Any
) -> None:
    """Overwriting the served version's file with garbage and asking for a reload: the error is reported,
    the old session keeps serving."""
    srv = server_factory(model_repository=str(repo), allow_model_control=True, auth_tokens=(TOKEN,))
    x = np.random.default_rng(2).normal(size=(1, 1, 8, 8)).astype(np.float32)
    expected = softmax(run_reference(repo / "m" / "1" / "model.onnx", x))[0]
    (repo / "m" / "1" / "model.onnx").write_bytes(b"corrupted on disk")
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        reply = stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=30, metadata=AUTH)
        (status,) = reply.model.versions
        assert status.state == pb.MODEL_STATE_READY and "kept the loaded version" in status.reason
        np.testing.assert_allclose(
            _probs(stub.Classify(_tensor_request(x), timeout=10, metadata=AUTH)),
            expected,
            rtol=1e-4,
            atol=1e-6,
        )
        # Concurrent classify calls while reloading are all answered.
        errors: list[BaseException] = []

        def hammer() -> None:
            try:
                for _ in range(20):
                    stub.Classify(_tensor_request(x), timeout=10, metadata=AUTH)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        stub.LoadModel(pb.LoadModelRequest(model="m"), timeout=30, metadata=AUTH)
        for t in threads:
            t.join(30)
        assert not errors, errors


def test_reload_settings_from_flags_and_env() -> None:
    from convserve.server.settings import from_args

    s = from_args(
        ["--repository-poll-seconds", "1.5", "--allow-model-control"], env={"CONVSERVE_AUTH_TOKENS": TOKEN}
    )
    assert (s.repository_poll_seconds, s.allow_model_control, s.auth_tokens) == (1.5, True, (TOKEN,))
    s = from_args(
        [], env={"CONVSERVE_REPOSITORY_POLL_SECONDS": "2", "CONVSERVE_ALLOW_MODEL_CONTROL": "false"}
    )
    assert (s.repository_poll_seconds, s.allow_model_control) == (2.0, False)
