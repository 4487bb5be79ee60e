"""Settings: precedence flag > CONVSERVE_* env > config file > default; every field documented in --help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from convserve.server.settings import Settings, SettingsError, add_arguments, from_args, resolve


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.grpc_port, s.metrics_port, s.top_k, s.max_queue_delay_us) == (
        "0.0.0.0",
        8001,
        8002,
        5,
        0,
    )
    assert s.execution_providers == ("cpu",)
    assert Path(s.model_repository).name == "model_repository"
    assert all(f.metadata.get("doc") for f in dataclasses.fields(Settings)), (
        "every setting needs a one-line doc"
    )


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "convserve.toml"
    toml.write_text(
        'grpc_port = 7001\nmetrics-port = 7002\ntop_k = 3\nexecution_providers = ["cuda", "cpu"]\n'
        "access_log = true\n"
    )
    env = {"CONVSERVE_METRICS_PORT": "6002", "CONVSERVE_TOP_K": "2", "CONVSERVE_CONFIG": str(toml)}
    s = from_args(_parse(["--top-k", "1"]), env=env)
    assert s.grpc_port == 7001  # file
    assert s.metrics_port == 6002  # env over file
    assert s.top_k == 1  # flag over env
    assert s.execution_providers == ("cuda", "cpu") and s.access_log is True
    s = from_args(_parse(["--config", str(toml), "--no-metrics", "--no-access-log"]), env={})
    assert s.metrics_port == -1 and not s.metrics_enabled and s.access_log is False

    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"server": {"host": "127.0.0.1", "allowed_image_formats": "png,jpeg"}}))
    s = resolve({}, env={}, config_file=as_json)
    assert s.host == "127.0.0.1" and s.allowed_image_formats == ("png", "jpeg")
    s = resolve({}, env={"CONVSERVE_EXECUTION_PROVIDERS": "openvino, cpu", "CONVSERVE_ACCESS_LOG": "yes"})
    assert s.execution_providers == ("openvino", "cpu") and s.access_log


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"flags": {"grpc_port": "eighty"}}, "flag --grpc-port: setting 'grpc_port': invalid literal"),
        ({"env": {"CONVSERVE_ACCESS_LOG": "maybe"}}, "environment CONVSERVE_ACCESS_LOG"),
        ({"env": {"CONVSERVE_EXECUTION_PROVIDERS": "gpu"}}, "execution_providers must be a non-empty list"),
        ({"flags": {"metrics_port": "-5"}}, "metrics_port must be -1 (off) or 0..65535, got -5"),
        ({"flags": {"http_port": "70000"}}, "http_port must be -1 (off) or 0..65535, got 70000"),
        ({"env": {"CONVSERVE_TRITON_METRICS": "sometimes"}}, "environment CONVSERVE_TRITON_METRICS"),
        ({"flags": {"tls_cert": "c.pem"}}, "tls_cert and tls_key must be given together"),
        ({"flags": {"log_format": "xml"}}, "log_format must be one of"),
    ],
)
def test_bad_values_name_their_source(source: dict, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        resolve(source.get("flags"), env=source.get("env", {}))
    assert message in str(err.value)


def test_unknown_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"grpc_prot": 1}')
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) \['grpc_prot'\]"):
        resolve({}, env={}, config_file=path)


def test_help_lists_every_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "convserve.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"CONVSERVE_{f.name.upper()}" in text
    assert "--config" in text and "--no-metrics" in text
