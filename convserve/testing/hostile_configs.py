"""Hostile model folders at the repository's size limits, for the test that they are refused and the
benchmark that health keeps answering while they are read (benchmarks/repository_stall.py).

Each folder is refused; ``write_hostile_models`` returns, per folder, a phrase its refusal contains.
"""

from __future__ import annotations

from pathlib import Path

from convserve.common.model_config import MAX_CONFIG_BYTES, MAX_LABEL_BYTES

__all__ = ["write_hostile_models"]

# A valid config.pbtxt for a 1x8x8 input and 4 classes whose labels come from labels.txt.
_LABELLED = """platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "input", data_type: TYPE_FP32, dims: [ 1, 8, 8 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 4 ], label_filename: "labels.txt" } ]
"""


def _fill(head: str, item: str, tail: str, limit: int) -> str:
    """``head`` + as many ``item``s as fit + ``tail``, at most ``limit`` bytes (ASCII)."""
    return head + item * ((limit - len(head) - len(tail)) // len(item)) + tail


def hostile_configs() -> dict[str, tuple[dict[str, str], str]]:
    """Folder name → (file name → text, where $NAME stands for the folder's name; a phrase of the refusal)."""
    levels = (MAX_CONFIG_BYTES - 2) // 6
    field = 'parameters { key: "k" value { string_value: "v" } }\n'
    many = _fill('platform: "onnxruntime_onnx"\n', field, "", MAX_CONFIG_BYTES)
    labels = _fill(  # 64 bytes left for the name
        '{"name": "$NAME", "labels": [', '"label", ', '"x"]}', MAX_CONFIG_BYTES - 64
    )
    nested = (MAX_CONFIG_BYTES // 2) * "[" + (MAX_CONFIG_BYTES // 2) * "]"
    return {
        # Nesting that recurses the parser once per level: refused by depth, not a crash.
        "deep_pbtxt": ({"config.pbtxt": "a { " * levels + "} " * levels}, "nested too deeply"),
        # Thousands of fields the parser reads one by one; then no graph to complete the dims from.
        "many_fields_pbtxt": ({"config.pbtxt": many}, "no <version>/model.onnx"),
        "oversize_pbtxt": ({"config.pbtxt": "#" * (MAX_CONFIG_BYTES + 1)}, f"larger than {MAX_CONFIG_BYTES}"),
        "deep_json": ({"config.json": nested}, "nested too deeply"),
        # Valid JSON at the limit, thousands of labels read in full; then no graph to load.
        "wide_json": ({"config.json": labels}, "no model.onnx"),
        # A label file at its limit, its lines counted against the output's 4 classes.
        "big_labels": (
            {"config.pbtxt": _LABELLED, "labels.txt": _fill("", "label\n", "", MAX_LABEL_BYTES)},
            "the output has 4 classes",
        ),
    }


def write_hostile_models(repository: Path, suffix: str = "") -> dict[str, str]:
    """Write every hostile folder (named with ``suffix``, with an empty version folder 1) under
    ``repository``; returns folder name → a phrase its refusal contains."""
    phrases = {}
    for name, (files, phrase) in hostile_configs().items():
        folder = Path(repository) / f"{name}{suffix}"
        (folder / "1").mkdir(parents=True, exist_ok=True)
        for file, text in files.items():
            (folder / file).write_text(text.replace("$NAME", folder.name), encoding="ascii")
        phrases[folder.name] = phrase
    return phrases
