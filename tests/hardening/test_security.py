"""TLS, mTLS, bearer tokens, the separate metrics interface and configurable input limits, against real
servers on loopback with certificates made at test time by the openssl CLI."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from convserve.client import Client, UnauthenticatedError
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

TOKEN = "s3cret-token-for-tests"
OTHER_TOKEN = "second-accepted-token"


def _png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _request() -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="gray", images=[pb.Image(encoded=_png())], top_k=2)


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _creds(tls: Any, cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or tls.ca_cert).read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _tls_settings(tls: Any, mtls: bool = False) -> dict[str, Any]:
    values = {"tls_cert": str(tls.server_cert), "tls_key": str(tls.server_key)}
    if mtls:
        values["tls_client_ca"] = str(tls.ca_cert)
    return values


def test_tls_serves_encrypted_and_refuses_plaintext(server_factory: Any, tls_material: Any) -> None:
    srv = server_factory(**_tls_settings(tls_material))
    with grpc.secure_channel(srv.address, _creds(tls_material)) as ch:
        reply = classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(), timeout=10)
        assert len(reply.results[0].predictions) == 2
    with grpc.insecure_channel(srv.address) as ch:  # plaintext HTTP/2 to a TLS port
        assert _code(lambda: classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    # A client that trusts another CA rejects the server's certificate.
    with grpc.secure_channel(srv.address, _creds(tls_material, ca=tls_material.rogue_cert)) as ch:
        assert _code(lambda: classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_mtls_requires_a_certificate_from_the_client_ca(server_factory: Any, tls_material: Any) -> None:
    srv = server_factory(**_tls_settings(tls_material, mtls=True))
    t = tls_material
    with grpc.secure_channel(srv.address, _creds(t, t.client_cert, t.client_key)) as ch:
        assert classifier_pb2_grpc.ClassifierStub(ch).Classify(_request(), timeout=10).results
    for creds in (_creds(t), _creds(t, t.rogue_cert, t.rogue_key)):  # no certificate; one from another CA
        with grpc.secure_channel(srv.address, creds) as ch:
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            assert (
                _code(lambda stub=stub: stub.Classify(_request(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
            )
            health = health_pb2_grpc.HealthStub(ch)
            assert _code(lambda h=health: h.Check(health_pb2.HealthCheckRequest(), timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE
            )


@pytest.fixture
def token_server(server_factory: Any, tmp_path: Path) -> Any:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# accepted bearer tokens\n{TOKEN}\n\n{OTHER_TOKEN}\n")
    return server_factory(auth_token_file=str(token_file))


def _protected_calls(ch: grpc.Channel, metadata: Any) -> dict[str, Callable[[], Any]]:
    classifier = classifier_pb2_grpc.ClassifierStub(ch)
    v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
    reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
    v2_request = v2pb.ModelInferRequest(model_name="gray")
    v2_request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    v2_request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    kw = {"timeout": 10, "metadata": metadata}
    return {
        "Classify": lambda: classifier.Classify(_request(), **kw),
        "ClassifyStream": lambda: list(classifier.ClassifyStream(iter([_request()]), **kw)),
        "ListModels": lambda: classifier.ListModels(pb.ListModelsRequest(), **kw),
        "DescribeModel": lambda: classifier.DescribeModel(pb.DescribeModelRequest(model="gray"), **kw),
        "ModelInfer": lambda: v2.ModelInfer(v2_request, **kw),
        "ModelMetadata": lambda: v2.ModelMetadata(v2pb.ModelMetadataRequest(name="gray"), **kw),
        "ServerMetadata": lambda: v2.ServerMetadata(v2pb.ServerMetadataRequest(), **kw),
        "reflection": lambda: list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), **kw
            )
        ),
    }


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),  # a prefix of a real token
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", TOKEN),),
        (("authorization", "Bearer "),),
    ],
    ids=["missing", "wrong", "prefix", "extended", "basic-scheme", "no-scheme", "empty"],
)
def test_missing_or_wrong_token_is_unauthenticated(token_server: Any, metadata: Any) -> None:
    with grpc.insecure_channel(token_server.address) as ch:
        for name, call in _protected_calls(ch, metadata).items():
            try:
                call()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.code(), err.details())
                assert "bearer token" in (err.details() or "")
            else:
                pytest.fail(f"{name} answered without a valid token")


def test_valid_tokens_pass_and_health_needs_none(token_server: Any) -> None:
    with grpc.insecure_channel(token_server.address) as ch:
        for token in (TOKEN, OTHER_TOKEN):
            for name, call in _protected_calls(ch, (("authorization", f"Bearer {token}"),)).items():
                assert _code(call) == grpc.StatusCode.OK, name
        # Probes carry no token: the standard health service answers anyway.
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        for service in ("convserve.v1.Classifier", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_from_the_environment(server_factory: Any) -> None:
    from convserve.server.settings import resolve

    settings = resolve({}, env={"CONVSERVE_AUTH_TOKENS": f"{TOKEN}, {OTHER_TOKEN}"})
    assert settings.auth_tokens == (TOKEN, OTHER_TOKEN)
    srv = server_factory(auth_tokens=settings.auth_tokens)
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert _code(lambda: stub.Classify(_request(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Classify(_request(), timeout=5, metadata=(("authorization", f"Bearer {OTHER_TOKEN}"),))
        assert ok.results


def test_sdk_with_mtls_and_token(server_factory: Any, tls_material: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    t = tls_material
    srv = server_factory(auth_token_file=str(token_file), **_tls_settings(t, mtls=True))
    secure = {"root_certificates": t.ca_cert, "client_cert": t.client_cert, "client_key": t.client_key}
    with Client(srv.address, model="gray", token=TOKEN, **secure) as client:
        assert client.ready()
        assert len(client.classify(_png(), top_k=3).predictions) == 3
        assert client.model("gray").labels == ("class_0", "class_1", "class_2", "class_3")
    with Client(srv.address, model="gray", token="not-it", **secure) as client:
        with pytest.raises(UnauthenticatedError):
            client.classify(_png())
        assert client.ready()  # health needs no token


def test_metrics_bind_a_different_interface(server_factory: Any) -> None:
    """gRPC on 127.0.0.1, /metrics on 127.0.0.2 only (both loopback on Linux)."""
    srv = server_factory(metrics_host="127.0.0.2")
    body = urllib.request.urlopen(f"http://127.0.0.2:{srv.metrics_port}/metrics", timeout=5).read()
    assert b"convserve_build_info" in body
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5)


def test_input_limits_are_configurable(server_factory: Any) -> None:
    srv = server_factory(
        max_images_per_request=2,
        max_image_bytes=4000,
        max_image_pixels=32 * 32,
        allowed_image_formats=("PNG",),
        max_message_bytes=64 * 1024,
    )

    def encoded(img: Image.Image, fmt: str = "PNG") -> pb.Image:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return pb.Image(encoded=buf.getvalue())

    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80), dtype=np.uint8), "L")
    cases = [
        ([encoded(Image.new("L", (8, 8)))] * 3, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 2"),
        ([encoded(noise)], grpc.StatusCode.INVALID_ARGUMENT, "limit of 4000 bytes"),
        ([encoded(Image.new("L", (33, 32)))], grpc.StatusCode.INVALID_ARGUMENT, "limit of 1024 pixels"),
        ([encoded(Image.new("L", (8, 8)), "JPEG")], grpc.StatusCode.INVALID_ARGUMENT, "one of PNG"),
        ([pb.Image(encoded=b"\0" * 70_000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        for images, code, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(pb.ClassifyRequest(model="gray", images=images), timeout=10)
            assert err.value.code() == code and words in (err.value.details() or ""), err.value.details()
        ok = stub.Classify(pb.ClassifyRequest(model="gray", images=[encoded(Image.new("L", (32, 32)))] * 2))
        assert len(ok.results) == 2


def test_server_code_never_unpickles() -> None:
    """Only ONNX files load (through ONNX Runtime), config.json is JSON: nothing in the server unpickles."""
    import re

    import convserve.server as server_pkg

    forbidden = re.compile(
        r"\b(pickle|cPickle|dill|joblib|torch\.load|allow_pickle\s*=\s*True|shelve|marshal)\b"
    )
    root = Path(server_pkg.__file__).parent
    hits = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert not hits, hits


def test_rest_port_has_the_same_tls_and_mtls(server_factory: Any, tls_material: Any) -> None:
    """REST is never the plaintext way in: the gRPC port's certificates and client CA apply to it too."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    t = tls_material
    srv = server_factory(**_tls_settings(t, mtls=True))
    url = f"https://127.0.0.1:{srv.http_port}/v2/models/gray/ready"

    def status(ctx: ssl.SSLContext | None, target: str = url) -> int:
        with urllib.request.urlopen(target, timeout=10, context=ctx) as reply:
            return reply.status

    good = ssl.create_default_context(cafile=str(t.ca_cert))
    good.load_cert_chain(str(t.client_cert), str(t.client_key))
    assert status(good) == 200
    no_cert = ssl.create_default_context(cafile=str(t.ca_cert))
    rogue = ssl.create_default_context(cafile=str(t.ca_cert))
    rogue.load_cert_chain(str(t.rogue_cert), str(t.rogue_key))
    for ctx in (no_cert, rogue):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, http.client.HTTPException)):
            status(ctx)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        status(None, url.replace("https://", "http://"))  # plaintext to the TLS port
    assert status(good) == 200
