"""`python -m convserve.server`: the same as `convserve serve`."""

from __future__ import annotations

import argparse
import sys

from .observability import logs
from .settings import SettingsError, add_arguments, from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convserve.server",
        description="Serve the model repository over gRPC (see `convserve serve --help`).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = from_args(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.log_format == "json":  # before .app imports onnxruntime, whose import already logs
        logs.route_native_logs(settings.log_level)
    from .app import serve_forever

    return serve_forever(settings)


if __name__ == "__main__":
    sys.exit(main())
