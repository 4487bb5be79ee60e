"""CLI plumbing every sub-command shares: the user-facing error and the message for a missing extra."""

from __future__ import annotations

# Which extra brings each third-party module a sub-command may import. One row per module; a command
# names its own extra (set_defaults(extra=...)) so the message fits the command that failed.
EXTRA_HINTS = {
    "server": "pip install 'convserve[server]' (or 'convserve[server-gpu]' for CUDA)",
    "train": "pip install 'convserve[train]' (docs/getting-started.md: a CPU-only torch)",
}


class CommandError(Exception):
    """A user-facing failure: printed as one ``error: ...`` line, exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def missing_extra(exc: ModuleNotFoundError, command: str, extra: str | None) -> CommandError | None:
    """The one-line error for ``convserve COMMAND`` run without the extra it needs, or None when the
    missing module is not a third-party dependency (a bug, which keeps its traceback)."""
    module = (exc.name or "").split(".")[0]
    if not module or module == "convserve" or extra not in EXTRA_HINTS:
        return None
    return CommandError(
        f"convserve {command} needs the {extra} extra (module {module!r} is not installed): "
        f"{EXTRA_HINTS[extra]}"
    )
