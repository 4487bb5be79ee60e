"""Log formats, the failed-request line, the access-log switch and request-id handling."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from convserve.server.observability import logs as ls


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    # Leave the convserve logger as a fresh process would find it.
    root = logging.getLogger("convserve")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)
    logging.getLogger(ls.ACCESS_LOGGER).setLevel(logging.NOTSET)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_failed_request_is_one_json_line_with_its_fields_and_no_traceback(stream: io.StringIO) -> None:
    ls.configure_logging("INFO", "json", stream=stream)
    try:
        raise ValueError("client's fault")
    except ValueError as exc:
        ls.log_failed_request(
            request_id="abc-123", method="/convserve.v1.Classifier/Classify", code="INVALID_ARGUMENT",
            message="images[0]: expected PNG or JPEG bytes, got 3 bytes", model="digits", version="1",
            reason="invalid_input", duration_s=0.0012345, peer="ipv4:127.0.0.1:5000", exc_info=exc,
        )  # fmt: skip
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["level"] == "WARNING" and record["logger"] == ls.REQUESTS_LOGGER
    assert record["event"] == "request_failed"
    assert record["request_id"] == "abc-123"
    assert record["code"] == "INVALID_ARGUMENT" and record["reason"] == "invalid_input"
    assert record["model"] == "digits" and record["version"] == "1"
    assert record["error"].startswith("images[0]: expected PNG")
    assert record["duration_ms"] == pytest.approx(1.2345, abs=2e-3)
    assert record["ts"].endswith("Z")
    assert "exc" not in record


def test_internal_failure_carries_the_traceback(stream: io.StringIO) -> None:
    ls.configure_logging("INFO", "json", stream=stream)
    try:
        raise RuntimeError("session exploded")
    except RuntimeError as exc:
        ls.log_failed_request(
            request_id="r1", method="/m", code="INTERNAL", message="internal error", exc_info=exc
        )
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert "RuntimeError: session exploded" in record["exc"]


def test_access_log_is_off_by_default_and_json_when_on(stream: io.StringIO) -> None:
    ls.configure_logging("INFO", "json", access_log=False, stream=stream)
    assert not ls.access_log_enabled()
    ls.log_access(request_id="r", method="/m", code="OK", duration_s=0.001)
    assert lines(stream) == []

    ls.configure_logging("INFO", "json", access_log=True, stream=stream)
    assert ls.access_log_enabled()
    ls.log_access(
        request_id="r2", method="/inference.GRPCInferenceService/ModelInfer", code="OK", duration_s=0.0005,
        model="digits", version="1", images=8, peer="ipv4:127.0.0.1:1",
    )  # fmt: skip
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["logger"] == ls.ACCESS_LOGGER and record["event"] == "access"
    assert record["request_id"] == "r2" and record["images"] == 8 and record["code"] == "OK"
    assert record["duration_ms"] == pytest.approx(0.5)


def test_text_format_appends_key_value_fields(stream: io.StringIO) -> None:
    ls.configure_logging("INFO", "text", access_log=True, stream=stream)
    ls.log_access(request_id="r3", method="/m", code="NOT_FOUND", duration_s=0.002, model="two words")
    (line,) = lines(stream)
    assert " INFO convserve.access: request " in line
    assert "request_id=r3" in line and "code=NOT_FOUND" in line and 'model="two words"' in line


def test_configuring_twice_replaces_the_handler(stream: io.StringIO) -> None:
    ls.configure_logging("INFO", "json", stream=stream)
    ls.configure_logging("INFO", "json", stream=stream)
    logging.getLogger("convserve.test").info("once")
    assert len(lines(stream)) == 1
    with pytest.raises(ValueError, match="log format"):
        ls.configure_logging("INFO", "xml", stream=stream)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_lines_are_bounded_whatever_the_request_carried(stream: io.StringIO, fmt: str) -> None:
    ls.configure_logging("INFO", fmt, stream=stream)
    huge = "x" * 4_000_000
    wide = "\u00fc" * 1_000_000  # 2 bytes in UTF-8, 6 characters as a JSON escape in the text format
    try:
        raise RuntimeError(huge)
    except RuntimeError as exc:
        ls.log_failed_request(
            request_id="r1", method="/m", code="INTERNAL", message=huge, model=wide, reason="internal",
            exc_info=exc,
        )  # fmt: skip
    ls.log_failed_request(request_id="r2", method="/m", code="INVALID_ARGUMENT", message=wide, model=huge)
    logging.getLogger("convserve.server").warning("model %s: %s", huge, wide, extra={"fields": {"k": huge}})
    out = lines(stream)
    assert len(out) >= 3
    for line in out:
        assert len(line.encode()) <= ls.LINE_LIMIT, len(line.encode())
    if fmt == "json":
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert records[0]["error"].startswith("xxx") and "bytes in all" in records[0]["error"]
        assert "RuntimeError" in records[0]["exc"]
        assert records[1]["code"] == "INVALID_ARGUMENT"
    else:
        assert "Traceback" in stream.getvalue()


def test_failure_lines_are_rate_limited_per_reason_with_a_count(stream: io.StringIO) -> None:
    now = [0.0]
    limiter = ls.FailureLogLimiter(rate=1.0, burst=3, clock=lambda: now[0])
    assert [limiter.admit("a") for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert limiter.admit("b") == (True, 0)  # another reason has its own budget
    now[0] += 1.0
    assert limiter.admit("a") == (True, 2)  # the two dropped lines are reported on the next one
    assert limiter.admit("a") == (False, 0)
    assert limiter.drain() == {"a": 1} and limiter.drain() == {}

    ls.configure_logging("INFO", "json", stream=stream)
    sent = 200
    for i in range(sent):
        ls.log_failed_request(request_id=f"r{i}", method="/m", code="INVALID_ARGUMENT", message="bad",
                              reason="invalid_input")  # fmt: skip
    ls.flush_suppressed()
    records = [json.loads(line) for line in lines(stream)]
    written = [r for r in records if r["event"] == "request_failed"]
    assert len(written) < 20
    # Every failure is accounted for: written, or counted in a suppressed= field.
    assert len(written) + sum(r.get("suppressed", 0) for r in records) == sent
