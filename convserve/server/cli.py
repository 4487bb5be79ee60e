"""`convserve serve`: flags → Settings → the running server, nothing else."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Register ``serve`` and ``import`` on the ``convserve`` command (heavy imports stay in the handlers)."""
    from .repository.importer import add_command as add_import_command
    from .settings import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve the model repository over gRPC (and /metrics over HTTP)",
        description="Serve every model in the repository over gRPC: the convserve.v1 Classifier API, "
        "the KServe v2 inference API, health and reflection, on one port. Each setting is "
        "taken from its flag, else CONVSERVE_<SETTING>, else the --config file, else the default.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_serve, extra="server")
    add_import_command(subparsers)


def _serve(args: argparse.Namespace) -> int:
    from convserve.common.commands import CommandError

    from .observability import logs
    from .settings import SettingsError, from_args

    try:
        settings = from_args(args)
    except SettingsError as exc:
        raise CommandError(str(exc), exit_code=2) from None
    if settings.log_format == "json":  # before .app imports onnxruntime, whose import already logs
        logs.route_native_logs(settings.log_level)
    from .app import serve_forever

    return serve_forever(settings)
