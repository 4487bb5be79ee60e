"""ResNet with basic residual blocks: ResNet-18 (ImageNet shape) and ResNet-20 (CIFAR-sized, small)."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import MaxPool2d
from ..registry import register
from .common import conv_bn_act, global_avg_pool, init_weights, scaled, spatial_size


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus the input: y = relu(F(x) + shortcut(x)). The shortcut is a 1×1 strided
    conv-BN when the block changes resolution or width, the identity otherwise."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_act(in_ch, out_ch, 3, stride),
                                  conv_bn_act(out_ch, out_ch, 3, act=False))
        self.shortcut = (conv_bn_act(in_ch, out_ch, 1, stride, act=False)
                         if stride != 1 or in_ch != out_ch else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return spatial_size(self.body, hw)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


# Stage tables. Legend: (out_channels, blocks, stride of the first block).
RESNET18_STAGES = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))
RESNET20_STAGES = ((16, 3, 1), (32, 3, 2), (64, 3, 2))


class ResNet(nn.Module):
    def __init__(self, stages: tuple[tuple[int, int, int], ...], *, in_channels: int, num_classes: int,
                 input_size: tuple[int, int], width: float, imagenet_stem: bool) -> None:
        super().__init__()
        stem_channels = scaled(stages[0][0], width)
        if imagenet_stem:  # 7×7/2 conv + 3×3/2 max pool: 224 → 56 before the first stage
            self.stem = nn.Sequential(conv_bn_act(in_channels, stem_channels, 7, 2), MaxPool2d(3, 2, 1))
        else:  # small images keep their resolution: one 3×3 conv
            self.stem = conv_bn_act(in_channels, stem_channels, 3)
        blocks: list[nn.Module] = []
        channels = stem_channels
        for out_channels, repeats, stride in stages:
            out_channels = scaled(out_channels, width)
            for i in range(repeats):
                blocks.append(BasicBlock(channels, out_channels, stride if i == 0 else 1))
                channels = out_channels
        self.stages = nn.Sequential(*blocks)
        hw = spatial_size([self.stem, self.stages], input_size)
        self.pool = global_avg_pool(hw)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register("resnet18", min_input_size=32,
          description="ResNet-18: basic residual blocks, 4 stages (224x224x3, 1000 classes)")
def resnet18(*, in_channels: int, num_classes: int, input_size: tuple[int, int],
             width: float = 1.0) -> nn.Module:
    """ResNet-18 (He et al., 2015): ImageNet stem, [2, 2, 2, 2] basic blocks."""
    return ResNet(RESNET18_STAGES, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                  width=width, imagenet_stem=True)


@register("resnet20", num_classes=10, input_size=32, min_input_size=8,
          description="ResNet-20: small CIFAR-style ResNet, 3 stages of 3 basic blocks (32x32x3)")
def resnet20(*, in_channels: int, num_classes: int, input_size: tuple[int, int],
             width: float = 1.0) -> nn.Module:
    """The small ResNet for 32×32 images: 3×3 stem, [3, 3, 3] basic blocks of 16/32/64 channels."""
    return ResNet(RESNET20_STAGES, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                  width=width, imagenet_stem=False)
