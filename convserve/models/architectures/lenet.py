"""LeNet-5 for small grayscale images (the digits model): two conv/pool stages and three dense layers."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import AvgPool2d, Conv2d, MaxPool2d
from ..registry import register
from .common import scaled, spatial_size

# LeNet-5 feature stages: (out_channels, kernel, padding); each is followed by activation and a 2×2 pool.
STAGES: tuple[tuple[int, int, int], ...] = (
    (6, 5, 2),   # 28×28 → 28×28 → pool → 14×14 (padding 2 stands in for LeNet's 32×32 input)
    (16, 5, 0),  # 14×14 → 10×10 → pool → 5×5
)
HIDDEN: tuple[int, ...] = (120, 84)  # the dense layers C5 and F6


class LeNet(nn.Module):
    """LeNet-5 with modern defaults that train fast and reach ~99% on sklearn digits at 28×28: ReLU, max
    pooling and BatchNorm (``classic=True`` gives the original tanh + average pooling, no BatchNorm)."""

    def __init__(self, *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float,
                 classic: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, padding in STAGES:
            out_channels = scaled(out_channels, width)
            layers.append(Conv2d(channels, out_channels, kernel, padding=padding, bias=classic))
            if not classic:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.Tanh() if classic else nn.ReLU(inplace=True))
            layers.append(AvgPool2d(2) if classic else MaxPool2d(2))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        h, w = spatial_size(self.features, input_size)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * h * w
        for hidden in HIDDEN:
            hidden = scaled(hidden, width)
            head += [nn.Linear(features, hidden), nn.Tanh() if classic else nn.ReLU(inplace=True)]
            if dropout:
                head.append(nn.Dropout(dropout))
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register("lenet", in_channels=1, num_classes=10, input_size=28, min_input_size=16,
          description="LeNet-5: 2 conv/pool stages + 3 dense layers (digits, 28x28x1)")
def lenet(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
          classic: bool = False, dropout: float = 0.0) -> nn.Module:
    """LeNet-5 for 28×28 grayscale digits."""
    return LeNet(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width,
                 classic=classic, dropout=dropout)
