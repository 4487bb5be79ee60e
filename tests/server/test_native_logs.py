"""JSON logs mean every line: what native libraries write to stderr (ONNX Runtime's own logger, gRPC
core) reaches the log through the server's logger, as JSON, with its severity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from convserve.server.observability.logs import native_record
from convserve.testing import start_server_process


def test_native_lines_keep_their_severity_and_source() -> None:
    # The shapes ONNX Runtime's default sink (with its colour codes) and gRPC core print.
    ort = (
        "\x1b[0;93m2026-11-26 14:36:42.955636648 [W:onnxruntime:Default, telemetry_1ds.cc:613 operator()] "
        "Failed to persist telemetry device ID\x1b[m\n"
    )
    assert native_record(ort) == (
        logging.WARNING, "Failed to persist telemetry device ID",
        {"source": "onnxruntime", "where": "telemetry_1ds.cc:613 operator()"},
    )  # fmt: skip
    level, msg, fields = native_record("E1126 14:36:42.955636    123 chttp2_transport.cc:42] boom\n")
    assert (level, msg, fields["source"]) == (logging.ERROR, "boom", "grpc")
    # The drain shuts the gRPC listener down itself; grpc's pending accept failing then is expected.
    line = "E1126 14:36:42.955636 1 tcp_server_posix.cc:391] Closing acceptor. Failed accept4: Invalid arg"
    assert native_record(line + "\n")[0] == logging.DEBUG
    assert native_record("plain text\n") == (logging.WARNING, "plain text", {"source": "stderr"})


def test_every_line_of_a_json_server_log_is_json_onnx_runtime_included(
    model_repository: Path, tmp_path: Path
) -> None:
    # At DEBUG the server lets ONNX Runtime speak at INFO: its session set-up lines go to stderr.
    flags = ["--model-repository", str(model_repository), "--no-strict-readiness"]
    flags += ["--log-format", "json", "--log-level", "DEBUG"]
    # An unwritable home: ONNX Runtime's import warns that it cannot persist its telemetry id (as in the
    # image, whose user has no home), before any server code runs.
    server = start_server_process(flags, tmp_path, env={"HOME": "/proc/convserve-no-home"})
    assert server.stop() == 0
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    native = [r for r in records if r["logger"] == "convserve.native"]
    assert any(r.get("source") == "onnxruntime" for r in native), lines[:20]
    assert all(r["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} for r in native)
    # A normal shutdown logs no gRPC core error.
    errors = [r for r in native if r.get("source") == "grpc" and r["level"] in {"ERROR", "CRITICAL"}]
    assert not errors, errors
