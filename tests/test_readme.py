"""The README stays a front page with the set-up contract, its links lead somewhere, and the generated
settings table on the configuration page stays true."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAX_README_LINES = 300
# User docs carry no history; figures with their date and load average live on the performance page, and
# the design document keeps its own record.
HISTORY_ALLOWED = {"performance.md", "DESIGN.md"}


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


def test_readme_is_a_front_page() -> None:
    lines = len(README.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_readme_links_lead_to_files_and_no_image_is_relative() -> None:
    """README is also the package's long description on PyPI, where relative images break."""
    links = re.findall(r"(!?)\[[^\]]*\]\(([^)\s]+)\)", README)
    assert links, "README links into the docs"
    for bang, target in links:
        if re.match(r"[a-z]+://", target):
            continue
        assert not bang, f"relative image {target!r} in README.md"
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README.md links to {path!r}, which does not exist"
        if anchor:
            headings = re.findall(r"^#{1,6} (.+)$", (ROOT / path).read_text(), re.MULTILINE)
            slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h.strip().lower())) for h in headings}
            assert anchor in slugs, f"README.md links to {target!r}: no such heading"


def test_user_docs_carry_no_dates_or_commit_hashes() -> None:
    pages = [ROOT / "README.md", *(p for p in (ROOT / "docs").glob("*.md") if p.name not in HISTORY_ALLOWED)]
    for page in pages:
        text = page.read_text()
        dated = re.findall(r"\b20\d\d-\d\d-\d\d\b|\b\d\d:\d\d UTC\b", text)
        assert not dated, f"{page.relative_to(ROOT)} carries dates {dated}: history lives in git"
        hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", text)
        assert not hashes, f"{page.relative_to(ROOT)} carries commit hashes {hashes}"


def test_settings_table_matches_the_settings_object() -> None:
    module = _settings_table()
    page = module.PAGE.read_text()
    block = re.search(re.escape(module.START) + r"\n(.*?)\n" + re.escape(module.END), page, re.DOTALL)
    assert block, f"{module.PAGE.relative_to(ROOT)} has no settings table markers"
    stale = f"{module.PAGE.relative_to(ROOT)} settings table is stale: run python scripts/settings_table.py"
    assert block.group(1) == module.render(), stale
