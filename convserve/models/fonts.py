"""Which installed font files the digits model trains on and which it is judged on, kept apart by family.

The fonts come from Debian packages that ``scripts/install_system_deps.sh`` installs. A family is either
trained on or held out, never both, so the generalisation set measures digit shapes the model never saw.
Metric-compatible clones count as the same family (Liberation and Nimbus are both trained on, Carlito is
held out): only the file names matter here.
"""

from __future__ import annotations

import functools
from pathlib import Path

FONT_ROOTS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
FONT_SUFFIXES = (".ttf", ".otf")

# (Debian package, file-name prefixes). Every file of the package whose name starts with a prefix is used.
TRAIN_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fonts-dejavu-core fonts-dejavu-extra", ("DejaVuSans", "DejaVuSerif")),
    ("fonts-liberation", ("LiberationSans", "LiberationSerif", "LiberationMono")),
    ("fonts-freefont-ttf", ("FreeSans", "FreeSerif", "FreeMono")),
    ("fonts-urw-base35", ("NimbusSans", "NimbusRoman", "NimbusMonoPS", "C059", "P052", "URWBookman",
                          "URWGothic", "Z003")),
    ("fonts-comic-neue", ("ComicNeue",)),
)
UNSEEN_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fonts-crosextra-carlito", ("Carlito",)),
    ("fonts-crosextra-caladea", ("Caladea",)),
    ("fonts-go", ("Go-",)),
    ("fonts-open-sans", ("OpenSans",)),
    ("fonts-cantarell", ("Cantarell",)),
    ("fonts-inconsolata", ("Inconsolata",)),
    ("fonts-linuxlibertine", ("LinLibertine_", "LinBiolinum_R")),  # LinBiolinum_K is a keyboard-key font
)
# A held-out set with fewer font files than this would measure a handful of shapes, not generalisation.
MIN_FONTS = 5


class FontsMissingError(RuntimeError):
    """Too few of the listed fonts are installed; the message names the Debian packages to install."""


def train_fonts() -> tuple[Path, ...]:
    """Font files the training set is rendered from (sorted); raises FontsMissingError."""
    return _fonts(TRAIN_FAMILIES)


def unseen_fonts() -> tuple[Path, ...]:
    """Font files of the held-out families (sorted); raises FontsMissingError."""
    return _fonts(UNSEEN_FAMILIES)


@functools.cache
def _installed() -> tuple[Path, ...]:
    found: list[Path] = []
    for root in FONT_ROOTS:
        if root.is_dir():
            found.extend(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    return tuple(found)


def _fonts(families: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[Path, ...]:
    prefixes = tuple(prefix for _, group in families for prefix in group)
    chosen = sorted({p for p in _installed() if p.name.startswith(prefixes)}, key=lambda p: p.name)
    if len(chosen) < MIN_FONTS:
        packages = " ".join(package for package, _ in families)
        raise FontsMissingError(f"found {len(chosen)} of the fonts this needs (at least {MIN_FONTS}); "
                                f"install the Debian packages {packages} (make system-deps)")
    return tuple(chosen)
