"""The atomic write of one repository entry: `<name>/config.json` plus `<name>/<version>/model.onnx`.

Shared by ``convserve export`` (a trained PyTorch model) and ``convserve import`` (an ONNX file made
elsewhere). The files are assembled in a hidden temporary folder on the same filesystem and moved into
place with ``os.rename``, so a polling server never sees a half-written entry. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .model_config import CONFIG_FILE, MODEL_FILE, ModelConfig, write_config


class EntryWriteError(RuntimeError):
    """The repository cannot take the entry (not a folder, not writable, version exists)."""


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version folder in ``model_dir`` (1 for a new model)."""
    versions = [int(p.name) for p in _iterdir(model_dir) if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def check_writable(repository: Path) -> None:
    """Create ``repository`` if needed; raise EntryWriteError when it is not a writable folder."""
    if repository.exists() and not repository.is_dir():
        raise EntryWriteError(f"model repository {repository} is not a directory")
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EntryWriteError(f"cannot create model repository {repository}: {exc.strerror or exc}") from None
    if not repository.is_dir():
        raise EntryWriteError(f"model repository {repository} is not a directory")
    if not os.access(repository, os.W_OK | os.X_OK):
        raise EntryWriteError(f"model repository {repository} is not writable")


def write_entry(
    model_dir: Path,
    version: int,
    onnx_bytes: bytes,
    cfg: ModelConfig,
    data_files: Mapping[str, Path] | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Move a complete entry into place with renames; on any failure remove the temporary files only.

    ``data_files`` maps each external-data name the graph uses (relative to ``model.onnx``) to the file
    to copy there. ``check(staged_model_path)`` runs on the staged copy before anything is moved into
    place; whatever it raises leaves the repository as it was.
    """
    fresh = not model_dir.exists()
    # Hidden names: a repository scanner takes only numeric version folders and named model folders.
    parent = model_dir.parent if fresh else model_dir
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.name}-{version}.", suffix=".tmp", dir=parent))
    trash: Path | None = None
    try:
        _make_readable(staging)
        entry_root = staging if fresh else staging / "entry"
        version_dir = entry_root / str(version)
        version_dir.mkdir(parents=True)
        _make_readable(version_dir)
        (version_dir / MODEL_FILE).write_bytes(onnx_bytes)
        for name, source in (data_files or {}).items():
            target = version_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        write_config(entry_root, cfg)
        if check is not None:
            check(version_dir / MODEL_FILE)
        if fresh:
            os.rename(staging, model_dir)  # the whole entry appears at once
            return
        target = model_dir / str(version)
        if target.exists():  # force: keep the old version until the new one is in place
            trash = staging / "old"
            os.rename(target, trash)
        try:
            os.rename(version_dir, target)
        except OSError:
            if trash is not None:
                os.rename(trash, target)
            raise
        os.replace(entry_root / CONFIG_FILE, model_dir / CONFIG_FILE)
    finally:
        # After a successful fresh rename the staging path is gone and this does nothing.
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(path: Path) -> None:
    """mkdtemp creates 0700 folders; a server running as another user must be able to read the entry."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _iterdir(path: Path) -> Iterator[Path]:
    try:
        yield from Path(path).iterdir()
    except (FileNotFoundError, NotADirectoryError):
        return
