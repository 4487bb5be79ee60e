"""Inception (GoogLeNet-style): blocks of parallel 1×1 / 3×3 / 5×5 / pooling branches, concatenated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import MaxPool2d
from ..registry import register
from .common import conv_bn_act, global_avg_pool, init_weights, scaled, spatial_size


class InceptionBlock(nn.Module):
    """Four branches over the same input, concatenated along channels; every branch keeps the resolution.
    The 1×1 "reduce" convolutions before the 3×3 and 5×5 keep the expensive branches cheap."""

    def __init__(self, in_ch: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_act(in_ch, c1, 1)
        self.branch3 = nn.Sequential(conv_bn_act(in_ch, c3_reduce, 1), conv_bn_act(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(conv_bn_act(in_ch, c5_reduce, 1), conv_bn_act(c5_reduce, c5, 5))
        self.branch_pool = nn.Sequential(MaxPool2d(3, 1, 1), conv_bn_act(in_ch, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw  # all branches are 'same'-padded with stride 1

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


# GoogLeNet's inception blocks (Szegedy et al., 2014, table 1). Legend: "M" is a 3×3/2 max pool;
# a tuple is one block: (1×1, 3×3 reduce, 3×3, 5×5 reduce, 5×5, pool projection) output channels.
BLOCKS: tuple[tuple[int, ...] | str, ...] = (
    (64, 96, 128, 16, 32, 32),      # 3a
    (128, 128, 192, 32, 96, 64),    # 3b
    "M",
    (192, 96, 208, 16, 48, 64),     # 4a
    (160, 112, 224, 24, 64, 64),    # 4b
    (128, 128, 256, 24, 64, 64),    # 4c
    (112, 144, 288, 32, 64, 64),    # 4d
    (256, 160, 320, 32, 128, 128),  # 4e
    "M",
    (256, 160, 320, 32, 128, 128),  # 5a
    (384, 192, 384, 48, 128, 128),  # 5b
)


class Inception(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float,
                 dropout: float = 0.4) -> None:
        super().__init__()
        c64, c192 = scaled(64, width), scaled(192, width)
        self.stem = nn.Sequential(  # 224 → 112 → 56 → 56 → 28
            conv_bn_act(in_channels, c64, 7, 2), MaxPool2d(3, 2, 1),
            conv_bn_act(c64, c64, 1), conv_bn_act(c64, c192, 3), MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        channels = c192
        for spec in BLOCKS:
            if spec == "M":
                blocks.append(MaxPool2d(3, 2, 1))
                continue
            block = InceptionBlock(channels, *(scaled(c, width) for c in spec))
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = global_avg_pool(spatial_size([self.stem, self.blocks], input_size))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))))


@register("inception", min_input_size=32,
          description="Inception/GoogLeNet: parallel 1x1/3x3/5x5/pool branches (224x224x3)")
def inception(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0,
              dropout: float = 0.4) -> nn.Module:
    """GoogLeNet without the auxiliary classifiers, with BatchNorm after every convolution."""
    return Inception(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width,
                     dropout=dropout)
