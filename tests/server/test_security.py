"""TLS, mTLS and bearer-token auth on a real server, with certificates made by openssl for the test."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.testing.prerequisites import require_binary

TOKEN = "s3cret-token"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    require_binary(
        "openssl", "openssl is not installed: bash scripts/install_system_deps.sh (apt-get install openssl)"
    )
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    (d / "tokens").write_text(f"# accepted tokens\n{TOKEN}\nanother-one\n")
    return d


def _request() -> pb.ClassifyRequest:
    x = np.zeros((1, 1, 8, 8), np.float32)
    return pb.ClassifyRequest(
        model="gray",
        images=[pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 8, 8], data=x.tobytes()))],
    )


def _channel(address: str, pki: Path, client_cert: bool = True) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address.replace("127.0.0.1", "localhost"), creds)


def test_mtls_and_token_auth(server_factory: Any, pki: Path) -> None:
    server = server_factory(
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
        auth_token_file=str(pki / "tokens"),
        metrics_port=-1,
    )
    with _channel(server.address, pki) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        reply = stub.Classify(_request(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert reply.results[0].predictions
        # Health answers probes without a token.
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(_request(), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # metadata RPCs and streams follow the auth setting too
            list(stub.ClassifyStream(iter([_request()]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.ListModels(
            pb.ListModelsRequest(), metadata=(("authorization", "Bearer another-one"),), timeout=10
        )
    # No client certificate: the TLS handshake itself is refused.
    with _channel(server.address, pki, client_cert=False) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port fails too.
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_tls_without_client_certificates_and_env_tokens(server_factory: Any, pki: Path) -> None:
    server = server_factory(
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        metrics_port=-1,
        auth_tokens=("from-env",),
    )
    with _channel(server.address, pki, client_cert=False) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert stub.Classify(_request(), metadata=(("authorization", "Bearer from-env"),), timeout=10).results
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
