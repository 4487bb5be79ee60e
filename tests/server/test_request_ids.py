"""Client-chosen ids come back exactly, on every gRPC API and both stream kinds: clients match replies by
the id they chose. One past the documented bound is refused by name; the call's own request id (trailing
``x-request-id``, the logs) stays the server's sanitised token."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.inference import grpc_service_pb2 as v2pb

# Ids that are not short tokens, each of which came back replaced before.
ODD_IDS = ["my request #1", "{3f2a}", "a b", "ünïcode ✓", "tab\there", "x" * 1024]
X = np.random.default_rng(3).normal(size=(1, 1, 8, 8)).astype(np.float32)


def _classify(rid: str) -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8, 8], data=X.tobytes()))
    return pb.ClassifyRequest(model="gray", images=[image], request_id=rid)


def _infer(rid: str) -> v2pb.ModelInferRequest:
    inp = v2pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    return v2pb.ModelInferRequest(model_name="gray", id=rid, inputs=[inp], raw_input_contents=[X.tobytes()])


def test_ids_are_echoed_exactly_on_unary_calls(classifier: Any, v2: Any) -> None:
    for rid in ODD_IDS:
        reply, call = classifier.Classify.with_call(_classify(rid), timeout=30)
        assert reply.request_id == rid
        assert dict(call.trailing_metadata())["x-request-id"] != rid
        assert v2.ModelInfer(_infer(rid), timeout=30).id == rid


def test_ids_are_echoed_exactly_in_both_stream_kinds(classifier: Any, v2: Any) -> None:
    replies = list(classifier.ClassifyStream(iter([_classify(r) for r in ODD_IDS]), timeout=30))
    assert [r.request_id for r in replies] == ODD_IDS and not any(r.error_code for r in replies)
    replies = list(v2.ModelStreamInfer(iter([_infer(r) for r in ODD_IDS]), timeout=30))
    assert [r.infer_response.id for r in replies] == ODD_IDS and not any(r.error_message for r in replies)
    # A failed message's reply carries its id too, so the client can tell which one failed.
    bad = _infer("odd id #2")
    bad.inputs[0].name = "nope"
    (reply,) = v2.ModelStreamInfer(iter([bad]), timeout=30)
    assert reply.error_message and reply.infer_response.id == "odd id #2"


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_an_id_past_the_bound_is_refused_by_name(classifier: Any, v2: Any, api: str) -> None:
    def send(rid: str) -> str:
        if api == "v1":
            return classifier.Classify(_classify(rid), timeout=30).request_id
        return v2.ModelInfer(_infer(rid), timeout=30).id

    with pytest.raises(grpc.RpcError) as err:
        send("i" * 1025)
    field = "request_id" if api == "v1" else "id"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"{field}: expected at most 1024 characters, got 1025"
    assert send("after") == "after"
