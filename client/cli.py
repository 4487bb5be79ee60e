"""The ``convserve`` command: one entry point whose sub-commands load lazily from their extras.

Each area registers its own sub-commands (``add_commands(subparsers)``) and keeps heavy imports
(torch, onnxruntime) inside the command functions, so ``convserve --help`` and the client
commands work on the light base install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CommandError(Exception):
    """A user-facing failure: printed as one ``error: ...`` line, exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage wall
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from convserve.models.cli import add_commands as add_model_commands
    from convserve.server.cli import add_commands as add_server_commands

    parser = _Parser(prog="convserve", description="CNN image classification served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_server_commands(sub)
    add_model_commands(sub)
    try:
        from convserve.client.commands import add_commands as add_client_commands
    except ImportError:  # the client commands land with the SDK
        pass
    else:
        add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Client SDK errors and other user-facing failures carry their own message.
        if type(exc).__name__.endswith("Error") and getattr(exc, "user_facing", False):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    # Run the imported module, not __main__: its CommandError is the class the handlers raise.
    from convserve.client.cli import main as _main

    sys.exit(_main())
