"""The benchmark's model repository: the shipped digits LeNet and a generated ResNet-18-shaped model.

The ResNet-18 (224×224×3 in, 1000 classes, random weights) is built from our own layers with
``convserve.models.build("resnet18")`` and written by ``export_model`` on first use into the bench
folder (``bench_results/models`` by default, git-ignored); later runs reuse it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from convserve.common.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    Batching,
    InputSpec,
    ModelConfig,
    Preprocessing,
    VersionPolicy,
    load_config,
    write_config,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_LENET = REPO_ROOT / "model_repository" / "digits_lenet"
LENET = "digits_lenet"
RESNET = "resnet18_bench"


def latest_version(model_dir: Path) -> Path | None:
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and
                       (p / MODEL_FILE).is_file()), key=lambda p: int(p.name))
    return versions[-1] if versions else None


def prepare_lenet(repository: Path, max_batch_size: int = 64) -> str:
    """Copy the shipped digits LeNet (latest version) into ``repository``; export a random-weight LeNet of
    the same shape when the shipped one is not there yet. Returns where it came from."""
    target = repository / LENET
    if target.exists():
        shutil.rmtree(target)
    shipped = latest_version(SHIPPED_LENET) if SHIPPED_LENET.is_dir() else None
    if shipped is not None:
        (target / "1").mkdir(parents=True)
        shutil.copy2(shipped / MODEL_FILE, target / "1" / MODEL_FILE)
        cfg = load_config(SHIPPED_LENET)
        # Server-default batching, and a batch-64 request must fit in one run.
        write_config(target, replace(cfg, max_batch_size=max(cfg.max_batch_size, max_batch_size),
                                     batching=Batching(), version_policy=VersionPolicy()))
        return f"shipped {SHIPPED_LENET.relative_to(REPO_ROOT)}/{shipped.name}"
    _export("lenet", LENET, repository, channels=1, size=28, classes=10, max_batch_size=max_batch_size,
            color_mode="L")
    return "generated LeNet-5 (random weights; model_repository/digits_lenet not present yet)"


def prepare_resnet(repository: Path, max_batch_size: int = 32) -> str:
    """Export a random-weight ResNet-18 (224×224×3, 1000 classes) into ``repository`` unless present."""
    target = repository / RESNET
    if (target / CONFIG_FILE).is_file() and latest_version(target) is not None:
        return f"cached {target}"
    _export("resnet18", RESNET, repository, channels=3, size=224, classes=1000, max_batch_size=max_batch_size,
            color_mode="RGB")
    return "generated convserve.models resnet18 (random weights)"


def _export(arch: str, name: str, repository: Path, *, channels: int, size: int, classes: int,
            max_batch_size: int, color_mode: str) -> None:
    import torch

    from convserve.models.export import export_model
    from convserve.models.registry import build

    torch.manual_seed(0)
    model = build(arch, in_channels=channels, num_classes=classes, input_size=size).eval()
    cfg = ModelConfig(
        name=name,
        input=InputSpec(shape=(channels, size, size)),
        preprocessing=Preprocessing(color_mode=color_mode, resize=(size, size), mean=(0.5,) * channels,
                                    std=(0.5,) * channels),
        labels=tuple(f"class_{i}" for i in range(classes)),
        max_batch_size=max_batch_size,
        architecture=arch,
    )
    log.info("exporting %s as %s into %s", arch, name, repository)
    export_model(model, cfg, repository, version=1, force=True)


def model_file(repository: Path, name: str) -> Path:
    """The served model.onnx of ``name`` in the bench repository."""
    version = latest_version(repository / name)
    if version is None:
        raise FileNotFoundError(f"no version of {name} under {repository}")
    return version / MODEL_FILE
