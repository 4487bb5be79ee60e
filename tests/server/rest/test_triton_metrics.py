"""Triton's nv_inference_* families on /metrics, consistent with the requests sent, and the switch off."""

from __future__ import annotations

import urllib.request
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rest_client import post_json

FAMILIES = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _infer(rest: str, n: int, seed: int, shape: tuple[int, ...] = (1, 8, 8)) -> Any:
    x = np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)
    inp = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return post_json(f"{rest}/v2/models/gray/infer", {"inputs": [inp]})


def test_nv_inference_families_count_what_was_sent(server_factory: Any) -> None:
    handle = server_factory()
    for i in range(3):
        assert _infer(handle.http_url, 2, i).status == 200
    bad = _infer(handle.http_url, 1, 9, shape=(1, 4, 4))  # fails after the lookup: counted as a failure
    assert bad.status == 400
    samples = _scrape(handle.metrics_port)
    gray2 = (("model", "gray"), ("version", "2"))

    def nv(name: str) -> float:
        return samples[(name, gray2)]

    for name in FAMILIES:
        assert (name, gray2) in samples, name
    assert nv("nv_inference_request_success") == 3
    assert nv("nv_inference_request_failure") == 1
    assert nv("nv_inference_count") == 6  # images run; the failed request never reached the model
    assert 1 <= nv("nv_inference_exec_count") <= 3
    assert nv("nv_inference_compute_infer_duration_us") > 0
    assert nv("nv_inference_compute_input_duration_us") > 0
    assert nv("nv_inference_request_duration_us") >= nv("nv_inference_compute_infer_duration_us")
    # The other version of the same model served nothing; its series exist at zero.
    gray1 = (("model", "gray"), ("version", "1"))
    assert samples[("nv_inference_request_success", gray1)] == 0
    # convserve's own families count the same requests under api="rest".
    ok = ("convserve_requests_total", (("api", "rest"), ("code", "OK"), *gray2))
    assert samples[(ok[0], tuple(sorted(ok[1])))] == 3


def test_a_setting_turns_the_nv_families_off(server_factory: Any) -> None:
    handle = server_factory(triton_metrics=False)
    assert _infer(handle.http_url, 1, 0).status == 200
    samples = _scrape(handle.metrics_port)
    assert not [name for name, _ in samples if name.startswith("nv_")]
    assert any(name == "convserve_requests_total" for name, _ in samples)


def test_every_nv_family_is_exported_and_documented() -> None:
    from pathlib import Path

    from convserve.server.observability.triton_metrics import FAMILIES as EXPORTED

    assert tuple(name for name, _, _ in EXPORTED) == FAMILIES
    page = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    section = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    for name in FAMILIES:
        assert f"`{name}`" in section, name
