"""The documented SDK examples run, as written, against a live server, so they never rot.

The examples live in README.md's "## Python SDK" section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sdk_testing import digit_pixels

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Python SDK"
DOCUMENTED_ADDRESS = "127.0.0.1:8001"


def sdk_section() -> tuple[Path, str]:
    for path in (ROOT / "README.md",):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        start = text.find(f"\n{SECTION}\n")
        if start >= 0:
            end = text.find("\n## ", start + len(SECTION) + 2)
            return path, text[start:] if end < 0 else text[start:end]
    raise AssertionError(f"no {SECTION!r} section in README.md")


def python_blocks() -> list[str]:
    _, section = sdk_section()
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_the_section_has_examples() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_example_runs(index: int, small_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    handle = small_server()  # one model: the examples rely on it being the default
    (tmp_path / "more").mkdir()
    Image.fromarray(digit_pixels(0, size=28)).save(tmp_path / "digit.png")
    for i in (1, 2, 3):
        Image.fromarray(digit_pixels(i, size=28)).save(tmp_path / "more" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[index]
    assert DOCUMENTED_ADDRESS in code, "examples name the documented address, which the test replaces"
    exec(compile(code.replace(DOCUMENTED_ADDRESS, handle.address), f"<SDK example {index + 1}>", "exec"),
         {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "every example prints what it got"

