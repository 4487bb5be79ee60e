"""The repository boundary: every file a model reads (config, labels, graph, external data) is checked here.

A repository is what an operator chose to expose. A file a model names must lie inside that model's
folder (external data inside its version folder, beside ``model.onnx``), named by a plain relative path
(no absolute path, no ``..``), and must not lead out of the repository through a symlink unless
``allow_external_symlinks`` is set (links within it, e.g. versions kept in a hidden store, serve).
Every refusal names the file and the rule it broke.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from convserve.common.model_config import ModelConfigError

from .external_data import ExternalTensor, GraphFormatError, external_tensors

__all__ = ["STRICT", "Boundary", "ModelFileError", "check_graph"]


class ModelFileError(ModelConfigError):
    """A model names a file it may not read: outside its folder, through a link out, missing or too short."""


@dataclass(frozen=True)
class Boundary:
    """The symlink policy of one repository, applied to every file a model reads. Messages show paths
    relative to ``root`` (clients see them; the server's own paths stay private)."""

    allow_external_symlinks: bool = False
    root: Path | None = None

    def show(self, path: Path) -> str:
        if self.root is not None:
            for base in (self.root, self.root.resolve()):
                try:
                    return str(Path(path).relative_to(base))
                except ValueError:
                    continue
        return str(path)

    def check(self, path: Path, folder: Path, what: str) -> Path:
        """``path`` if its name lies inside ``folder`` and, unless links out are allowed, what it resolves
        to lies inside the repository (``root``; the folder itself when there is none), else
        ModelFileError naming ``what``, the path and the rule."""
        path, folder = Path(path), Path(folder)
        try:
            path.relative_to(folder)
        except ValueError:
            raise ModelFileError(
                f"{what} {self.show(path)}: outside its model folder {self.show(folder)}"
            ) from None
        if self.allow_external_symlinks:
            return path
        fence = self.root if self.root is not None else folder
        try:
            path.resolve(strict=False).relative_to(fence.resolve(strict=False))
        except ValueError:
            raise ModelFileError(
                f"{what} {self.show(path)} is a symlink (or lies under one) leading outside the "
                f"{'model repository' if self.root is not None else 'model folder'}; "
                "refused unless allow_external_symlinks is set"
            ) from None
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ModelFileError(f"{what} {self.show(path)}: cannot resolve: {exc}") from None
        return path

    def named_file(self, name: str, folder: Path, what: str) -> Path:
        """A file a config or graph names relative to ``folder``: a plain relative path, checked."""
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
            raise ModelFileError(
                f"{what} expected a plain path relative to {self.show(folder)} (not absolute, no '..'), "
                f"got {name!r}"
            )
        return self.check(folder / pure, folder, what)


# The default boundary: symlinks out of a folder refused, messages with the paths as given.
STRICT = Boundary()


def check_graph(path: Path, data: bytes, boundary: Boundary) -> list[ExternalTensor]:
    """Check every external-data reference of the graph at ``path`` (its bytes ``data``) before ONNX
    Runtime sees it: inside the graph's folder, a regular file, long enough for the tensor."""
    folder = Path(path).parent
    try:
        tensors = external_tensors(data)
    except GraphFormatError as exc:
        raise ModelFileError(f"model file {boundary.show(path)}: not an ONNX model: {exc}") from None
    sizes: dict[str, int] = {}
    for tensor in tensors:
        what = f"external data of tensor {tensor.name!r} in {path.name}:"
        if tensor.location not in sizes:
            file = boundary.named_file(tensor.location, folder, what)
            try:
                st = os.stat(file)
            except OSError as exc:
                raise ModelFileError(f"{what} {boundary.show(file)}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(f"{what} {boundary.show(file)}: not a regular file")
            sizes[tensor.location] = st.st_size
        size = sizes[tensor.location]
        need = tensor.length if tensor.length is not None else tensor.nbytes or 0
        if tensor.offset + need > size:
            raise ModelFileError(
                f"{what} {tensor.location} is {size} bytes; the tensor needs bytes "
                f"{tensor.offset}..{tensor.offset + need}"
            )
    return tensors
