"""Server log lines: text or JSON format, one structured line per failed request, the optional access log.

Structured fields travel as `extra={"fields": {...}}` on a record; the JSON formatter puts them at the top
level of the line, the text formatter appends them as `key=value`. Request ids come from the client's
`x-request-id` metadata when it is a sane token, else they are generated; the interceptor echoes the id
back in trailing metadata, so a client's error report can be matched with the server's log line.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = [
    "ACCESS_LOGGER",
    "REQUESTS_LOGGER",
    "REQUEST_ID_KEY",
    "JsonFormatter",
    "TextFormatter",
    "access_log_enabled",
    "configure_logging",
    "log_access",
    "log_failed_request",
    "new_request_id",
    "request_id_from_metadata",
]

REQUEST_ID_KEY = "x-request-id"
REQUESTS_LOGGER = "convserve.requests"
ACCESS_LOGGER = "convserve.access"

# A client-chosen id is echoed into logs and metadata, so only short printable tokens are accepted.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_HANDLER_MARK = "_convserve_handler"

_requests_log = logging.getLogger(REQUESTS_LOGGER)
_access_log = logging.getLogger(ACCESS_LOGGER)


# A random per-process prefix plus a counter: unique like a uuid4 (64 random bits per process, then a
# sequence), at about a tenth of its cost on the request path (measured ~12 µs per uuid4 under load).
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id (32 hex characters), unique within and across processes."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def request_id_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The client's `x-request-id` when present and well-formed, else a generated one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return new_request_id()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: msg key=value ...` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return text


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def configure_logging(
    level: str = "INFO", fmt: str = "text", access_log: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Install one handler on the `convserve` logger tree; calling again replaces it (tests, re-config).

    `fmt` is "text" or "json". The access log (`convserve.access`, one INFO line per request) is on only
    when `access_log` is true; failed-request lines (`convserve.requests`) follow `level`.
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
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The handler owns output: without this, a host application's root handler would print lines twice.
    root.propagate = False
    _access_log.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
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
    """One structured line for a failed request; a traceback only for INTERNAL (`exc_info`)."""
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
    level = logging.ERROR if code in ("INTERNAL", "UNKNOWN") else logging.WARNING
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
