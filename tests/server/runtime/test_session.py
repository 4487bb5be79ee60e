"""ONNX Runtime sessions: the execution-provider preference falls back to what this build has."""

from __future__ import annotations

import pytest

from convserve.server.runtime.session import provider_list


def test_provider_list_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    available = ["CPUExecutionProvider"]
    with caplog.at_level("WARNING", logger="convserve.server.runtime.session"):
        assert provider_list(["openvino", "cuda", "cpu"], available) == ["CPUExecutionProvider"]
        assert provider_list(["openvino", "cuda", "cpu"], available) == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if "openvino, cuda requested but not available" in r.message]) == 1
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(["cuda"], both) == both  # cpu is always the floor
    assert provider_list(["cpu", "cuda"], both) == ["CPUExecutionProvider", "CUDAExecutionProvider"]
