"""MobileNet (v1): a strided stem, then depthwise-separable convolutions, global pooling, one dense layer."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .common import conv_bn_act, global_avg_pool, init_weights, scaled, spatial_size


class DepthwiseSeparable(nn.Module):
    """A 3×3 depthwise conv (groups = channels: one filter per channel) then a 1×1 pointwise conv mixing
    channels — about k² times fewer multiply-adds than a full k×k convolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = conv_bn_act(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pointwise = conv_bn_act(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


# Legend: (out_channels, stride) of each depthwise-separable block after the 32-channel 3×3/2 stem.
STAGES: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)
STEM_CHANNELS = 32


class MobileNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        channels = scaled(STEM_CHANNELS, width, divisor=8)
        layers: list[nn.Module] = [conv_bn_act(in_channels, channels, 3, 2)]
        for out_channels, stride in STAGES:
            out_channels = scaled(out_channels, width, divisor=8)
            layers.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = global_avg_pool(spatial_size(self.features, input_size))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


@register("mobilenet", min_input_size=32,
          description="MobileNet v1: depthwise-separable convolutions (224x224x3)")
def mobilenet(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
              dropout: float = 0.0) -> nn.Module:
    """MobileNet v1 (Howard et al., 2017); ``width`` is the paper's width multiplier α."""
    return MobileNet(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width,
                     dropout=dropout)
