"""Which file defines a model's config: ``config.json``, else Triton's ``config.pbtxt``, else the graph.

All three end as the one ModelConfig (common/model_config.py). config.json is convserve's complete
format (preprocessing, labels, output kind); config.pbtxt is read for Triton repositories
(triton_config.py here); a folder holding only ``<version>/model.onnx`` is completed from its latest
graph (autocomplete.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from convserve.common.model_config import CONFIG_FILE, ModelConfig, load_config

from .autocomplete import complete_from_graph
from .model_files import STRICT, Boundary
from .triton_config import PBTXT_FILE, read_pbtxt

log = logging.getLogger(__name__)

# The files whose changes hot reload watches, in order of precedence.
CONFIG_FILES = (CONFIG_FILE, PBTXT_FILE)


def read_model_config(model_dir: Path, boundary: Boundary = STRICT) -> ModelConfig:
    """The model folder's config from the first source present; raises ModelConfigError naming the file.

    Blocking: completing a bare folder opens its graph with ONNX Runtime; call it off the event loop.
    """
    model_dir = Path(model_dir)
    for name in CONFIG_FILES:
        boundary.check(model_dir / name, model_dir, "config file")
    if (model_dir / CONFIG_FILE).is_file():
        if (model_dir / PBTXT_FILE).is_file():
            log.info("model %s: both %s and %s present; %s wins", model_dir.name, CONFIG_FILE, PBTXT_FILE,
                     CONFIG_FILE)
        return load_config(model_dir)
    if (model_dir / PBTXT_FILE).is_file():
        return read_pbtxt(model_dir, boundary)
    return complete_from_graph(model_dir, boundary)
