"""VGG: stacks of 3×3 convolutions separated by 2×2 max pools, configured from a table."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import Conv2d, MaxPool2d
from ..registry import register
from .common import init_weights, scaled, spatial_size

# Legend: an int is a 3×3 convolution (padding 1) with that many output channels, then ReLU;
# "M" is a 2×2 max pool with stride 2. Configurations A (VGG-11) and D (VGG-16) of Simonyan & Zisserman.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
HIDDEN = (4096, 4096)


class VGG(nn.Module):
    def __init__(self, config: tuple[int | str, ...], *, in_channels: int, num_classes: int,
                 input_size: tuple[int, int], width: float, batch_norm: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(MaxPool2d(2, 2))
                continue
            out_channels = scaled(int(item), width)
            layers.append(Conv2d(channels, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        h, w = spatial_size(self.features, input_size)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * h * w
        for hidden in HIDDEN:
            hidden = scaled(hidden, width)
            head += [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _register(name: str) -> None:
    depth = sum(isinstance(item, int) for item in CONFIGS[name]) + len(HIDDEN) + 1

    @register(name, min_input_size=32,
              description=f"VGG-{depth}: 3x3 conv stacks + max pools from a table (224x224x3)")
    def builder(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
                batch_norm: bool = False, dropout: float = 0.5) -> nn.Module:
        return VGG(CONFIGS[name], in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                   width=width, batch_norm=batch_norm, dropout=dropout)


for _name in CONFIGS:
    _register(_name)
