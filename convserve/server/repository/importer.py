"""``convserve import``: an ONNX file made elsewhere (torchvision, the ONNX model zoo) → a complete entry.

The graph gives the input/output names, (C, H, W) and the class count (autocomplete.py here); the user
adds what a graph cannot say: labels, the normalisation it was trained with, whether it ends in a softmax.
Nothing is written until the server's own loader has accepted the graph against the config and an
encoded image and a random batch have run through it; then the entry is written atomically
(common/model_entry.py), like ``convserve export``.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

from convserve.common.model_config import NAME_PATTERN, OUTPUT_KINDS, ModelConfig, ModelConfigError
from convserve.common.model_entry import EntryWriteError, check_writable, next_version, write_entry

from .autocomplete import COLOR_MODES, read_signature

log = logging.getLogger(__name__)

# Named normalisations: (mean, std) per channel after scaling pixels to [0, 1].
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0,), (1.0,)),  # pixels / 255 only
    "centered": ((0.5,), (0.5,)),  # [-1, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet weights
}
DEFAULT_MAX_BATCH_SIZE = 64


class ImportModelError(RuntimeError):
    """The ONNX file cannot be served as a classifier, the options contradict it, or the entry cannot be
    written; the repository is left as it was."""


def build_config(
    model_path: Path,
    name: str,
    *,
    labels: list[str] | None = None,
    preprocess: str = "unit",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    output_kind: str = "logits",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> ModelConfig:
    """The complete config for ``model_path``: the graph's facts plus the given labels and preprocessing."""
    if not NAME_PATTERN.fullmatch(name):
        raise ImportModelError(f"--name: expected a model name matching {NAME_PATTERN.pattern}, got {name!r}")
    try:
        sig = read_signature(model_path)
    except ModelConfigError as exc:
        raise ImportModelError(str(exc)) from None
    c, h, w = sig.input_shape
    if labels is not None and len(labels) != sig.num_classes:
        raise ImportModelError(
            f"--labels: the graph has {sig.num_classes} classes but the file lists {len(labels)} labels"
        )
    if preprocess not in PRESETS:
        raise ImportModelError(f"--preprocess: expected one of {sorted(PRESETS)}, got {preprocess!r}")
    p_mean, p_std = PRESETS[preprocess]
    if len(p_mean) == 1:
        p_mean, p_std = p_mean * c, p_std * c
    elif len(p_mean) != c:
        raise ImportModelError(
            f"--preprocess {preprocess}: needs {len(p_mean)} channels, the graph input has {c}"
        )
    mean, std = mean or p_mean, std or p_std
    if sig.batch == 1:
        max_batch_size = 1  # a graph exported with a fixed batch of one takes one image per run
    data: dict[str, Any] = {
        "name": name,
        "input": {"name": sig.input_name, "shape": [c, h, w]},
        "output": {"name": sig.output_name, "kind": output_kind},
        "preprocessing": {
            "color_mode": COLOR_MODES[c], "resize": [h, w], "mean": list(mean), "std": list(std)
        },
        "labels": labels if labels is not None else [str(i) for i in range(sig.num_classes)],
        "max_batch_size": max_batch_size,
    }
    try:
        return ModelConfig.from_dict(data)
    except ModelConfigError as exc:
        raise ImportModelError(str(exc)) from None


def verify(model_path: Path, cfg: ModelConfig) -> None:
    """Load the graph as the server does (its graph-vs-config check) and run an encoded PNG and a random
    batch through it: the output must be [N, K] and finite. Raises ImportModelError."""
    import numpy as np
    from PIL import Image

    from ..runtime.preprocess import image_to_array
    from ..runtime.session import OnnxSession

    try:
        session = OnnxSession(model_path, cfg, ("cpu",))
    except Exception as exc:  # the loader's own reasons (GraphMismatchError, ONNX Runtime errors)
        raise ImportModelError(f"{model_path}: the server would refuse this model: {exc}") from None
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (cfg.input.height, cfg.input.width, cfg.input.channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if cfg.input.channels == 1 else pixels).save(buf, format="PNG")
    image = image_to_array(Image.open(io.BytesIO(buf.getvalue())), cfg)
    n = min(2, cfg.max_batch_size)
    batch = np.concatenate([image[None], rng.normal(size=(n - 1, *cfg.input.shape)).astype(np.float32)])
    out = session.run(batch[:n])
    if out.shape != (n, cfg.num_classes) or not np.all(np.isfinite(out)):
        raise ImportModelError(
            f"{model_path}: a test batch of {n} gave output {list(out.shape)}"
            f"{'' if np.all(np.isfinite(out)) else ' with non-finite values'}; "
            f"expected [{n}, {cfg.num_classes}]"
        )


def import_model(
    model_path: Path,
    cfg: ModelConfig,
    repository: Path,
    version: int | None = None,
    force: bool = False,
) -> Path:
    """Verify, then write ``<repository>/<cfg.name>/<version>/model.onnx``, every external-data file the
    graph names, and ``config.json`` atomically; the staged copy is verified again before it is moved in.

    ``version=None`` takes the next free number; an existing version is replaced only with ``force``.
    Returns the written model path. Raises ImportModelError and leaves the repository as it was.
    """
    model_path = Path(model_path)
    verify(model_path, cfg)
    data_files = external_files(model_path)
    repository = Path(repository)
    try:
        check_writable(repository)
    except EntryWriteError as exc:
        raise ImportModelError(str(exc)) from None
    model_dir = repository / cfg.name
    if version is not None and version < 1:
        raise ImportModelError(f"--version: expected a positive integer, got {version}")
    version = next_version(model_dir) if version is None else version
    target = model_dir / str(version)
    if target.exists() and not force:
        raise ImportModelError(
            f"{target} already exists; pass --force to replace it or choose another --version"
        )
    try:
        write_entry(
            model_dir, version, model_path.read_bytes(), cfg, data_files, lambda staged: verify(staged, cfg)
        )
    except OSError as exc:
        reason = exc.strerror or exc
        raise ImportModelError(f"cannot write model entry under {repository}: {reason}") from None
    log.info("imported %s as %s version %d", model_path, cfg.name, version)
    return target / "model.onnx"


def external_files(model_path: Path) -> dict[str, Path]:
    """Each external-data file the graph names → its path beside the graph (checked like the server does:
    relative, no '..', no link out). Raises ImportModelError."""
    from .model_files import Boundary, ModelFileError, check_graph

    boundary = Boundary()
    try:
        tensors = check_graph(model_path, model_path.read_bytes(), boundary)
    except (ModelFileError, OSError) as exc:
        raise ImportModelError(f"{model_path}: {exc}") from None
    return {t.location: model_path.parent / t.location for t in tensors}


# ---- the command ------------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    """Register ``convserve import`` (server extra: it needs ONNX Runtime and Pillow to verify)."""
    parser = subparsers.add_parser(
        "import",
        help="add an ONNX classifier made elsewhere to a model repository (config.json written for you)",
        description="Read the graph's input/output, add labels and preprocessing, check that the server "
        "would load it and that an encoded image runs through it, then write <repository>/<name>/"
        "<version>/model.onnx and config.json atomically.",
    )
    parser.add_argument("model", type=Path, help="the .onnx file: float input [N, C, H, W], output [N, K]")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--labels", type=Path, help="text file, one label per line, in class order")
    parser.add_argument(
        "--preprocess", choices=sorted(PRESETS), default="unit",
        help="normalisation after scaling pixels to [0, 1]: unit (none), centered (to [-1, 1]), "
        "imagenet (torchvision's mean/std); default unit",
    )
    parser.add_argument("--mean", type=_floats, help="per-channel mean, a,b,c (overrides --preprocess)")
    parser.add_argument("--std", type=_floats, help="per-channel std, a,b,c (overrides --preprocess)")
    parser.add_argument("--output-kind", choices=OUTPUT_KINDS, default="logits",
                        help="whether the graph ends in logits (softmax applied) or probabilities")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.set_defaults(func=_run)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    from convserve.common.commands import CommandError

    try:
        if not args.model.is_file():
            raise ImportModelError(f"{args.model}: no such ONNX file")
        labels = None
        if args.labels is not None:
            try:
                text = args.labels.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ImportModelError(f"--labels: cannot read {args.labels}: {exc}") from None
            labels = [line.strip() for line in text.splitlines() if line.strip()]
        cfg = build_config(
            args.model, args.name, labels=labels, preprocess=args.preprocess, mean=args.mean, std=args.std,
            output_kind=args.output_kind, max_batch_size=args.max_batch_size,
        )
        path = import_model(args.model, cfg, args.repository, args.version, args.force)
    except ImportModelError as exc:
        raise CommandError(str(exc)) from None
    print(f"imported {args.model} → {path} ({cfg.num_classes} classes, input {list(cfg.input.shape)})")
    return 0
