"""The one Settings object: CLI flag > ``CONVSERVE_<FIELD>`` env > config file (TOML/JSON) > default.

Every field is declared once below with a one-line ``doc``; the ``serve`` flags, the environment
variable names and the config-file keys are all derived from these declarations, so ``--help`` lists
every setting and nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "CONVSERVE_"
PROVIDERS = ("cuda", "tensorrt", "openvino", "cpu")
OPT_LEVELS = ("disable", "basic", "extended", "all")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """A setting has a value of the wrong kind or out of range; the message names its source."""


def default_model_repository() -> str:
    """The bundled model_repository/: beside the source tree (editable install) or the installed package's
    data (``convserve.model_repository``, the same folder in a wheel); else ./model_repository."""
    bundled = Path(__file__).resolve().parent.parent / "model_repository"
    if bundled.is_dir():
        return str(bundled)
    return str(Path.cwd() / "model_repository")


def _s(default: Any, doc: str, **extra: Any) -> Any:
    """Declare a setting with its one-line doc (shown by --help)."""
    if callable(default):
        return field(default_factory=default, metadata={"doc": doc, **extra})
    return field(default=default, metadata={"doc": doc, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start; immutable so every component sees the same values."""

    # Network
    host: str = _s("0.0.0.0", "interface the gRPC port binds (0.0.0.0 = all; tests use 127.0.0.1)")
    grpc_port: int = _s(8001, "gRPC port (0 = ephemeral; the bound port goes to --port-file)")
    http_port: int = _s(
        8000, "v2 HTTP/REST port, Triton's and KServe's REST protocol (0 = ephemeral, -1 = disabled)"
    )
    metrics_host: str = _s("", "interface for the HTTP /metrics endpoint (empty = same as --host)")
    metrics_port: int = _s(8002, "HTTP /metrics port (0 = ephemeral, -1 = disabled, same as --no-metrics)")
    port_file: str = _s(
        "", 'write the bound ports as JSON {"grpc_port", "http_port", "metrics_port"} to this file'
    )
    # Models and ONNX Runtime
    model_repository: str = _s(
        default_model_repository, "folder holding <model>/config.json + <version>/model.onnx"
    )
    execution_providers: tuple[str, ...] = _s(
        ("cpu",),
        f"ordered ONNX Runtime providers, comma-separated, from {','.join(PROVIDERS)}; cpu is the floor",
    )
    intra_op_threads: int = _s(
        0,
        "ONNX Runtime threads inside one operator (0 = ONNX Runtime's default; workers: cores ÷ workers)",
    )
    inter_op_threads: int = _s(0, "ONNX Runtime threads across operators (0 = ONNX Runtime's default)")
    graph_optimization_level: str = _s("all", f"ONNX Runtime graph optimizations: {'|'.join(OPT_LEVELS)}")
    spin_above_us: int = _s(
        1000,
        "CPU runs estimated longer than this (µs) keep ONNX Runtime's threads spinning during the run, "
        "stopping as it ends (-1 = never spin; docs/DESIGN.md)",
    )
    repository_poll_seconds: float = _s(
        0.0, "rescan the repository this often; new or changed versions serve without a restart (0 = off)"
    )
    allow_external_symlinks: bool = _s(
        False, "serve model folders or files that are symlinks leading outside the repository (off: refused)"
    )
    allow_model_control: bool = _s(
        False, "enable the LoadModel/UnloadModel RPCs; needs auth (tokens or mTLS) to start"
    )
    strict_readiness: bool = _s(
        True, "ready only while every model found loaded all its selected versions, as Triton does "
        "(--no-strict-readiness: ready while any version is)"
    )
    wait_for_repository: bool = _s(
        False, "start although the model repository is missing or unreadable and serve what polling "
        "finds later (off: exit with an error)"
    )
    # Batching defaults (a model's config overrides them)
    max_queue_delay_us: int = _s(0, "default longest wait for a fuller batch, microseconds (0 = never wait)")
    max_queue_size: int = _s(1024, "default bound on queued images per model; past it RESOURCE_EXHAUSTED")
    instances: int = _s(1, "default parallel ONNX Runtime sessions per model version")
    # Execution model (docs/DESIGN.md)
    inline_inference_us: int = _s(
        150, "single-image runs estimated at most this long run on the event loop when the batcher is idle"
    )
    offload_busy_loop: bool = _s(
        False,
        "send cheap single images to the batcher while the event loop is saturated, to run them on "
        "another core (measured slower under load on 2 cores: docs/DESIGN.md)",
    )
    workers: int = _s(
        0,
        "serving processes sharing the ports under a supervisor (0 = one per usable core: CPU affinity "
        "and cgroup quota; 1 = this process alone, no supervisor)",
    )
    event_loop: str = _s("uvloop", "event loop of `convserve serve`: uvloop (when installed) or asyncio")
    cpu_workers: int = _s(
        0,
        "threads for decoding and big pre/postprocessing (0 = one per CPU core; workers: cores ÷ workers)",
    )
    decode_pixels_in_flight: int = _s(
        48_000_000,
        "decoded pixels being decoded at once, per worker process; more waits (cost-bounded admission)",
    )
    # Requests
    top_k: int = _s(5, "predictions per image when a request leaves top_k at 0 (capped at the class count)")
    max_message_bytes: int = _s(64 * 1024 * 1024, "largest gRPC message accepted or sent, bytes")
    max_images_per_request: int = _s(1024, "most images (or tensor batch rows) in one request")
    max_image_bytes: int = _s(8 * 1024 * 1024, "largest encoded image accepted, bytes")
    max_image_pixels: int = _s(16_000_000, "largest decoded image, width*height (decompression-bomb guard)")
    allowed_image_formats: tuple[str, ...] = _s(
        ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"),
        "Pillow formats accepted for encoded images, comma-separated",
    )
    drain_grace_seconds: float = _s(10.0, "on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    # Security
    tls_cert: str = _s("", "PEM server certificate chain; with --tls-key turns on TLS")
    tls_key: str = _s("", "PEM private key for --tls-cert")
    tls_client_ca: str = _s(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    auth_token_file: str = _s("", "file of accepted bearer tokens, one per line; when set, calls need one")
    auth_tokens: tuple[str, ...] = _s(
        (), "accepted bearer tokens, comma-separated; prefer the env var or the file (flags show in ps)"
    )
    # Logging
    log_level: str = _s("INFO", f"log level: {'|'.join(LOG_LEVELS)}")
    log_format: str = _s("text", f"log line format: {'|'.join(LOG_FORMATS)}")
    access_log: bool = _s(False, "log one line per request (method, model, code, duration, request id)")
    # Metrics
    triton_metrics: bool = _s(
        True, "also export Triton's nv_inference_* families on /metrics, so Triton dashboards work unchanged"
    )

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port >= 0

    @property
    def http_enabled(self) -> bool:
        return self.http_port >= 0

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)


def _validate(s: Settings) -> None:
    problems: list[str] = []
    for name in ("grpc_port",):
        if not 0 <= getattr(s, name) <= 65535:
            problems.append(f"{name} must be in 0..65535, got {getattr(s, name)}")
    for name in ("metrics_port", "http_port"):
        if not -1 <= getattr(s, name) <= 65535:
            problems.append(f"{name} must be -1 (off) or 0..65535, got {getattr(s, name)}")
    bad = [p for p in s.execution_providers if p not in PROVIDERS]
    if bad or not s.execution_providers:
        problems.append(
            f"execution_providers must be a non-empty list from {PROVIDERS}, "
            f"got {list(s.execution_providers)}"
        )
    if s.graph_optimization_level not in OPT_LEVELS:
        problems.append(
            f"graph_optimization_level must be one of {OPT_LEVELS}, got {s.graph_optimization_level!r}"
        )
    if s.log_level.upper() not in LOG_LEVELS:
        problems.append(f"log_level must be one of {LOG_LEVELS}, got {s.log_level!r}")
    if s.event_loop not in ("uvloop", "asyncio"):
        problems.append(f"event_loop must be one of ('uvloop', 'asyncio'), got {s.event_loop!r}")
    if s.log_format not in LOG_FORMATS:
        problems.append(f"log_format must be one of {LOG_FORMATS}, got {s.log_format!r}")
    positive = (
        "max_queue_size",
        "instances",
        "top_k",
        "max_message_bytes",
        "max_images_per_request",
        "max_image_bytes",
        "max_image_pixels",
        "decode_pixels_in_flight",
    )
    problems += [f"{n} must be >= 1, got {getattr(s, n)}" for n in positive if getattr(s, n) < 1]
    if s.spin_above_us < -1:
        problems.append(f"spin_above_us must be >= -1, got {s.spin_above_us}")
    non_negative = (
        "inline_inference_us",
        "workers",
        "cpu_workers",
        "intra_op_threads",
        "inter_op_threads",
        "max_queue_delay_us",
        "drain_grace_seconds",
        "repository_poll_seconds",
    )
    problems += [f"{n} must be >= 0, got {getattr(s, n)}" for n in non_negative if getattr(s, n) < 0]
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("tls_cert and tls_key must be given together")
    if s.tls_client_ca and not s.tls_cert:
        problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
    if s.allow_model_control and not (s.auth_token_file or s.auth_tokens or s.tls_client_ca):
        problems.append("allow_model_control needs auth: set auth_token_file, auth_tokens or tls_client_ca")
    if not s.allowed_image_formats:
        problems.append("allowed_image_formats must name at least one format")
    if problems:
        raise SettingsError("; ".join(problems))


# ---- sources ---------------------------------------------------------------------------------


def _kind(f: Any) -> str:
    """The field's value kind as a string ('str', 'int', 'float', 'bool', 'tuple')."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return "tuple" if t.startswith("tuple") else t


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """Coerce a value from a flag, env var or config file to the field's kind."""
    try:
        if kind == "tuple":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(x).strip() for x in items if str(x).strip())
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: setting {name!r}: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Load a TOML (``.toml``) or JSON config file of ``field = value`` pairs (dashes or underscores)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {p}: cannot read: {exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # the same parser, as a package, before Python 3.11
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"config file {p}: cannot parse: {exc}") from None
    if isinstance(data.get("server"), dict):  # allow a [server] table
        data = data["server"]
    if not isinstance(data, dict):
        raise SettingsError(f"config file {p}: expected a table/object of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge the sources, highest first: flags, ``CONVSERVE_*`` env, config file, defaults.

    ``flags`` holds only the settings given on the command line; ``env`` defaults to ``os.environ``.
    The config file path comes from ``config_file``, else ``CONVSERVE_CONFIG``.
    """
    flags = dict(flags or {})
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Settings)}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    values: dict[str, Any] = {}
    if config_file:
        data = read_config_file(config_file)
        unknown = sorted(set(data) - set(by_name))
        if unknown:
            raise SettingsError(f"config file {config_file}: unknown setting(s) {unknown}")
        for name, value in data.items():
            values[name] = _convert(name, _kind(by_name[name]), value, f"config file {config_file}")
    for name, f in by_name.items():
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _convert(name, _kind(f), env[key], f"environment {key}")
    for name, value in flags.items():
        if name in by_name:
            values[name] = _convert(name, _kind(by_name[name]), value, f"flag --{name.replace('_', '-')}")
    try:
        return Settings(**values)
    except SettingsError:
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (values default to 'not given' so precedence can see the source)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML or JSON file of settings (keys as below, snake_case); env CONVSERVE_CONFIG",
    )
    for f in fields(Settings):
        kind = _kind(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default_factory is MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        doc = f"{f.metadata['doc']} [env {ENV_PREFIX}{f.name.upper()}; default {shown!s}]"
        if kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc
            )
        else:
            parser.add_argument(
                flag, metavar=f.name.split("_")[-1].upper(), default=argparse.SUPPRESS, dest=f.name, help=doc
            )
    parser.add_argument(
        "--no-metrics",
        dest="metrics_port",
        action="store_const",
        const=-1,
        default=argparse.SUPPRESS,
        help="disable the /metrics endpoint (same as --metrics-port -1)",
    )


def from_args(
    args: argparse.Namespace | Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from parsed ``serve`` arguments (or an argv list), the environment and the config file."""
    if args is None or not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(list(args or []))
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(Settings)}}
    return resolve(given, env=env, config_file=getattr(args, "config", None))
