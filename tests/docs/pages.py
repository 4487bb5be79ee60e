"""The docs as tests read them: pages, sections, code blocks, and console sessions run for real.

A ```console block is a session the tests run: a line starting with ``$ `` is a command (a line ending in
``\\`` continues it on the next line), and the lines after it, up to the next command, are what it prints.
Shown output is compared by structure: runs of spaces are one space, every number matches any number, and
``...`` matches anything (a line holding only ``...`` matches any number of lines). A command whose shown
output starts with ``error:`` must exit non-zero; every other one must exit 0. ```sh blocks are set-up
steps (``make serve``) and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^(```+|~~~+)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_MARK = "@@convserve-docs-command@@"


def read(page: str) -> str:
    """The text of a page, named from the repository root (``README.md``, ``docs/rest.md``)."""
    return (ROOT / page).read_text(encoding="utf-8")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every heading outside fenced code."""
    found, fence = [], None
    for i, line in enumerate(text.splitlines()):
        opener = _FENCE.match(line)
        if opener:
            fence = None if fence and line.startswith(fence) else (fence or opener.group(1))
            continue
        heading = re.match(r"^(#{1,6}) (.+)$", line)
        if heading and fence is None:
            found.append((i, len(heading.group(1)), heading.group(2).strip()))
    return found


def section(text: str, title: str) -> str:
    """The section under the heading ``title`` (no #s), up to the next heading of its level or above."""
    lines = text.splitlines()
    headings = _headings(text)
    for n, (start, level, name) in enumerate(headings):
        if name == title:
            end = next((i for i, lv, _ in headings[n + 1 :] if lv <= level), len(lines))
            return "\n".join(lines[start:end]) + "\n"
    raise AssertionError(f"no heading {title!r}; headings: {[name for _, _, name in headings]}")


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


@dataclass(frozen=True)
class Command:
    """One ``$`` command of a console block and the output the page shows for it."""

    command: str
    shown: tuple[str, ...]

    @property
    def fails(self) -> bool:
        return bool(self.shown) and self.shown[0].startswith("error:")


def console_commands(text: str) -> list[Command]:
    """Every command of every console block of ``text``, in page order."""
    commands: list[Command] = []
    for block in code_blocks(text, "console"):
        command: list[str] = []
        shown: list[str] = []
        for line in block.splitlines():
            if line.startswith("$ ") and not (command and command[-1].endswith("\\")):
                if command:
                    commands.append(Command("\n".join(command), tuple(shown)))
                command, shown = [line[2:]], []
            elif command and command[-1].endswith("\\"):
                command.append(line)
            elif command:
                shown.append(line)
            else:
                raise AssertionError(f"console block starts with output, not a $ command: {line!r}")
        if command:
            commands.append(Command("\n".join(command), tuple(shown)))
    return commands


@dataclass(frozen=True)
class Ran:
    """A command as it ran: what it printed (stdout and stderr) and its exit status."""

    command: Command
    output: tuple[str, ...]
    status: int


def run_console(
    commands: list[Command],
    cwd: Path,
    env: Mapping[str, str],
    replace: Mapping[str, str],
    timeout: float = 120,
) -> list[Ran]:
    """Run the commands in order in one bash session (variables and files carry over) and split the output.

    ``replace`` rewrites text in each command first (the documented port to the test server's).
    """
    script = ["set -o pipefail"]
    for n, cmd in enumerate(commands):
        text = cmd.command
        for old, new in replace.items():
            text = text.replace(old, new)
        script += [f"printf '\\n{_MARK} begin {n}\\n'", text, f"printf '\\n{_MARK} end {n} %s\\n' \"$?\""]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    outputs: dict[int, list[str]] = {}
    statuses: dict[int, int] = {}
    current: int | None = None
    for line in done.stdout.splitlines():
        if line.startswith(f"{_MARK} begin "):
            current = int(line.split()[-1])
            outputs[current] = []
        elif line.startswith(f"{_MARK} end "):
            _, _, n, status = line.split()
            statuses[int(n)] = int(status)
            current = None
        elif current is not None:
            outputs[current].append(line)
    assert len(statuses) == len(commands), f"the session stopped early:\n{done.stdout[-4000:]}"
    return [Ran(cmd, tuple(_trim(outputs[n])), statuses[n]) for n, cmd in enumerate(commands)]


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _canon(line: str) -> str:
    return _NUMBER.sub("#", " ".join(line.split()))


def _pattern(shown: tuple[str, ...]) -> re.Pattern[str]:
    parts = []
    for line in shown:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(re.escape(piece) for piece in _canon(line).split("...")) + r"\n")
    return re.compile("".join(parts))


def check(ran: Ran) -> None:
    """Assert that a command printed what its page shows and exited as the page implies."""
    actual = "".join(_canon(line) + "\n" for line in ran.output)
    assert _pattern(ran.command.shown).fullmatch(actual), (
        f"$ {ran.command.command}\nthe page shows:\n" + "\n".join(ran.command.shown)
        + "\nit printed:\n" + "\n".join(ran.output)
    )
    if ran.command.fails:
        assert ran.status != 0, f"$ {ran.command.command}: exit status 0, but the page shows an error"
    else:
        assert ran.status == 0, f"$ {ran.command.command}: exit status {ran.status}\n" + "\n".join(ran.output)
