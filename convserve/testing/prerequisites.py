"""What a test needs that the project's own set-up installs (a Debian binary, a dev-extra package).

One rule for all of them: where it is missing, a developer's partial checkout skips the test with the
command that installs it, and CI (``CI`` set) fails instead, since `make test` installs everything there and
a skip would pass a test that never ran.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import NoReturn

__all__ = ["require_binary", "require_module", "unavailable"]


def unavailable(reason: str, *, module_level: bool = False) -> NoReturn:
    """Fail under CI, skip elsewhere, naming what is missing and how to install it."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_module(name: str, reason: str, *, module_level: bool = True) -> None:
    """``unavailable(reason)`` unless the Python package ``name`` can be imported."""
    if importlib.util.find_spec(name) is None:
        unavailable(reason, module_level=module_level)


def require_binary(name: str, reason: str, *fallbacks: str) -> str:
    """The path of executable ``name`` (on PATH, else the first executable of ``fallbacks``), or
    ``unavailable(reason)``."""
    path = shutil.which(name) or next((f for f in fallbacks if os.access(f, os.X_OK)), None)
    if path is None:
        unavailable(reason)
    return path
