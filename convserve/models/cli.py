"""`convserve train | export | evaluate | quantize | robustness | inspect | archs`: flags → calls into the
offline pipeline, nothing else.

Importing this module is light (argparse only): torch, ONNX Runtime and scikit-learn load inside the
handlers, so ``convserve --help`` and the client commands work on the base install.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from convserve.common.commands import CommandError

QUANTIZE_REFUSED = 3  # `convserve quantize`: a gate refused the int8 version (1 is any other error)


def add_commands(subparsers: Any) -> None:
    """Register the offline sub-commands on the ``convserve`` parser."""
    p = subparsers.add_parser(
        "train", help="train a CNN on the digits or an image folder; writes a checkpoint and plots",
        description="Train an architecture from the registry. The held-out test split is fixed (stratified, "
                    "seeded independently of --seed) so `convserve evaluate` sees the same images.")
    p.add_argument("--arch", default="lenet", help="architecture name (see `convserve archs`); default lenet")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's 1,797 handwritten digits), 'digits-synth' (those plus "
                        "printed digits from the training fonts and redrawn scans: the bundled model's data) "
                        "or 'imagefolder:PATH' (one sub-folder of JPEG/PNG images per class); default digits")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for checkpoint.pt and the PNG plots; default runs/<data>_<arch>")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation")
    p.add_argument("--epochs", type=int, default=None, help="default: 15 for digits, 20 for an image folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (AdamW, one-cycle schedule); default 3e-3")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier for the architecture")
    p.add_argument("--color", choices=("L", "RGB"), default=None,
                   help="colour mode the model sees (image folder only; digits are L); default RGB")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side in pixels; default 28 (digits are upscaled from 8x8)")
    p.add_argument("--max-shift", type=int, default=None,
                   help="augmentation: random shifts of up to this many pixels; default input-size/14; "
                        "0 = off")
    p.add_argument("--fit-ink", type=int, default=None,
                   help="grayscale preprocessing as MNIST: detect polarity, fit the ink into an N-pixel box, "
                        "centre it by mass (written to the model's config, so the server does the same); "
                        "default 20 for digits-synth, else off; 0 = off")
    p.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (fixed for reproducibility); default min(4, CPU count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines remain)")
    p.set_defaults(func=_train, extra="train")

    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX as a model repository entry (self-verified)",
        description="Write <repository>/<name>/<version>/model.onnx and <repository>/<name>/config.json. "
                    "The export checks itself against ONNX Runtime and writes nothing if the check fails.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint.pt written by `convserve train`")
    p.add_argument("--name", required=True, help="model name in the repository (letters, digits, _ . -)")
    p.add_argument("--version", type=int, default=None, help="numeric version; default: next free one")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--max-batch-size", type=int, default=128, help="largest batch the server may run")
    p.set_defaults(func=_export, extra="train")

    p = subparsers.add_parser(
        "evaluate", help="measure an exported model through ONNX Runtime on the held-out split",
        description="Runs the served artefact itself (model.onnx with the preprocessing from config.json) "
                    "on the held-out test split used by `convserve train`, or on a whole image folder.")
    p.add_argument("--model-dir", type=Path, required=True, help="e.g. model_repository/digits_lenet")
    p.add_argument("--version", type=int, default=None, help="default: the highest version present")
    p.add_argument("--data", action="append", default=None,
                   help="'digits', 'digits-synth', 'fonts-unseen', 'digits-mnist-style' or "
                        "'imagefolder:PATH'; repeat to report several side by side; default digits")
    p.add_argument("--generalisation", action="store_true",
                   help="report the in-distribution split beside the held-out sets: the same as --data "
                        "digits --data digits-mnist-style --data fonts-unseen")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="'test' = the held-out split training never saw (default); 'all' = every image")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print JSON instead of text (a list for several sets)")
    p.add_argument("--samples", type=Path, default=None, metavar="PNG",
                   help="also draw 12 images of each set, as sent and as the model sees them, into this PNG")
    p.set_defaults(func=_evaluate, extra="train")

    p = subparsers.add_parser(
        "quantize", help="write an int8 version of a model, only if it is as accurate and faster",
        description="Quantize a model's float version (static QDQ, int8 per-channel weights) and write it as "
                    "the model's next version, config unchanged but for a record of how. Nothing is written "
                    "unless, on held-out images, top-1 accuracy drops at most 0.5 points and top-1 agreement "
                    "with the float model is at least 99%, and the int8 graph is faster in-process at batch "
                    "1 and 32 (--force writes it anyway). Exit status 3 when a gate refuses.")
    p.add_argument("model_dir", type=Path, help="e.g. model_repository/digits_lenet")
    p.add_argument("--calibration", type=Path, default=None, metavar="IMAGES_DIR",
                   help="images like those served (any layout), preprocessed as the server does; default: "
                        "the training split of the data convserve trained the model on (required for an "
                        "imported model)")
    p.add_argument("--eval", type=Path, default=None, metavar="IMAGES_DIR",
                   help="held-out images, labelled by sub-folder (or unlabelled: agreement only); default: "
                        "the held-out split of the model's training data")
    p.add_argument("--from-version", type=int, default=None,
                   help="the float version to quantize; default the highest version not itself int8")
    p.add_argument("--force", action="store_true", help="write the int8 version even if a gate fails")
    p.set_defaults(func=_quantize, extra="train")

    p = subparsers.add_parser(
        "robustness", help="accuracy of exported models under shifts, scales and rotations; table and PNG",
        description="The seed's priors, measured: each model's accuracy as its input tensor (after "
                    "preprocessing) is shifted, scaled and rotated. Give the CNN and a dense baseline "
                    "(e.g. --arch mlp, trained the same way) to compare them on identical inputs.")
    p.add_argument("--model-dir", type=Path, action="append", required=True,
                   help="a model folder, e.g. model_repository/digits_lenet; repeat for each model")
    p.add_argument("--version", type=int, action="append", default=None,
                   help="the version to measure: once for every --model-dir, or once per --model-dir in "
                        "the same order (compare a model's float and int8 versions); default the highest")
    p.add_argument("--data", default="digits", help="data source as for evaluate; default digits")
    p.add_argument("--split", choices=("test", "all"), default="test", help="default: the held-out split")
    p.add_argument("--out", type=Path, default=Path("robustness.png"), help="PNG to write; default "
                                                                             "robustness.png")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_robustness, extra="train")

    p = subparsers.add_parser(
        "inspect", help="draw a model's first-layer kernels and an image's feature maps as a PNG",
        description="Reads the exported model.onnx (BatchNorm folded in: the kernels the server applies), "
                    "runs the image through the server's preprocessing and the graph, and draws the input, "
                    "the first convolution's kernels and up to 16 feature maps after each conv and pool.")
    p.add_argument("--model-dir", type=Path, required=True, help="e.g. model_repository/digits_lenet")
    p.add_argument("--image", type=Path, required=True, help="an image file (PNG, JPEG, ...)")
    p.add_argument("--version", type=int, default=None, help="default: the highest version present")
    p.add_argument("--out", type=Path, default=Path("inspect.png"), help="PNG to write; default inspect.png")
    p.set_defaults(func=_inspect, extra="train")

    p = subparsers.add_parser(
        "archs", help="list architectures with parameter counts and FLOPs",
        description="Parameter counts and multiply-accumulates of every registered architecture at its "
                    "reference input, next to the seed's MLP comparison (one 10k hidden layer on 300x300).")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=_archs, extra="train")


def _train(args: argparse.Namespace) -> int:
    from . import data, train

    _check_positive(epochs=args.epochs, batch_size=args.batch_size, input_size=args.input_size,
                    threads=args.threads)
    if args.width <= 0:
        raise CommandError(f"--width must be positive, got {args.width}")
    if args.lr is not None and not args.lr > 0:
        raise CommandError(f"--lr must be positive, got {args.lr}")
    if args.max_shift is not None and args.max_shift < 0:
        raise CommandError(f"--max-shift must be >= 0, got {args.max_shift}")
    if args.fit_ink is not None and args.fit_ink < 0:
        raise CommandError(f"--fit-ink must be >= 0, got {args.fit_ink}")
    _check_arch(args.arch)
    try:
        dataset = data.load_dataset(args.data)
        if dataset.fixed_color is not None and args.color not in (None, dataset.fixed_color):
            raise CommandError(f"--color {args.color}: {args.data} images are {dataset.fixed_color}")
        out = args.out or Path("runs") / f"{dataset.short_name}_{args.arch}"
        _check_writable_dir(out)
        options = train.TrainOptions(
            arch=args.arch, seed=args.seed, epochs=args.epochs or dataset.default_epochs,
            batch_size=args.batch_size, lr=3e-3 if args.lr is None else args.lr, width=args.width,
            color_mode=args.color or dataset.fixed_color or "RGB", input_size=args.input_size or 28,
            max_shift=args.max_shift, device=args.device, threads=args.threads,
            progress=not args.no_progress,
            fit_ink=(args.fit_ink or None) if args.fit_ink is not None else dataset.default_fit_ink)
        result = train.train(dataset, options, out)
    except (data.DataError, train.TrainError) as exc:
        raise CommandError(str(exc)) from None
    m = result.metrics
    print(f"test accuracy {m['test_accuracy']:.4f} ({m['test_correct']}/{m['test_size']}) "
          f"after {m['epochs']} epochs in {m['train_seconds']:.1f} s on {m['device']}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"plots: {result.curves_png}, {result.confusion_png}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import export, train

    if not 1 <= args.max_batch_size <= 4096:
        raise CommandError(f"--max-batch-size must be in 1..4096, got {args.max_batch_size}")
    if args.version is not None and args.version < 1:
        raise CommandError(f"--version must be a positive integer, got {args.version}")
    try:
        model, cfg = train.load_checkpoint(args.checkpoint)
        cfg = cfg.replace(name=args.name, max_batch_size=args.max_batch_size).validate()
    except train.TrainError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:  # ModelConfigError: e.g. a bad --name
        raise CommandError(str(exc)) from None
    try:
        path = export.export_model(model, cfg, args.repository, version=args.version, force=args.force)
    except export.ExportError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write to {args.repository}: {exc.strerror or exc}") from None
    print(f"exported {cfg.name} → {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import data, evaluate

    _check_positive(batch_size=args.batch_size)
    specs = list(args.data or [])
    if args.generalisation:
        specs += [s for s in evaluate.GENERALISATION_SETS if s not in specs]
    specs = specs or ["digits"]
    try:
        results = [evaluate.evaluate_model_dir(args.model_dir, spec, version=args.version, split=args.split,
                                               batch_size=args.batch_size) for spec in specs]
        if args.samples is not None:
            evaluate.plot_samples(args.model_dir, specs, args.samples, version=args.version)
    except (data.DataError, evaluate.EvaluateError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {args.samples}: {exc.strerror or exc}") from None
    if args.json:
        dicts = [r.to_dict() for r in results]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
    elif len(results) == 1:
        print(evaluate.format_report(results[0]))
    else:
        print(evaluate.format_summary(results))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from . import quantize

    _check_positive(from_version=args.from_version)
    for flag, folder in (("--calibration", args.calibration), ("--eval", args.eval)):
        if folder is not None and not folder.is_dir():
            raise CommandError(f"{flag} {folder}: expected a folder of images, found no such directory")
    try:
        result = quantize.quantize_model_dir(args.model_dir, calibration=args.calibration, eval_dir=args.eval,
                                             from_version=args.from_version, force=args.force)
    except quantize.QuantizeError as exc:
        raise CommandError(str(exc)) from None
    print(quantize.format_report(result))
    if result.written:
        forced = "" if result.gate.passed else " (--force: a gate failed)"
        print(f"wrote {args.model_dir / str(result.version) / 'model.onnx'}{forced}")
        return 0
    raise CommandError(f"int8 version not written: {'; '.join(result.gate.failures)} (--force writes it)",
                       exit_code=QUANTIZE_REFUSED)


def _robustness(args: argparse.Namespace) -> int:
    from . import data, evaluate, robustness

    try:
        versions = args.version or [None]
        if len(versions) == 1:
            versions = versions * len(args.model_dir)
        result = robustness.measure(args.model_dir, args.data, split=args.split, versions=versions)
    except (data.DataError, evaluate.EvaluateError) as exc:
        raise CommandError(str(exc)) from None
    try:
        robustness.plot(result, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(json.dumps(result.to_dict(), indent=2) if args.json else robustness.format_table(result))
    if not args.json:
        print(f"plot: {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from convserve.server.errors import InvalidInputError

    from . import evaluate, inspection

    if not args.image.is_file():
        raise CommandError(f"--image {args.image}: no such file")
    try:
        result = inspection.inspect_model(args.model_dir, args.image, version=args.version)
    except (evaluate.EvaluateError, InvalidInputError) as exc:
        raise CommandError(str(exc)) from None
    try:
        inspection.plot(result, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    top = int(result.probabilities.argmax())
    n, _, kh, kw = result.kernels.shape
    print(f"{args.image}: {result.labels[top]} ({result.probabilities[top]:.1%}); "
          f"{n} first-layer kernels of {kh}x{kw}, "
          f"{len(result.layers)} layers of feature maps → {args.out}")
    return 0


def _archs(args: argparse.Namespace) -> int:
    from . import summary

    rows = summary.summarize()
    print(json.dumps(rows, indent=2) if args.json else summary.format_table(rows))
    return 0


def _check_arch(name: str) -> None:
    from .registry import list_architectures

    names = list_architectures()
    if name not in names:
        raise CommandError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(names))}")


def _check_positive(**values: int | None) -> None:
    for flag, value in values.items():
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def _check_writable_dir(path: Path) -> None:
    """Fail before training, not after minutes of it, when the output folder cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise CommandError(f"output folder {path} is not writable")

