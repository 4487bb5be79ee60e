"""Request ids: the client's x-request-id when sane, else generated; body ids echoed exactly or refused."""

from __future__ import annotations

import pytest

from convserve.server.errors import InvalidInputError
from convserve.server.observability import request_ids as rid


def test_request_id_is_taken_from_metadata_when_sane_else_generated() -> None:
    assert rid.request_id_from_metadata([("other", "x"), ("x-request-id", "trace-42")]) == "trace-42"
    assert rid.request_id_from_metadata([("x-request-id", b"bytes-id")]) == "bytes-id"
    generated = rid.request_id_from_metadata(None)
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert rid.request_id_from_metadata([]) != generated
    for bad in ("", "has space", "new\nline", "x" * 129, "ünïcode"):
        got = rid.request_id_from_metadata([("x-request-id", bad)])
        assert got != bad and len(got) == 32


def test_request_ids_in_bodies_are_echoed_exactly_or_refused_by_name() -> None:
    longest = "x" * rid.MAX_CLIENT_ID_CHARS
    for given in ("trace-42", "", "my request #1", "{3f2a}", "a b", "ünïcode ✓", longest):
        assert rid.echo_request_id(given, "id") == given
        assert rid.error_reply_id(given) == given
    too_long = "r" * (rid.MAX_CLIENT_ID_CHARS + 1)
    with pytest.raises(InvalidInputError, match=r"^request_id: expected at most 1024 characters, got 1025$"):
        rid.echo_request_id(too_long, "request_id")
    assert rid.error_reply_id(too_long) == ""
