"""AlexNet: five convolutions (large strided kernels first), three max pools, three dense layers."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import Conv2d, MaxPool2d
from ..registry import register
from .common import scaled, spatial_size

# Feature stages: (out_channels, kernel, stride, padding, max-pool after?). Pools are 3×3, stride 2
# (overlapping), as in the paper; channels follow the single-GPU variant (torchvision's).
STAGES: tuple[tuple[int, int, int, int, bool], ...] = (
    (64, 11, 4, 2, True),   # 224 → 55 → 27
    (192, 5, 1, 2, True),   # 27 → 13
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),   # 13 → 6
)
HIDDEN = (4096, 4096)


class AlexNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride, padding, pool in STAGES:
            out_channels = scaled(out_channels, width)
            layers += [Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(MaxPool2d(3, 2))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        h, w = spatial_size(self.features, input_size)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * h * w
        for hidden in HIDDEN:
            hidden = scaled(hidden, width)
            head += [nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register("alexnet", min_input_size=63, description="AlexNet: 5 conv + 3 max-pool + 3 dense (224x224x3)")
def alexnet(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
            dropout: float = 0.5) -> nn.Module:
    """AlexNet (Krizhevsky et al., 2012), single-tower channel counts."""
    return AlexNet(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width,
                   dropout=dropout)
