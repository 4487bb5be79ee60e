"""The model-config contract moved to ``convserve.common.model_config`` (shared by server/ and models/
without either importing the other); this name stays an alias of that very module."""

import sys

from convserve.common import model_config as _contract

sys.modules[__name__] = _contract
