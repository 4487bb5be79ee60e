"""Render the server's settings as the configuration page's table (docs/configuration.md).

The table is derived from ``convserve.server.settings.Settings`` so the docs cannot drift from
the code; ``tests/test_readme.py`` fails when the committed table differs from this output.
"""

from __future__ import annotations

import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- settings:start -->", "<!-- settings:end -->"
PAGE = ROOT / "docs" / "configuration.md"


def _default(f) -> str:
    if f.name == "model_repository":
        return "bundled `model_repository/`"
    value = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    return f"`{value}`" if value not in ("", None) else "(unset)"


def render() -> str:
    from convserve.server.settings import ENV_PREFIX, Settings

    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | {_default(f)} | {doc} |")
    return "\n".join(rows)


def update(page: Path = PAGE) -> bool:
    """Rewrite the table between the markers; return True when the file changed."""
    text = page.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    new = pattern.sub(lambda _: f"{START}\n{render()}\n{END}", text)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    print(f"{PAGE.relative_to(ROOT)} updated" if update() else f"{PAGE.relative_to(ROOT)} already current")
    sys.exit(0)
