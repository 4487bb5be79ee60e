"""Bearer tokens: the accepted set read from a file, and the constant-time check both front ends use."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path


def read_tokens(path: str | Path) -> tuple[bytes, ...]:
    """Accepted bearer tokens: one per line; blank lines and ``#`` comments ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    tokens = tuple(
        line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ValueError(f"auth token file {path} holds no tokens")
    return tokens


def bearer_valid(value: str | bytes | None, tokens: Sequence[bytes]) -> bool:
    """Whether an ``authorization`` value is ``Bearer <one of tokens>`` (gRPC metadata or HTTP header)."""
    if value is None:
        return False
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode("latin-1", "replace")
    # Compare against every token so the time taken does not reveal which prefix matched.
    ok = False
    for expected in tokens:
        ok |= hmac.compare_digest(given, expected)
    return ok
