"""`convserve classify | models | health`: the SDK on the command line, with one-line errors."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convserve.common.commands import CommandError

# Files per request: a few large batches instead of one call per file, under the server's image limit.
CHUNK = 32


def add_commands(subparsers: Any) -> None:
    """Register ``classify``, ``models`` and ``health`` on the ``convserve`` command."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--server", metavar="HOST:PORT", default=None,
                       help="server address (default: $CONVSERVE_SERVER, else 127.0.0.1:8001)")
    group.add_argument("--timeout", type=float, default=10.0, metavar="S",
                       help="deadline per call in seconds, retries included (default: 10)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--tls-ca", metavar="PEM", help="root certificate(s) to trust; implies TLS")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="client private key for mTLS (with --tls-cert)")
    group.add_argument("--tls-server-name", metavar="NAME",
                       help="name to check the server certificate against")
    group.add_argument("--token-file", metavar="PATH",
                       help="file holding a bearer token, sent as authorization metadata")

    p = subparsers.add_parser(
        "classify", parents=[connection], help="classify image files with a running server",
        description="Classify image files (PNG, JPEG, ...) with a running convserve server and print "
                    "one row per image: file, top label, its probability and the other top-k.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to classify")
    p.add_argument("--model", default=None,
                   help="model name (default: the server's only model, else digits_lenet)")
    p.add_argument("--version", type=int, default=None, help="model version (default: the latest ready)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="predictions per image (default: the server's, 5 capped at the class count)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    p.set_defaults(func=_classify)

    p = subparsers.add_parser(
        "models", parents=[connection], help="list the models a running server holds",
        description="List every model on a running server with its versions, states, input and provider.")
    p.add_argument("--json", action="store_true", help="print one JSON object per model")
    p.add_argument("--wide", action="store_true",
                   help="print failure reasons whole (by default they are cut to the terminal's width)")
    p.set_defaults(func=_models)

    p = subparsers.add_parser(
        "health", parents=[connection], help="exit 0 only when a server is SERVING (a container healthcheck)",
        description="Ask the standard gRPC health service; exit 0 when SERVING, 1 otherwise.")
    p.add_argument("--service", default="", help="health of one service (default: the whole server)")
    p.set_defaults(func=_health)


def _client(args: argparse.Namespace, **overrides: Any) -> Any:
    from convserve.client import Client


    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"cannot read --token-file {args.token_file!r}: {exc.strerror}") from None
    try:
        return Client(args.server, timeout=args.timeout, token=token, tls=args.tls or None,
                      root_certificates=_path(args.tls_ca), client_cert=_path(args.tls_cert),
                      client_key=_path(args.tls_key), tls_server_name=args.tls_server_name, **overrides)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot set up the connection: {exc}") from None


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _unavailable(client: Any, exc: Exception) -> Exception:

    return CommandError(f"server {client.target} unavailable: {getattr(exc, 'details', exc)}")


def _classify(args: argparse.Namespace) -> int:
    from convserve.client import InvalidInputError, ServerUnavailableError
    from convserve.client.inputs import to_image


    try:  # unreadable files fail here, before any call
        images = [to_image(name, "IMAGE") for name in args.images]
    except InvalidInputError as exc:
        raise CommandError(exc.details) from None
    with _client(args) as client:
        rows: list[tuple[str, Any]] = []
        for start in range(0, len(images), CHUNK):
            names = args.images[start:start + CHUNK]
            try:
                results = client.classify_batch(images[start:start + CHUNK], model=args.model,
                                                version=args.version, top_k=args.top_k)
            except ServerUnavailableError as exc:
                raise _unavailable(client, exc) from None
            except InvalidInputError as exc:  # the server names images[i]; the user knows the file
                raise InvalidInputError(_name_files(exc.details, names), exc.code) from None
            rows.extend(zip(names, results, strict=True))
    if args.json:
        for name, result in rows:
            print(json.dumps({
                "file": name, "model": result.model, "version": result.version,
                "predictions": [{"index": p.index, "label": p.label, "probability": round(p.probability, 6)}
                                for p in result]}))
    else:
        table = [(name, r.top.label, f"{r.top.probability:.1%}", ", ".join(str(p) for p in r.predictions[1:]))
                 for name, r in rows]
        _print_table(("FILE", "LABEL", "PROB", "OTHERS"), table)
    return 0


def _name_files(details: str, names: Sequence[str]) -> str:
    def name(match: re.Match[str]) -> str:
        i = int(match.group(1))
        return names[i] if i < len(names) else match.group(0)

    return re.sub(r"\bimages\[(\d+)\]", name, details)


def _models(args: argparse.Namespace) -> int:
    from convserve.client import ConvserveError, ServerUnavailableError

    with _client(args) as client:
        try:
            models = client.models()
            described = {}
            for info in models:
                try:
                    described[info.name] = client.model(info.name)
                except ConvserveError:  # a model that failed to load may have nothing to describe
                    described[info.name] = None
        except ServerUnavailableError as exc:
            raise _unavailable(client, exc) from None
    if args.json:
        for info in models:
            meta = described[info.name]
            print(json.dumps({
                "name": info.name,
                "versions": [{"version": v.version, "state": v.state, "reason": v.reason,
                              "execution_provider": v.execution_provider} for v in info.versions],
                "input": None if meta is None else {
                    "name": meta.input.name, "dtype": meta.input.dtype, "shape": list(meta.input.shape),
                    "layout": meta.input.layout, "color_mode": meta.input.color_mode},
                "labels": None if meta is None else list(meta.labels),
                "max_batch_size": None if meta is None else meta.max_batch_size}))
        return 0
    table: list[tuple[str, ...]] = []
    for info in models:
        meta = described[info.name]
        for v in info.versions:
            state = f"{v.state} ({v.reason})" if v.reason else v.state
            table.append((info.name, str(v.version), state, v.execution_provider or "-",
                          "-" if meta is None else str(meta.input)))
    header = ("MODEL", "VERSION", "STATE", "PROVIDER", "INPUT")
    if not args.wide:
        table = _fit_column(header, table, header.index("STATE"), shutil.get_terminal_size().columns)
    _print_table(header, table)
    return 0


def _health(args: argparse.Namespace) -> int:
    from convserve.client import RetryPolicy, ServerUnavailableError


    # A healthcheck reports the state now: no retries.
    with _client(args, retry=RetryPolicy(max_attempts=1)) as client:
        try:
            status = client.health(args.service)
        except ServerUnavailableError as exc:
            raise _unavailable(client, exc) from None
    if status != "SERVING":
        raise CommandError(f"server {client.target} is {status}")
    print(status)
    return 0


def _fit_column(
    header: Sequence[str], rows: list[tuple[str, ...]], col: int, width: int
) -> list[tuple[str, ...]]:
    """Cut column ``col`` (a failure reason runs to hundreds of characters) so rows fit ``width``; the
    column keeps at least its header's width plus a little, so a narrow terminal still shows the state."""
    others = sum(max(len(r[i]) for r in (header, *rows)) + 2 for i in range(len(header)) if i != col)
    room = max(width - others, len(header[col]) + 12)
    return [(*r[:col], _cut(r[col], room), *r[col + 1:]) for r in rows]


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 1] + "…"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
