"""Training and evaluation data: scikit-learn's digits (alone, with synthesised variation, or redrawn as
held-out generalisation sets) or a folder-per-class image tree, each with one fixed split.

Images stay as Pillow images until ``to_arrays`` turns them into model input with
``convserve.server.runtime.preprocess.image_to_array`` — the function the server runs — so training,
evaluation and serving see identical pixels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve.common.model_config import InputSpec, ModelConfig, Preprocessing

# The held-out split is part of the dataset's definition, not of a training run: it is seeded by
# this constant (never by --seed) so `convserve evaluate` rebuilds exactly the images training never saw.
SPLIT_SEED = 20_240_611
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGEFOLDER_PREFIX = "imagefolder:"


class DataError(ValueError):
    """The data source is missing, empty or unreadable; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageDataset:
    """Labelled images, loaded one at a time by index.

    ``labels[i]`` indexes ``class_names``; ``load(i)`` returns image i as a Pillow image.
    """

    source: str  # the --data spec it came from
    short_name: str  # for default run/model names
    class_names: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    load: Callable[[int], Image.Image]
    fixed_color: str | None = None  # "L" when the source is grayscale by nature (digits)
    default_epochs: int = 20
    # (train, test) indices when the source defines its own split (synthetic training data only ever on the
    # train side; a held-out set wholly on the test side); None → split_indices(labels).
    split: tuple[np.ndarray, np.ndarray] | None = None
    default_fit_ink: int | None = None  # the preprocessing's ink box unless --fit-ink says otherwise

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> Iterator[Image.Image]:
        for i in indices:
            yield self.load(int(i))

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The same classes restricted to ``indices`` (quick runs and tests); the split is recomputed."""
        chosen = np.asarray(indices, dtype=np.int64)
        return replace(self, labels=self.labels[chosen], load=lambda i: self.load(int(chosen[i])), split=None)

    def train_test(self) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, test indices): the source's own split, else the fixed stratified one."""
        return self.split if self.split is not None else split_indices(self.labels)


# --data values that name built-in sources, with what each one is (for help texts and errors).
BUILTIN_SOURCES = {
    "digits": "scikit-learn's 1,797 8x8 handwritten digits",
    "digits-synth": "digits plus synthesised variation: printed digits from the training fonts and the "
                    "training scans redrawn (the bundled model's training data)",
    "fonts-unseen": "held out: printed digits from font families never trained on, under transformations "
                    "never trained with",
    "digits-mnist-style": "held out: the digits' test split drawn as MNIST draws digits (20x20 in 28x28, "
                          "thick pen, blur)",
}


def load_dataset(spec: str) -> ImageDataset:
    """Parse a ``--data`` value: a name in BUILTIN_SOURCES or ``imagefolder:PATH``. Raises DataError."""
    if spec == "digits":
        return load_digits()
    if spec == "digits-synth":
        return load_digits_synth()
    if spec == "fonts-unseen":
        return load_fonts_unseen()
    if spec == "digits-mnist-style":
        return load_digits_mnist_style()
    if spec.startswith(IMAGEFOLDER_PREFIX):
        path = spec[len(IMAGEFOLDER_PREFIX):]
        if not path:
            raise DataError("--data imagefolder: needs a path, e.g. imagefolder:./my_images")
        return load_imagefolder(Path(path))
    names = ", ".join(repr(name) for name in BUILTIN_SOURCES)
    raise DataError(f"unknown data source {spec!r}; expected one of {names} or 'imagefolder:PATH'")


DIGIT_CLASSES = tuple(str(d) for d in range(10))
SCAN_COPIES = 10  # redrawn variants of each training scan in digits-synth
FONT_SAMPLES = 8_000  # printed digits in digits-synth: 88 font files x 10 digits x about 9


def _digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # 0..16 → 0..255, rounded: the images a user would save as 8-bit PNGs of these digits.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    return pixels, np.asarray(bunch.target, dtype=np.int64)


def load_digits() -> ImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16) as 8-bit grayscale, white ink on black."""
    pixels, labels = _digit_pixels()
    return ImageDataset(
        source="digits", short_name="digits", class_names=DIGIT_CLASSES, labels=labels,
        load=lambda i: Image.fromarray(pixels[i], mode="L"), fixed_color="L", default_epochs=15)


def load_digits_synth(scan_copies: int = SCAN_COPIES, font_samples: int = FONT_SAMPLES) -> ImageDataset:
    """The digits, then ``scan_copies`` redrawn variants of each training-side scan, then ``font_samples``
    printed digits from the training fonts. The test side is exactly the digits' held-out split, so
    ``evaluate --data digits`` and training report the same in-distribution images; every synthetic image is
    on the train side, and none is made from a held-out scan. Raises DataError when fonts are missing."""
    from . import fonts, synth

    pixels, digit_labels = _digit_pixels()
    n = len(digit_labels)
    train_scans, test_scans = split_indices(digit_labels)
    try:
        font_files = fonts.train_fonts() if font_samples else ()
    except fonts.FontsMissingError as exc:
        raise DataError(f"digits-synth: {exc}") from None
    scan_sources = np.repeat(train_scans, scan_copies)  # variant k of scan i at n + k-th slot
    font_labels = np.arange(font_samples, dtype=np.int64) % 10
    labels = np.concatenate([digit_labels, digit_labels[scan_sources], font_labels])

    def load(i: int) -> Image.Image:
        if i < n:
            return Image.fromarray(pixels[i], mode="L")
        if i < n + len(scan_sources):
            return synth.scan_digit(pixels[scan_sources[i - n]], i - n)
        return synth.font_digit(i - n - len(scan_sources), font_files)[0]

    train = np.concatenate([train_scans, np.arange(n, len(labels))])
    return ImageDataset(
        source="digits-synth", short_name="digits", class_names=DIGIT_CLASSES, labels=labels, load=load,
        fixed_color="L", default_epochs=8, split=(train, test_scans),
        default_fit_ink=20)


def load_fonts_unseen(size: int | None = None) -> ImageDataset:
    """The unseen-fonts generalisation set (see generalisation.py); all of it is test data."""
    from . import fonts, generalisation

    try:
        font_files = fonts.unseen_fonts()
    except fonts.FontsMissingError as exc:
        raise DataError(f"fonts-unseen: {exc}") from None
    count = generalisation.UNSEEN_SIZE if size is None else size
    labels = np.arange(count, dtype=np.int64) % 10
    return ImageDataset(
        source="fonts-unseen", short_name="fonts_unseen", class_names=DIGIT_CLASSES, labels=labels,
        load=lambda i: generalisation.unseen_font_digit(i, font_files)[0], fixed_color="L",
        split=(np.empty(0, np.int64), np.arange(count)))


def load_digits_mnist_style() -> ImageDataset:
    """The digits' held-out scans drawn in MNIST's style (see generalisation.py); all of it is test data."""
    from . import generalisation

    pixels, labels = _digit_pixels()
    _, test = split_indices(labels)
    return ImageDataset(
        source="digits-mnist-style", short_name="digits_mnist_style", class_names=DIGIT_CLASSES,
        labels=labels[test], load=lambda i: generalisation.mnist_style(pixels[test[i]]), fixed_color="L",
        split=(np.empty(0, np.int64), np.arange(len(test))))


def load_imagefolder(root: Path) -> ImageDataset:
    """One sub-folder per class (its name is the label), each holding JPEG/PNG files; RGB or grayscale.

    Files are listed now and decoded on demand; a file that does not decode raises DataError naming it.
    """
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory")
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list image folder {root}: {exc.strerror or exc}") from None
    if len(class_dirs) < 2:
        raise DataError(f"image folder {root} needs at least 2 class sub-folders, found {len(class_dirs)}")
    files: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        try:
            found = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise DataError(f"cannot list class folder {class_dir}: {exc.strerror or exc}") from None
        if not found:
            raise DataError(f"class folder {class_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        files.extend(found)
        labels.extend([index] * len(found))
    return ImageDataset(
        source=f"{IMAGEFOLDER_PREFIX}{root}", short_name=root.resolve().name or "images",
        class_names=tuple(p.name for p in class_dirs), labels=np.asarray(labels, dtype=np.int64),
        load=lambda i: _open_image(files[i]))


def load_image_files(root: Path) -> ImageDataset:
    """Every JPEG/PNG under ``root`` (any depth), unlabelled: one class ``"?"``. For calibration images and
    for held-out images without labels. Raises DataError when there are none."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    except OSError as exc:
        raise DataError(f"cannot list image folder {root}: {exc.strerror or exc}") from None
    if not files:
        raise DataError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return ImageDataset(source=f"{IMAGEFOLDER_PREFIX}{root}", short_name=root.resolve().name or "images",
                        class_names=("?",), labels=np.zeros(len(files), dtype=np.int64),
                        load=lambda i: _open_image(files[i]))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            # As the server's decode_image does: honour the camera's orientation tag.
            return ImageOps.exif_transpose(img) if "exif" in img.info else img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from None


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split → (train_idx, test_idx), each sorted.

    Each class contributes ``round(test_fraction * n_class)`` images to the test side (at least one
    when the class has two or more). Written here rather than taken from scikit-learn so that the
    split cannot change with a library upgrade.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_test = round(test_fraction * len(members))
        n_test = min(max(n_test, 1), len(members) - 1) if len(members) >= 2 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def model_config_for(dataset: ImageDataset, name: str, color_mode: str, input_size: int,
                     architecture: str = "", fit_ink: int | None = None) -> ModelConfig:
    """The config a model trained on ``dataset`` is served with: input spec, preprocessing, labels.

    Pixels are scaled to [-1, 1] (mean = std = 0.5 per channel). With ``fit_ink`` (grayscale only) the ink
    is normalised as MNIST did — polarity detected, ink fitted into a ``fit_ink`` box, centred by mass —
    by the server too, since it reads the same config. The export sets name and batch size.
    """
    channels = len(color_mode)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-")[:64] or "model"
    ink = {"polarity": "auto", "fit_ink": fit_ink} if fit_ink is not None else {}
    return ModelConfig(
        name=safe,
        input=InputSpec(shape=(channels, input_size, input_size)),
        preprocessing=Preprocessing(color_mode=color_mode, resize=(input_size, input_size),
                                    mean=(0.5,) * channels, std=(0.5,) * channels, **ink),
        labels=dataset.class_names, architecture=architecture,
        training_data=_absolute(dataset.source)).validate()


def _absolute(spec: str) -> str:
    """An image folder recorded in a config must still name it when read from another working directory."""
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return IMAGEFOLDER_PREFIX + str(Path(spec[len(IMAGEFOLDER_PREFIX):]).resolve())
    return spec


def to_arrays(dataset: ImageDataset, indices: Sequence[int], cfg: ModelConfig) -> np.ndarray:
    """Preprocess the given images exactly as the server does → (N, C, H, W) float32."""
    from convserve.server.runtime.preprocess import image_to_array

    c, h, w = cfg.input.shape
    out = np.empty((len(indices), c, h, w), dtype=np.float32)
    for row, img in enumerate(dataset.images(indices)):
        out[row] = image_to_array(img, cfg)
    return out
