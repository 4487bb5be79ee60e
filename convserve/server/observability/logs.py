"""Server log lines: text or JSON format, one structured line per failed request, the optional access log.

Structured fields travel as `extra={"fields": {...}}` on a record; the JSON formatter puts them at the top
level of the line, the text formatter appends them as `key=value`. Request ids are
``server/observability/request_ids.py``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import truncate

__all__ = [
    "ACCESS_LOGGER",
    "NATIVE_LOGGER",
    "REQUESTS_LOGGER",
    "FailureLogLimiter",
    "JsonFormatter",
    "TextFormatter",
    "access_log_enabled",
    "configure_logging",
    "flush_suppressed",
    "log_access",
    "log_failed_request",
    "native_record",
    "route_native_logs",
]

REQUESTS_LOGGER = "convserve.requests"
ACCESS_LOGGER = "convserve.access"

_HANDLER_MARK = "_convserve_handler"

# Bounds on one log line, in UTF-8 bytes. Request-derived text (a model name, an error quoting a tensor
# name) can be megabytes; a line names the problem in far less. Each string value (the message, each
# field) is cut to FIELD_LIMIT, a traceback to EXC_LIMIT, and the whole line to LINE_LIMIT.
LINE_LIMIT = 8 * 1024
FIELD_LIMIT = 1024
EXC_LIMIT = 4 * 1024

_requests_log = logging.getLogger(REQUESTS_LOGGER)
_access_log = logging.getLogger(ACCESS_LOGGER)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _bounded(value: Any, limit: int) -> Any:
    return truncate(value, limit) if isinstance(value, str) else value


def _traceback(formatter: logging.Formatter, record: logging.LogRecord, limit: int) -> str:
    """The record's traceback, each line and the whole cut so that an exception quoting megabytes of
    request text cannot blow up the line (the frames at the top are kept)."""
    text = record.exc_text or formatter.formatException(record.exc_info)  # type: ignore[arg-type]
    lines = "\n".join(truncate(line, 512) for line in text.splitlines())
    return truncate(lines, limit)


def _fit(render: Callable[[int, int], str]) -> str:
    """``render(field_limit, exc_limit)`` with limits shrunk until the line is at most LINE_LIMIT bytes;
    a line still over it (hundreds of fields) is cut."""
    field_limit, exc_limit = FIELD_LIMIT, EXC_LIMIT
    while True:
        line = render(field_limit, exc_limit)
        if len(line.encode("utf-8", "replace")) <= LINE_LIMIT or field_limit <= 64:
            return truncate(line, LINE_LIMIT)
        field_limit, exc_limit = field_limit // 4, exc_limit // 4


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, the record's fields, exc.

    At most LINE_LIMIT bytes: string values are cut (see FIELD_LIMIT) so that the line stays valid JSON.
    """

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        exc = record.exc_info and _traceback(self, record, 1 << 30)

        def render(field_limit: int, exc_limit: int) -> str:
            line: dict[str, Any] = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname,
                "logger": record.name,
                "msg": truncate(msg, field_limit),
            }
            for key, value in _fields(record).items():
                line.setdefault(truncate(str(key), 64), _bounded(value, field_limit))
            if exc:
                line["exc"] = truncate(exc, exc_limit)
            return json.dumps(line, default=str, ensure_ascii=False)

        return _fit(render)


class TextFormatter(logging.Formatter):
    """`time level logger: msg key=value ...` for people reading a terminal; at most LINE_LIMIT bytes."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        msg = record.message
        exc = record.exc_info and _traceback(self, record, 1 << 30)

        def render(field_limit: int, exc_limit: int) -> str:
            record.message = truncate(msg, field_limit)
            text = self.formatMessage(record)
            fields = _fields(record)
            if fields:
                text += " " + " ".join(
                    f"{truncate(str(k), 64)}={_text_value(_bounded(v, field_limit))}"
                    for k, v in fields.items()
                )
            if exc:
                text += "\n" + truncate(exc, exc_limit)
            return text

        return _fit(render)


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


class FailureLogLimiter:
    """Per-reason token bucket for failed-request lines: ``burst`` lines at once, then ``rate`` a second.

    A client repeating one mistake (or a flood of them) would otherwise write a line per request: a
    3-minute mixed soak wrote 34 MB. Dropped lines are counted; the next line let through for the same
    reason carries ``suppressed=N``, and ``flush_suppressed`` (at shutdown) reports what is left.
    Requests are still counted one by one in the metrics.
    """

    def __init__(
        self, rate: float = 1.0, burst: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # reason -> (tokens, last refill time)
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, reason: str) -> tuple[bool, int]:
        """(log this line?, lines of this reason suppressed since the last one logged)."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(reason, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[reason] = (tokens, now)
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return False, 0
            self._buckets[reason] = (tokens - 1.0, now)
            return True, self._suppressed.pop(reason, 0)

    def drain(self) -> dict[str, int]:
        """Suppressed counts not yet reported, by reason; resets them."""
        with self._lock:
            pending, self._suppressed = self._suppressed, {}
        return pending


_failure_limiter = FailureLogLimiter()


def flush_suppressed() -> None:
    """Log one line per reason whose failed-request lines were suppressed and not yet reported."""
    for reason, count in sorted(_failure_limiter.drain().items()):
        _requests_log.warning(
            "failed-request lines suppressed",
            extra={"fields": {"event": "request_failed_suppressed", "reason": reason, "suppressed": count}},
        )


class _WorkerField(logging.Filter):
    """Adds ``worker=<index>`` to every record's fields (lines from N processes share one stream)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {"worker": self.index, **_fields(record)}
        return True


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    access_log: bool = False,
    stream: TextIO | None = None,
    *,
    worker: int | None = None,
) -> logging.Handler:
    """Install one handler on the `convserve` logger tree; calling again replaces it (tests, re-config).

    `fmt` is "text" or "json". The access log (`convserve.access`, one INFO line per request) is on only
    when `access_log` is true; failed-request lines (`convserve.requests`) follow `level`. A worker
    process passes its index: every line then carries the field ``worker``.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    root = logging.getLogger("convserve")
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The handler owns output: without this, a host application's root handler would print lines twice.
    root.propagate = False
    _access_log.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    global _failure_limiter
    _failure_limiter = FailureLogLimiter()  # a fresh budget for a fresh configuration
    return handler


def log_failed_request(
    *,
    request_id: str,
    method: str,
    code: str,
    message: str,
    model: str = "",
    version: str = "",
    reason: str = "",
    duration_s: float | None = None,
    peer: str = "",
    exc_info: BaseException | None = None,
) -> None:
    """One structured line for a failed request; a traceback only for INTERNAL (`exc_info`).

    Rate-limited per ``reason`` (FailureLogLimiter): past the budget lines are counted, not written.
    """
    level = logging.ERROR if code in ("INTERNAL", "UNKNOWN") else logging.WARNING
    if not _requests_log.isEnabledFor(level):
        return
    admitted, suppressed = _failure_limiter.admit(reason or code)
    if not admitted:
        return
    fields: dict[str, Any] = {
        "event": "request_failed",
        "request_id": request_id,
        "method": method,
        "code": code,
        "reason": reason,
        "model": model,
        "version": version,
        "error": message,
    }
    if duration_s is not None:
        fields["duration_ms"] = round(duration_s * 1000.0, 3)
    if peer:
        fields["peer"] = peer
    if suppressed:
        fields["suppressed"] = suppressed
    _requests_log.log(
        level,
        "request failed",
        extra={"fields": fields},
        exc_info=exc_info if (exc_info is not None and level == logging.ERROR) else None,
    )


def access_log_enabled() -> bool:
    """Cheap check so callers skip building the line when the access log is off."""
    return _access_log.isEnabledFor(logging.INFO)


def log_access(
    *,
    request_id: str,
    method: str,
    code: str,
    duration_s: float,
    model: str = "",
    version: str = "",
    images: int | None = None,
    peer: str = "",
) -> None:
    """One access-log line per request (a no-op unless `configure_logging(access_log=True)`)."""
    if not _access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "event": "access",
        "request_id": request_id,
        "method": method,
        "code": code,
        "model": model,
        "version": version,
        "duration_ms": round(duration_s * 1000.0, 3),
    }
    if images is not None:
        fields["images"] = images
    if peer:
        fields["peer"] = peer
    _access_log.info("request", extra={"fields": fields})


# ---- native output (ONNX Runtime's own logger, gRPC core) through the server's logger --------------------

NATIVE_LOGGER = "convserve.native"
# ONNX Runtime's default sink: `2026-11-26 14:36:42.955636648 [W:onnxruntime:Default, file.cc:613 fn()] msg`.
_ORT_LINE = re.compile(
    r"^\S+ \S+ \[(?P<sev>[VIWEF]):onnxruntime:(?P<logid>[^,\]]*)(?:, (?P<where>[^\]]*))?\] ?(?P<msg>.*)$"
)
_ORT_LEVELS = {"V": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
               "F": logging.CRITICAL}  # fmt: skip
# gRPC core (absl/glog style): `E1126 14:36:42.955636    123 file.cc:42] msg`.
_GLOG_LINE = re.compile(r"^(?P<sev>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<where>[^\]]+)\] (?P<msg>.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# gRPC core lines that a normal shutdown causes, logged at DEBUG: the drain shuts the gRPC listener down
# itself (sockets.shut_down_port, so new connections are refused at once), and the accept grpc had
# pending on it then fails with "Closing acceptor. Failed accept4: Invalid argument".
_EXPECTED_GRPC_LINES = ("Closing acceptor. Failed accept4",)
# ONNX Runtime's own severity (0 verbose .. 4 fatal) for the server's log level: its INFO is a wall of
# graph-optimizer lines, so it speaks at INFO only when the server logs DEBUG.
_ORT_SEVERITY = {"DEBUG": 1, "INFO": 2, "WARNING": 2, "ERROR": 3, "CRITICAL": 4}


def native_record(line: str) -> tuple[int, str, dict[str, Any]]:
    """(level, message, fields) for one line a native library wrote to stderr."""
    line = _ANSI.sub("", line).rstrip("\r\n")
    if m := _ORT_LINE.match(line):
        fields = {"source": "onnxruntime", "where": (m["where"] or m["logid"]).strip()}
        return _ORT_LEVELS[m["sev"]], m["msg"], fields
    if m := _GLOG_LINE.match(line):
        msg = m["msg"]
        level = logging.DEBUG if msg.startswith(_EXPECTED_GRPC_LINES) else _ORT_LEVELS[m["sev"]]
        return level, msg, {"source": "grpc", "where": m["where"].strip()}
    return logging.WARNING, line, {"source": "stderr"}


_native_stream: TextIO | None = None


def route_native_logs(level: str = "INFO") -> TextIO:
    """Send every line written to file descriptor 2 (ONNX Runtime's logger, gRPC core, Python's own
    last-resort output) through the `convserve.native` logger, so `--log-format json` means every line
    is JSON. Returns a stream on the original stderr: give it to configure_logging(stream=...), or the
    handler would feed its own pipe. Sets ONNX Runtime's severity from `level`. Undone at exit, after
    the pipe is drained. Call it before onnxruntime is first imported (that import already logs);
    a second call returns the same stream."""
    global _native_stream
    if _native_stream is not None:
        return _native_stream
    import atexit
    import os
    import threading

    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    out = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    log = logging.getLogger(NATIVE_LOGGER)

    def pump() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if line.strip():
                    lvl, msg, fields = native_record(line)
                    log.log(lvl, "%s", msg, extra={"fields": fields})

    reader = threading.Thread(target=pump, name="convserve-native-logs", daemon=True)
    reader.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer goes: the reader drains it and ends
        reader.join(timeout=2.0)

    atexit.register(restore)
    # Only now: importing ONNX Runtime already logs (its telemetry set-up warns on a read-only home).
    try:
        import onnxruntime as ort
    except ImportError:  # the stderr route still covers gRPC core
        pass
    else:
        ort.set_default_logger_severity(_ORT_SEVERITY.get(level.upper(), 2))
    _native_stream = out
    return out
