"""What the SDK returns: small frozen dataclasses, iterable and printable, with no gRPC types in sight."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """One class of the top-k: its index in the model's output, its label and its probability (0..1)."""

    index: int
    label: str
    probability: float

    def __str__(self) -> str:
        return f"{self.label} ({self.probability:.1%})"


@dataclass(frozen=True)
class Classification:
    """The top-k predictions for one image, most probable first, and the model version that answered.

    Iterating yields the predictions; ``result.top`` is the best one.
    """

    predictions: tuple[Prediction, ...]
    model: str
    version: int

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    @property
    def label(self) -> str:
        """The most probable label, the one-word answer."""
        return self.predictions[0].label

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i: int) -> Prediction:
        return self.predictions[i]

    def __str__(self) -> str:
        ranked = ", ".join(str(p) for p in self.predictions)
        return f"{ranked}  [{self.model} v{self.version}]"


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model: its state (``ready``, ``loading``, ``failed``, ``unloading``) and provider."""

    version: int
    state: str
    reason: str = ""
    execution_provider: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def __str__(self) -> str:
        text = f"v{self.version} {self.state}"
        if self.execution_provider:
            text += f" on {self.execution_provider}"
        return f"{text}: {self.reason}" if self.reason else text


@dataclass(frozen=True)
class ModelInfo:
    """A model as ``Client.models()`` lists it: its name and every version the server knows."""

    name: str
    versions: tuple[VersionStatus, ...]

    @property
    def ready(self) -> bool:
        return any(v.ready for v in self.versions)

    def __iter__(self) -> Iterator[VersionStatus]:
        return iter(self.versions)

    def __str__(self) -> str:
        return f"{self.name}: " + ", ".join(str(v) for v in self.versions)


@dataclass(frozen=True)
class InputSpec:
    """The model's input without the batch dimension: what a raw tensor must look like."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    color_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}] {self.layout} {self.color_mode}"


@dataclass(frozen=True)
class BatchingSpec:
    """How the server batches requests for this model (see the model's config)."""

    enabled: bool
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    preferred_batch_sizes: tuple[int, ...]
    instances: int


@dataclass(frozen=True)
class ModelMetadata:
    """Everything ``Client.model(name)`` tells about one model version."""

    name: str
    version: int
    ready: bool
    versions: tuple[VersionStatus, ...]
    input: InputSpec
    labels: tuple[str, ...]
    execution_provider: str
    max_batch_size: int
    architecture: str
    batching: BatchingSpec | None

    def __str__(self) -> str:
        state = "ready" if self.ready else "not ready"
        return (f"{self.name} v{self.version} ({state}) {self.architecture or 'model'} on "
                f"{self.execution_provider or '?'}; input {self.input}; {len(self.labels)} labels; "
                f"max batch {self.max_batch_size}")
