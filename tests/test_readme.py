"""The README's set-up contract and its generated settings table stay true."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _settings_table():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)


def test_settings_table_matches_the_settings_object() -> None:
    module = _settings_table()
    block = re.search(re.escape(module.START) + r"\n(.*?)\n" + re.escape(module.END), README, re.DOTALL)
    assert block, "README has no settings table markers"
    stale = "README settings table is stale: run python scripts/settings_table.py"
    assert block.group(1) == module.render(), stale
