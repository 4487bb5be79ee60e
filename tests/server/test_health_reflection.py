"""grpc.health.v1 (overall and per service, NOT_SERVING before load and while draining) and reflection."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

SERVICES = ("", "convserve.v1.Classifier", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _statuses(channel: grpc.Channel) -> list[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return [stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in SERVICES]


def _good_request() -> pb.ClassifyRequest:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    return pb.ClassifyRequest(
        model="gray",
        images=[pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 8, 8], data=x.tobytes()))],
    )


def test_health_serving_and_unknown_service(channel: grpc.Channel) -> None:
    assert _statuses(channel) == [SERVING] * 3
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_not_serving_until_loaded_then_drain_latch(server_factory: Any) -> None:
    handle = server_factory(load_models=False)
    with grpc.insecure_channel(handle.address) as ch:
        classifier = classifier_pb2_grpc.ClassifierStub(ch)
        v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert _statuses(ch) == [NOT_SERVING] * 3
        assert not v2.ServerReady(v2pb.ServerReadyRequest()).ready
        with pytest.raises(grpc.RpcError) as err:
            classifier.Classify(_good_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'gray' has no ready version" in err.value.details() and "loading" in err.value.details()

        handle.call(handle.running.load_models())
        assert _statuses(ch) == [SERVING] * 3
        assert v2.ServerReady(v2pb.ServerReadyRequest()).ready
        assert classifier.Classify(_good_request(), timeout=5).results

        handle.call(handle.running.health.drain())  # the first step of stop(): a one-way latch
        handle.call(handle.running.health.set_serving())  # ignored once draining
        assert _statuses(ch) == [NOT_SERVING] * 3
        assert not v2.ServerReady(v2pb.ServerReadyRequest()).ready
        assert v2.ServerLive(v2pb.ServerLiveRequest()).live  # probes still answer while draining
        with pytest.raises(grpc.RpcError) as err:
            classifier.Classify(_good_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.value.details()


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {
        "convserve.v1.Classifier",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    pool = DescriptorPool(db)
    method = pool.FindServiceByName("convserve.v1.Classifier").FindMethodByName("Classify")
    assert method.input_type.full_name == "convserve.v1.ClassifyRequest"
