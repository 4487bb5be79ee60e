"""Triton's ``config.pbtxt`` for ONNX models, read with protobuf's text format into our one ModelConfig.

Read: name, platform/backend (ONNX Runtime only), default_model_filename (the graph's name in each version
folder), max_batch_size (0: the dims carry the batch dimension, which requests must match exactly, and
each request runs alone), one input (FP32, NCHW, dims [C, H, W]) and one output (FP32, dims [K],
label_filename), dynamic_batching (max_queue_delay_microseconds, preferred_batch_size,
default_queue_policy.max_queue_size; without it each request runs alone, as in Triton), instance_group
(counts summed; KIND_GPU/KIND_CPU pick the provider), version_policy. Input or output left out, or dims of
-1, are completed from the graph. Everything else Triton knows (optimization, model_warmup, sequence
batching...) is warned about once per load and ignored. Encoded images get the auto-complete
preprocessing (L/RGB by channels, scale to [0, 1]); parameters ``mean``, ``std`` (comma-separated
floats) and ``output_kind`` (logits/probabilities) override it.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import text_format

from convserve.common.model_config import (
    MAX_INPUT_ELEMENTS,
    MAX_LABEL_BYTES,
    MODEL_FILE,
    ModelConfig,
    ModelConfigError,
    read_config_text,
)
from convserve.protos.inference import model_config_pb2 as mc

from .autocomplete import (
    COLOR_MODES,
    DEFAULT_MAX_BATCH_SIZE,
    GraphSignature,
    latest_model_file,
    read_signature,
)
from .model_files import STRICT, Boundary

log = logging.getLogger(__name__)

PBTXT_FILE = "config.pbtxt"
ONNX_PLATFORMS = ("", "onnxruntime_onnx")
ONNX_BACKENDS = ("", "onnxruntime")
_GPU_KINDS = (mc.ModelInstanceGroup.KIND_GPU,)
_PARAMETERS = ("mean", "std", "output_kind")
MAX_RANK = 8


# ``field [ ... ]`` (no colon) is valid for known repeated fields, but protobuf's skipper of unknown
# fields only accepts ``field: [ ... ]``; Triton's docs write lists without the colon, so add it.
_LIST_WITHOUT_COLON = re.compile(r"\b([A-Za-z_]\w*)(\s*)\[")


def parse_pbtxt(text: str, where: str) -> tuple[mc.ModelConfig, list[str]]:
    """Parse Triton's text format; returns the message and the field names convserve does not read."""
    msg = mc.ModelConfig()
    text = _LIST_WITHOUT_COLON.sub(r"\1:\2[", text)
    try:
        text_format.Parse(text, msg, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{where}: not a Triton model config: {exc}") from None
    except RecursionError:  # the parser recurses per nested message; a real config nests a few levels
        raise ModelConfigError(f"{where}: nested too deeply to be a Triton model config") from None
    return msg, _unknown_fields(text)


def _unknown_fields(text: str) -> list[str]:
    """Dotted paths of the fields in ``text`` our config proto does not declare (the parser skipped them),
    outermost only: ``optimization``, ``dynamic_batching.priority_levels``."""
    tokens = text_format.Tokenizer(text.splitlines())
    words: list[str] = []
    while not tokens.AtEnd():
        words.append(tokens.token)
        tokens.NextToken()
    unknown: list[str] = []
    # Each open brace pushes (message descriptor or None inside an unknown field, its path); ``pending`` is
    # what the next brace opens, set by the last field name and restored on close so that every element
    # of ``field: [ {...}, {...} ]`` opens the same message.
    Frame = tuple[Any, str]
    stack: list[tuple[Frame, Frame]] = []
    current: Frame = (mc.ModelConfig.DESCRIPTOR, "")
    pending: Frame = (None, "")
    for word, after in zip(words, [*words[1:], ""], strict=True):
        if word in ("{", "<"):
            stack.append((current, pending))
            current = pending
        elif word in ("}", ">") and stack:
            current, pending = stack.pop()
        elif (word[:1].isalpha() or word[:1] == "_") and after in (":", "{", "<", "["):
            desc, path = current
            name = f"{path}.{word}" if path else word
            field = desc.fields_by_name.get(word) if desc is not None else None
            if desc is not None and field is None:
                unknown.append(name)
            pending = (field.message_type if field is not None else None, name)
    return unknown


def read_pbtxt(model_dir: Path, boundary: Boundary = STRICT) -> ModelConfig:
    """Read ``<model_dir>/config.pbtxt`` into a validated ModelConfig; ModelConfigError names the field."""
    model_dir = Path(model_dir)
    path = boundary.check(model_dir / PBTXT_FILE, model_dir, "config file")
    text = read_config_text(path)
    msg, unknown = parse_pbtxt(text, str(path))
    if unknown:
        log.warning(
            "%s: field(s) %s are not read by convserve; ignored", path, ", ".join(unknown),
            extra={"fields": {"event": "config_fields_ignored", "model": model_dir.name}},
        )
    return to_model_config(msg, model_dir, str(path), boundary)


def to_model_config(
    msg: mc.ModelConfig, model_dir: Path, where: str, boundary: Boundary = STRICT
) -> ModelConfig:
    """Triton's ModelConfig (as read from config.pbtxt) → ours; the graph fills what the file leaves out."""
    name = msg.name or model_dir.name
    if name != model_dir.name:
        raise ModelConfigError(f"{where}: name {name!r} differs from folder name {model_dir.name!r}")
    if msg.platform not in ONNX_PLATFORMS or msg.backend not in ONNX_BACKENDS:
        raise ModelConfigError(
            f"{where}: platform {msg.platform!r} / backend {msg.backend!r}: convserve serves ONNX models "
            f"(platform 'onnxruntime_onnx' or backend 'onnxruntime')"
        )
    max_batch_size = msg.max_batch_size
    if max_batch_size < 0:
        raise ModelConfigError(f"{where}: max_batch_size must be >= 0, got {max_batch_size}")
    _check_dims(msg, where)
    unbatched = max_batch_size == 0
    if unbatched:
        msg, max_batch_size = _explicit_batch(msg, where)
    if len(msg.input) > 1 or len(msg.output) > 1:
        raise ModelConfigError(
            f"{where}: expected one input and one output, got {len(msg.input)} and {len(msg.output)}"
        )
    filename = msg.default_model_filename or MODEL_FILE
    if filename in (".", "..") or PurePosixPath(filename).name != filename or "\\" in filename:
        raise ModelConfigError(
            f"{where}: default_model_filename must be a file name inside the version folder "
            f"(no '/', not '..'), got {filename!r}"
        )
    sig = None
    if not msg.input or not msg.output or any(d < 0 for t in (*msg.input, *msg.output) for d in t.dims):
        graph = boundary.check(latest_model_file(model_dir, filename, PBTXT_FILE), model_dir, "model file")
        sig = read_signature(graph, boundary)
    input_name, (c, h, w) = _input(msg, sig, where)
    output_name, num_classes = _output(msg, sig, where)
    params = {k: v.string_value for k, v in msg.parameters.items()}
    mean = _floats(params.get("mean"), c, 0.0, f"{where}: parameters['mean']")
    std = _floats(params.get("std"), c, 1.0, f"{where}: parameters['std']")
    labels = _labels(msg, model_dir, num_classes, where, boundary)
    data = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "input": {"name": input_name, "shape": [c, h, w]},
        "output": {
            "name": output_name,
            "kind": params.get("output_kind", "logits"),
            "label_filename": msg.output[0].label_filename if msg.output else "",
        },
        "preprocessing": {"color_mode": COLOR_MODES.get(c, "?"), "resize": [h, w], "mean": mean, "std": std},
        "labels": labels,
        "max_batch_size": max_batch_size,
        "batching": _batching(msg),
        "version_policy": _version_policy(msg.version_policy),
        "default_model_filename": filename,
        "unbatched": unbatched,
    }
    kinds = {g.kind for g in msg.instance_group}
    if kinds and kinds <= set(_GPU_KINDS):
        data["execution_providers"] = ["cuda", "cpu"]
    elif kinds == {mc.ModelInstanceGroup.KIND_CPU}:
        data["execution_providers"] = ["cpu"]
    try:
        return ModelConfig.from_dict(data)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{where}: {exc}") from None


def _check_dims(msg: mc.ModelConfig, where: str) -> None:
    """Triton's dims: -1 is the one variable size, every other dim positive; a rank and an element count
    no image classifier exceeds (the graph and ``ModelConfig.validate`` check the exact shapes later)."""
    for kind, tensors in (("input", msg.input), ("output", msg.output)):
        for t in tensors:
            dims = list(t.dims)
            if len(dims) > MAX_RANK:
                raise ModelConfigError(f"{where}: {kind} {t.name!r} has rank {len(dims)}; at most {MAX_RANK}")
            bad = [d for d in dims if d != -1 and d <= 0]
            if bad:
                raise ModelConfigError(
                    f"{where}: {kind} {t.name!r} dims {dims}: expected -1 (variable) or a positive size, "
                    f"got {bad[0]}"
                )
            fixed = math.prod(d for d in dims if d > 0)
            if fixed > MAX_INPUT_ELEMENTS:
                raise ModelConfigError(
                    f"{where}: {kind} {t.name!r} dims {dims} hold more than {MAX_INPUT_ELEMENTS} elements"
                )


def _explicit_batch(msg: mc.ModelConfig, where: str) -> tuple[mc.ModelConfig, int]:
    """max_batch_size 0: Triton's dims then include the batch dimension; ModelConfig's input.shape never
    does. Strip it into max_batch_size: -1 (any count) serves up to the default batch size, 1 exactly one
    image; the config is marked unbatched, so requests are checked against the dims and run alone."""
    out = mc.ModelConfig()
    out.CopyFrom(msg)
    out.ClearField("dynamic_batching")
    batch = None
    for t, rank in [*((t, 4) for t in out.input), *((t, 2) for t in out.output)]:
        dims = list(t.dims)
        if len(dims) != rank or dims[0] not in (-1, 1) or batch not in (None, dims[0]):
            raise ModelConfigError(
                f"{where}: with max_batch_size 0, {t.name!r} dims must start with the batch dimension "
                f"(-1 or 1, the same for every tensor) and have rank {rank}, got {dims}"
            )
        batch = dims[0]
        del t.dims[0]
    return out, (DEFAULT_MAX_BATCH_SIZE if batch in (-1, None) else 1)


def _graph(sig: GraphSignature | None, what: str, where: str) -> GraphSignature:
    """The graph's signature, which fills in what config.pbtxt leaves out; an error naming it when absent."""
    if sig is None:
        raise ModelConfigError(
            f"{where}: {what} is not in config.pbtxt and the graph was not read to fill it in"
        )
    return sig


def _input(msg: mc.ModelConfig, sig: GraphSignature | None, where: str) -> tuple[str, tuple[int, int, int]]:
    if not msg.input:
        graph = _graph(sig, "the input", where)
        return graph.input_name, graph.input_shape
    t = msg.input[0]
    if t.data_type != mc.TYPE_FP32:
        raise ModelConfigError(
            f"{where}: input {t.name!r} data_type is {mc.DataType.Name(t.data_type)}; expected TYPE_FP32"
        )
    if t.format == mc.ModelInput.FORMAT_NHWC:
        raise ModelConfigError(f"{where}: input {t.name!r} format is FORMAT_NHWC; convserve feeds NCHW")
    dims = list(t.dims)
    if len(dims) != 3:
        raise ModelConfigError(
            f"{where}: input {t.name!r} dims must be [C, H, W] (without batch), got {dims}"
        )
    if sig is not None:
        dims = [g if d < 0 else d for d, g in zip(dims, sig.input_shape, strict=True)]
    return t.name, (dims[0], dims[1], dims[2])


def _output(msg: mc.ModelConfig, sig: GraphSignature | None, where: str) -> tuple[str, int]:
    if not msg.output:
        graph = _graph(sig, "the output", where)
        return graph.output_name, graph.num_classes
    t = msg.output[0]
    if t.data_type != mc.TYPE_FP32:
        raise ModelConfigError(
            f"{where}: output {t.name!r} data_type is {mc.DataType.Name(t.data_type)}; expected TYPE_FP32"
        )
    dims = list(t.dims)
    if len(dims) != 1:
        raise ModelConfigError(f"{where}: output {t.name!r} dims must be [K] (without batch), got {dims}")
    if dims[0] < 0:
        return t.name, _graph(sig, f"the class count of {t.name!r} (dims [-1])", where).num_classes
    return t.name, dims[0]


def _labels(
    msg: mc.ModelConfig, model_dir: Path, num_classes: int, where: str, boundary: Boundary
) -> list[str]:
    filename = msg.output[0].label_filename if msg.output else ""
    if not filename:
        return [str(i) for i in range(num_classes)]
    if Path(filename).name != filename:
        raise ModelConfigError(
            f"{where}: label_filename must be a file in the model folder, got {filename!r}"
        )
    path = boundary.named_file(filename, model_dir, f"{where}: label_filename")
    try:
        text = read_config_text(path, MAX_LABEL_BYTES)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{where}: cannot read label_filename {filename!r}: {exc}") from None
    labels: list[str] = []
    # Line by line, stopping past the class count: one splitlines() of a 4 MiB file holds the GIL for
    # about 80 ms, and health answers from the same process.
    for line in io.StringIO(text, newline=None):
        label = line.strip()
        if label:
            labels.append(label)
            if len(labels) > num_classes:
                raise ModelConfigError(
                    f"{where}: label_filename {filename!r} has more than {num_classes} labels; "
                    f"the output has {num_classes} classes"
                )
    if len(labels) != num_classes:
        raise ModelConfigError(
            f"{where}: label_filename {filename!r} has {len(labels)} labels; "
            f"the output has {num_classes} classes"
        )
    return labels


def _floats(text: str | None, n: int, default: float, where: str) -> list[float]:
    if text is None:
        return [default] * n
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ModelConfigError(f"{where}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise ModelConfigError(
            f"{where}: expected {n} comma-separated numbers (one per channel), got {text!r}"
        )
    return values


def _batching(msg: mc.ModelConfig) -> dict[str, object]:
    count = sum(g.count or 1 for g in msg.instance_group) if msg.instance_group else None
    if not msg.HasField("dynamic_batching"):
        return {"enabled": False, "instances": count}
    db = msg.dynamic_batching
    queue = db.default_queue_policy.max_queue_size
    return {
        "enabled": True,
        "max_queue_delay_us": db.max_queue_delay_microseconds,
        "max_queue_size": queue or None,
        "preferred_batch_sizes": list(db.preferred_batch_size),
        "instances": count,
    }


def _version_policy(vp: mc.ModelVersionPolicy) -> dict[str, object]:
    which = vp.WhichOneof("policy_choice")
    if which == "all":
        return {"latest": None, "all": True}
    if which == "specific":
        return {"latest": None, "specific": list(vp.specific.versions)}
    if which == "latest":
        return {"latest": vp.latest.num_versions or 1}
    return {"latest": 1}
