"""The documented SDK examples run, as written, against a live server, so they never rot.

The examples live in the SDK page's "Python SDK" section and on the README's front page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sdk_testing import digit_pixels

from ..docs.pages import code_blocks, read, section

SDK_PAGE, SECTION = "docs/sdk.md", "Python SDK"
DOCUMENTED_ADDRESS = "127.0.0.1:8001"


def python_blocks() -> list[str]:
    return code_blocks(section(read(SDK_PAGE), SECTION), "python")


def examples() -> list[tuple[str, str]]:
    """(where, code) of every example: the SDK section's, then the README's."""
    sdk = [(f"{SDK_PAGE} example {n + 1}", code) for n, code in enumerate(python_blocks())]
    readme = code_blocks(read("README.md"), "python")
    front = [(f"README.md example {n + 1}", code) for n, code in enumerate(readme)]
    return sdk + front


def test_the_section_has_examples() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize(("where", "code"), examples(), ids=[where for where, _ in examples()])
def test_example_runs(where: str, code: str, small_server: Any, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    handle = small_server()  # one model: the examples rely on it being the default
    (tmp_path / "more").mkdir()
    Image.fromarray(digit_pixels(0, size=28)).save(tmp_path / "digit.png")
    for i in (1, 2, 3):
        Image.fromarray(digit_pixels(i, size=28)).save(tmp_path / "more" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert DOCUMENTED_ADDRESS in code, "examples name the documented address, which the test replaces"
    runnable = compile(code.replace(DOCUMENTED_ADDRESS, handle.address), f"<{where}>", "exec")
    exec(runnable, {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "every example prints what it got"

