"""Register, list and build CNN architectures by name; the CLI and the tests iterate this one table."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Architecture",
    "UnknownArchitectureError",
    "build",
    "get_architecture",
    "list_architectures",
    "register",
]

Builder = Callable[..., nn.Module]


class UnknownArchitectureError(ValueError):
    """The requested architecture name is not registered."""


@dataclass(frozen=True)
class Architecture:
    """A registered builder and the input it was designed for (used when build() gets no override)."""

    name: str
    builder: Builder
    description: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    # Smallest square input the network accepts; tests build at this size to stay fast.
    min_input_size: int
    # False for the dense baseline (no convolution, no pooling) that robustness compares the CNNs with.
    convolutional: bool = True


_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    min_input_size: int = 32,
    description: str = "",
    convolutional: bool = True,
) -> Callable[[Builder], Builder]:
    """Decorator: add ``builder(*, in_channels, num_classes, input_size, width, **options)`` under ``name``.

    The keyword defaults describe the canonical setting (e.g. 224×224×3 with 1000 classes for ResNet-18).
    """

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"architecture {name!r} is already registered")
        doc = description or ((builder.__doc__ or "").strip().splitlines() or [name])[0]
        _REGISTRY[name] = Architecture(
            name=name,
            builder=builder,
            description=doc,
            in_channels=in_channels,
            num_classes=num_classes,
            input_size=_size(input_size),
            min_input_size=min_input_size,
            convolutional=convolutional,
        )
        return builder

    return decorate


def _ensure_loaded() -> None:
    """Import the architecture modules once so their @register decorators run."""
    global _loaded
    if not _loaded:
        importlib.import_module(".architectures", __package__)
        _loaded = True


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The registry entry for ``name``; raises UnknownArchitectureError listing the known names."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    width: float = 1.0,
    **options: Any,
) -> nn.Module:
    """Build architecture ``name``; unset arguments take the architecture's registered defaults.

    ``width`` scales every layer's channel count; ``options`` are builder-specific (e.g. ``dropout``).
    Raises UnknownArchitectureError for an unknown name and ValueError for an input too small for the net.
    """
    arch = get_architecture(name)
    size = arch.input_size if input_size is None else _size(input_size)
    if min(size) < arch.min_input_size:
        raise ValueError(f"{name} needs inputs of at least {arch.min_input_size}x{arch.min_input_size}, "
                         f"got {size[0]}x{size[1]}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return arch.builder(
        in_channels=arch.in_channels if in_channels is None else int(in_channels),
        num_classes=arch.num_classes if num_classes is None else int(num_classes),
        input_size=size,
        width=float(width),
        **options,
    )


def _size(value: int | tuple[int, int] | Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))
