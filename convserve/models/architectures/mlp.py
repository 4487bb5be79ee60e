"""A dense multi-layer perceptron: the seed's baseline, with no locality and no shared weights."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .common import scaled

# Hidden widths chosen so that at 1x28x28 in, 10 out the MLP has about LeNet-5's 61.7k parameters
# (784*72 + 72*48 + 48*10 + biases = 60.5k): a like-for-like budget for the translation comparison.
HIDDEN: tuple[int, ...] = (72, 48)


class MLP(nn.Module):
    """Flatten → (Linear → ReLU) per hidden width → Linear. Every weight belongs to one pixel position, so
    nothing learned at one place transfers to another: what ``convserve robustness`` measures."""

    def __init__(self, *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        features = in_channels * input_size[0] * input_size[1]
        layers: list[nn.Module] = [nn.Flatten()]
        for hidden in HIDDEN:
            hidden = scaled(hidden, width)
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            features = hidden
        layers.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x)


@register("mlp", in_channels=1, num_classes=10, input_size=28, min_input_size=1, convolutional=False,
          description="dense baseline: 2 hidden layers, about LeNet-5's parameter count at 28x28x1")
def mlp(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
        dropout: float = 0.0) -> nn.Module:
    """The dense baseline for 28×28 grayscale digits."""
    return MLP(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width,
               dropout=dropout)
