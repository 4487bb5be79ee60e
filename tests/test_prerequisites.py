"""One rule for what `make test` installs: missing, a test skips on a developer checkout, fails in CI."""

from __future__ import annotations

import sys

import pytest

from convserve.testing.prerequisites import require_binary, require_module


def test_a_missing_prerequisite_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool"):
        require_binary("no-such-tool-7f3a", "no-such-tool-7f3a is not installed")
    with pytest.raises(pytest.skip.Exception, match="no_such_module"):
        require_module("no_such_module_7f3a", "no_such_module_7f3a is not installed", module_level=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool"):
        require_binary("no-such-tool-7f3a", "no-such-tool-7f3a is not installed")
    with pytest.raises(pytest.fail.Exception, match="no_such_module"):
        require_module("no_such_module_7f3a", "no_such_module_7f3a is not installed")


def test_a_present_prerequisite_is_found() -> None:
    assert require_binary("no-such-tool-7f3a", "unused", sys.executable) == sys.executable
    require_module("json", "unused")  # returns quietly
