"""convserve.models: a CNN library built from our own convolution and pooling layers.

Names load lazily so that ``convserve.models.cli`` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Conv2d": "layers",
    "MaxPool2d": "layers",
    "AvgPool2d": "layers",
    "Pool2d": "layers",
    "build": "registry",
    "register": "registry",
    "list_architectures": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'convserve.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
