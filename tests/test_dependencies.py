"""The SDK installs and works in a fresh venv: beside the newest tritonclient[grpc] (which pins protobuf 6),
and alone with the newest of everything (protobuf 7). The lowest declared versions are covered by
scripts/check_dependency_floor.py, a step of `make test`.

Each case builds a venv under the test's temp folder from the pip cache, installs convserve's wheel (built
once from this tree), then, in ONE process, imports the SDK (and tritonclient), classifies against a real
server subprocess and reports the protobuf/grpcio it ran with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys
import numpy as np
from google.protobuf import __version__ as protobuf_version
import grpc
from convserve.client import Client

address, png_path, with_triton = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
out = {"protobuf": protobuf_version, "grpcio": grpc.__version__}
if with_triton:
    import tritonclient.grpc as tc
    from importlib.metadata import version
    out["tritonclient"] = version("tritonclient")
with Client(address) as client:
    result = client.classify(open(png_path, "rb").read(), model="rgb", top_k=3)
    out["sdk"] = [[p.index, p.probability] for p in result.predictions]
if with_triton:
    x = np.load(png_path + ".npy")
    triton = tc.InferenceServerClient(address)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = triton.infer("rgb", [inp], outputs=[tc.InferRequestedOutput("logits")])
    out["triton"] = res.as_numpy("logits").tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sdk_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("convserve-*.whl")
    return wheel


def _fresh_venv(path: Path, *requirements: str) -> Path:
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        check=True,
        timeout=600,
    )
    return python


@pytest.mark.slow
@pytest.mark.parametrize("with_triton", [True, False], ids=["beside-tritonclient", "newest-alone"])
def test_sdk_in_a_fresh_venv(
    with_triton: bool,
    sdk_wheel: Path,
    tmp_path: Path,
    server_process: Any,
    model_repository: Path,
    run_reference: Any,
    encode_png: Any,
) -> None:
    extra = ("tritonclient[grpc]",) if with_triton else ()
    python = _fresh_venv(tmp_path / "venv", str(sdk_wheel), *extra)
    server = server_process("--model-repository", str(model_repository), "--no-strict-readiness")
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = tmp_path / "image.png"
    png.write_bytes(encode_png(pixels))
    cfg = json.loads((model_repository / "rgb" / "config.json").read_text())
    pre = cfg["preprocessing"]
    x = ((pixels / 255.0 - np.array(pre["mean"])) / np.array(pre["std"])).transpose(2, 0, 1)[None]
    x = x.astype(np.float32)
    np.save(str(png) + ".npy", x)

    done = subprocess.run(
        [str(python), "-c", PROBE, server.address, str(png), "1" if with_triton else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert "Warning" not in done.stderr, done.stderr  # no protobuf gencode/runtime version warning

    reference = run_reference(model_repository / "rgb" / "1" / "model.onnx", x)[0]
    probs = np.exp(reference - reference.max())
    probs /= probs.sum()
    best = np.argsort(-probs)[:3]
    assert [i for i, _ in seen["sdk"]] == best.tolist()
    np.testing.assert_allclose([p for _, p in seen["sdk"]], probs[best], atol=1e-5)
    if with_triton:
        assert int(seen["protobuf"].split(".")[0]) == 6  # what tritonclient pins
        np.testing.assert_allclose(np.array(seen["triton"])[0], reference, rtol=1e-5, atol=1e-6)
    else:
        assert int(seen["protobuf"].split(".")[0]) >= 7  # the newest protobuf major on the index
    assert server.stop() == 0
