"""A model's config: the one source of truth for its input spec, labels, preprocessing and batching.

Each model folder holds ``config.json`` beside its numeric version folders::

    model_repository/digits_lenet/config.json
    model_repository/digits_lenet/1/model.onnx

The export step writes it, the server reads it, and the evaluator uses it to preprocess exactly
as the server does. Only the standard library is used so every extra can import it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"

# Model names become metric labels and directory names: keep them to a safe alphabet. Always used with
# fullmatch: "$" would also accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DTYPES = ("float32",)
LAYOUTS = ("NCHW",)
COLOR_MODES = ("L", "RGB")
POLARITIES = ("as_is", "auto")
OUTPUT_KINDS = ("logits", "probabilities")
PROVIDERS = ("cuda", "tensorrt", "openvino", "cpu")
# A real config.json or config.pbtxt is a few KB; parsing a 10 MB one held the GIL for seconds. Refused
# by size before parsing. Label files get more room (one line per class).
MAX_CONFIG_BYTES = 64 * 1024
MAX_LABEL_BYTES = 4 * 1024 * 1024
# The largest input (C*H*W) and class count a config may declare; beyond them a config is hostile.
MAX_INPUT_ELEMENTS = 1 << 26
MAX_CLASSES = 1 << 20


class ModelConfigError(ValueError):
    """The config file is missing, malformed, or contradicts itself."""


@dataclass(frozen=True)
class InputSpec:
    """The model input without its (dynamic) batch dimension."""

    name: str = "input"
    dtype: str = "float32"
    shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W
    layout: str = "NCHW"

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]


@dataclass(frozen=True)
class OutputSpec:
    name: str = "logits"
    # "logits" get a softmax at postprocessing; "probabilities" are used as they are.
    kind: str = "logits"
    # The file the labels were read from (config.pbtxt's label_filename), reported back as Triton does.
    label_filename: str = ""


@dataclass(frozen=True)
class Preprocessing:
    """How an encoded image becomes the input tensor: convert, (normalize the ink), resize, scale to [0, 1],
    normalize. The two ink fields default to off, so configs written before them mean what they meant."""

    color_mode: str = "L"
    resize: tuple[int, int] = (28, 28)  # H, W
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    # "auto": an image whose border is brighter than mid-gray (dark ink on paper) is inverted, so the model
    # always sees light ink on a dark background. "as_is" leaves pixels alone. Grayscale ("L") only.
    polarity: str = "as_is"
    # MNIST's normalisation: scale the ink (its mass-robust bounding box) to fit this many pixels, keeping the
    # aspect ratio, and centre it by its centre of mass in the resize window. None = plain resize. "L" only.
    fit_ink: int | None = None


@dataclass(frozen=True)
class VersionPolicy:
    """Which numeric versions to serve: the latest N, all, or a specific list."""

    latest: int | None = 1
    all: bool = False
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.specific:
            return [v for v in ordered if v in self.specific]
        if self.all:
            return ordered
        n = self.latest or 1
        return ordered[-n:]


@dataclass(frozen=True)
class Batching:
    """Dynamic batching; None means "use the server-wide default"."""

    enabled: bool = True
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int | None = None


@dataclass(frozen=True)
class QuantizedVersion:
    """How ``convserve quantize`` made one version from another: a record for people, ignored by serving."""

    version: int
    from_version: int
    method: str  # e.g. "static QDQ, int8 per-channel weights (reduce_range), uint8 activations"
    calibration: str  # which images set the activation ranges, and how many
    float_nodes: tuple[str, ...] = ()  # compute nodes left in float32


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: tuple[str, ...] = ()
    max_batch_size: int = 64
    batching: Batching = field(default_factory=Batching)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    # Ordered execution-provider preference; empty means the server-wide list.
    execution_providers: tuple[str, ...] = ()
    architecture: str = ""
    platform: str = "onnxruntime_onnx"
    # The --data spec convserve trained on ("" for imported models): quantization calibrates on its
    # training split and gates on its held-out split.
    training_data: str = ""
    quantized: tuple[QuantizedVersion, ...] = ()
    # The graph's file name inside each version folder (Triton's default_model_filename).
    default_model_filename: str = MODEL_FILE
    # Triton's max_batch_size 0: the model has no batch dimension of its own. Its input is exactly
    # [batch_dim, C, H, W] (batch_dim 1 when max_batch_size is 1, else -1: any count up to it) and each
    # request runs alone, never merged or split. Clients are told max_batch_size 0.
    unbatched: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def batch_dim(self) -> int:
        """The input's first dim as clients see it: 1 for an unbatched model taking one image, else -1."""
        return 1 if self.unbatched and self.max_batch_size == 1 else -1

    def validate(self) -> ModelConfig:
        """Raise ModelConfigError naming the first field that is wrong; return self."""
        problems = _problems(self)
        if problems:
            raise ModelConfigError(f"model config '{self.name}': " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ModelConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        try:
            cfg = cls(
                name=str(data["name"]),
                input=_build(InputSpec, data.get("input", {}), tuples=("shape",)),
                output=_build(OutputSpec, data.get("output", {})),
                preprocessing=_build(Preprocessing, data.get("preprocessing", {}),
                                     tuples=("resize", "mean", "std")),
                labels=tuple(str(x) for x in data.get("labels", ())),
                max_batch_size=int(data.get("max_batch_size", 64)),
                batching=_build(Batching, data.get("batching", {}), tuples=("preferred_batch_sizes",)),
                version_policy=_build(VersionPolicy, data.get("version_policy", {}), tuples=("specific",)),
                execution_providers=tuple(data.get("execution_providers", ())),
                architecture=str(data.get("architecture", "")),
                platform=str(data.get("platform", "onnxruntime_onnx")),
                training_data=str(data.get("training_data", "")),
                quantized=tuple(_build(QuantizedVersion, q, tuples=("float_nodes",))
                                for q in data.get("quantized", ())),
                default_model_filename=str(data.get("default_model_filename", MODEL_FILE)),
                unbatched=bool(data.get("unbatched", False)),
            )
        except KeyError as exc:
            raise ModelConfigError(f"model config is missing required field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"model config has a malformed field: {exc}") from None
        return cfg.validate()

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def read_config_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """A config (or label) file's text, refused by its size before a byte is parsed; ModelConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ModelConfigError(f"no {path.name} in {path.parent}") from None
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ModelConfigError(f"{path}: larger than {limit} bytes; a model's config is a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelConfigError(f"{path}: expected UTF-8 text: {exc}") from None


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``<model_dir>/config.json``; the folder name must equal the config's name."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = json.loads(read_config_text(path))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: cannot read config: {exc}") from None
    except RecursionError:  # the decoder recurses per nesting level; a real config nests a few levels
        raise ModelConfigError(f"{path}: nested too deeply to be a model config") from None
    cfg = ModelConfig.from_dict(data)
    if cfg.name != Path(model_dir).name:
        raise ModelConfigError(f"{path}: name '{cfg.name}' differs from folder name '{Path(model_dir).name}'")
    return cfg


def write_config(model_dir: Path, cfg: ModelConfig) -> Path:
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(json.dumps(cfg.validate().to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _build(kind: type, data: dict[str, Any], tuples: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{kind.__name__} must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    values = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in data.items()}
    return kind(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problems(cfg: ModelConfig) -> list[str]:
    p: list[str] = []
    if not NAME_PATTERN.fullmatch(cfg.name):
        p.append(f"name must match {NAME_PATTERN.pattern}, got {cfg.name!r}")
    if cfg.input.dtype not in DTYPES:
        p.append(f"input.dtype must be one of {DTYPES}, got {cfg.input.dtype!r}")
    if cfg.input.layout not in LAYOUTS:
        p.append(f"input.layout must be one of {LAYOUTS}, got {cfg.input.layout!r}")
    if len(cfg.input.shape) != 3 or any(int(d) <= 0 for d in cfg.input.shape):
        p.append(f"input.shape must be three positive dims (C, H, W), got {list(cfg.input.shape)}")
    elif math.prod(int(d) for d in cfg.input.shape) > MAX_INPUT_ELEMENTS:
        p.append(f"input.shape {list(cfg.input.shape)} has more than {MAX_INPUT_ELEMENTS} elements")
    pre = cfg.preprocessing
    if pre.color_mode not in COLOR_MODES:
        p.append(f"preprocessing.color_mode must be one of {COLOR_MODES}, got {pre.color_mode!r}")
    elif len(cfg.input.shape) == 3 and cfg.input.shape[0] != len(pre.color_mode):
        p.append(f"preprocessing.color_mode {pre.color_mode!r} gives {len(pre.color_mode)} channel(s) "
                 f"but input.shape has {cfg.input.shape[0]}")
    if len(cfg.input.shape) == 3 and tuple(pre.resize) != tuple(cfg.input.shape[1:]):
        p.append(f"preprocessing.resize {list(pre.resize)} must equal input H, W {list(cfg.input.shape[1:])}")
    if len(pre.mean) != len(pre.color_mode) or len(pre.std) != len(pre.color_mode):
        p.append(f"preprocessing.mean/std need one value per channel ({len(pre.color_mode)})")
    # json.loads accepts NaN and Infinity: a NaN mean or an infinite/zero std would turn every input into
    # NaN or a constant, and the model would answer nonsense while health says SERVING.
    for i, m in enumerate(pre.mean):
        if not _finite(m):
            p.append(f"preprocessing.mean[{i}] must be a finite number, got {m!r}")
    for i, s in enumerate(pre.std):
        if not (_finite(s) and s > 0):
            p.append(f"preprocessing.std[{i}] must be a finite number > 0, got {s!r}")
    if pre.polarity not in POLARITIES:
        p.append(f"preprocessing.polarity must be one of {POLARITIES}, got {pre.polarity!r}")
    if pre.fit_ink is not None and not 1 <= pre.fit_ink <= min(pre.resize):
        p.append(f"preprocessing.fit_ink must be in 1..{min(pre.resize)} (the resize window), "
                 f"got {pre.fit_ink}")
    if (pre.polarity != "as_is" or pre.fit_ink is not None) and pre.color_mode != "L":
        p.append(f"preprocessing.polarity/fit_ink need color_mode 'L', got {pre.color_mode!r}")
    if cfg.output.kind not in OUTPUT_KINDS:
        p.append(f"output.kind must be one of {OUTPUT_KINDS}, got {cfg.output.kind!r}")
    if not cfg.labels:
        p.append("labels must list one label per class")
    elif len(cfg.labels) > MAX_CLASSES:
        p.append(f"labels: at most {MAX_CLASSES} classes, got {len(cfg.labels)}")
    if not 1 <= cfg.max_batch_size <= 4096:
        p.append(f"max_batch_size must be in 1..4096, got {cfg.max_batch_size}")
    b = cfg.batching
    if b.max_queue_delay_us is not None and b.max_queue_delay_us < 0:
        p.append("batching.max_queue_delay_us must be >= 0")
    if b.max_queue_size is not None and b.max_queue_size < 1:
        p.append("batching.max_queue_size must be >= 1")
    if b.instances is not None and not 1 <= b.instances <= 64:
        p.append("batching.instances must be in 1..64")
    if cfg.unbatched and b.enabled:
        p.append("unbatched: a model without a batch dimension runs each request alone; "
                 "batching.enabled must be false")
    if any(not 1 <= s <= cfg.max_batch_size for s in b.preferred_batch_sizes):
        p.append("batching.preferred_batch_sizes must lie in 1..max_batch_size")
    vp = cfg.version_policy
    if vp.latest is not None and vp.latest < 1:
        p.append("version_policy.latest must be >= 1")
    q_versions = [q.version for q in cfg.quantized]
    if any(not isinstance(v, int) or v < 1 for v in q_versions) or len(set(q_versions)) != len(q_versions):
        p.append(f"quantized[].version must be distinct positive integers, got {q_versions}")
    f = cfg.default_model_filename
    if f in ("", ".", "..") or "/" in f or "\\" in f or "\x00" in f:
        p.append(f"default_model_filename must be a file name inside the version folder (no '/', not '..'), "
                 f"got {f!r}")
    bad = [x for x in cfg.execution_providers if x not in PROVIDERS]
    if bad:
        p.append(f"execution_providers must be among {PROVIDERS}, got {bad}")
    return p
