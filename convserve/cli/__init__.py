"""The ``convserve`` command: one entry point whose sub-commands load lazily from their extras.

Each area registers its own sub-commands (``add_commands(subparsers)``) and keeps heavy imports
(torch, onnxruntime) inside the command functions, so ``convserve --help`` and the client
commands work on the light base install. This package sits above client/, server/ and models/
(it gathers their commands), so none of them imports another to reach the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from convserve.common.commands import CommandError, missing_extra

__all__ = ["CommandError", "build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convserve")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage wall
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from convserve.client.commands import add_commands as add_client_commands
    from convserve.models.cli import add_commands as add_model_commands
    from convserve.server.cli import add_commands as add_server_commands

    parser = _Parser(prog="convserve", description="CNN image classification served over gRPC.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_server_commands(sub)
    add_model_commands(sub)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as exc:  # an extra this command needs is not installed
            error = missing_extra(exc, args.command, getattr(args, "extra", None))
            if error is None:
                raise
            raise error from None
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
