"""Shared fixtures: environment isolation. Area-specific fixtures live in each area's conftest."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_convserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CONVSERVE_* variables: a developer's shell must not leak into tests."""
    for key in list(os.environ):
        if key.startswith("CONVSERVE_"):
            monkeypatch.delenv(key, raising=False)
