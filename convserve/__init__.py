"""convserve: a CNN inference server (ONNX Runtime behind gRPC and v2 REST), its client SDK and CLI, and
the CNN library its models are trained with.

The import package. Its folders ``protos``, ``server``, ``client`` and ``models`` are also at the top of
the source tree as links, so the tree reads as the project's layout while tools resolve ``convserve.*``
from a checkout without an install hook.
"""
