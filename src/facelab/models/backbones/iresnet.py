"""IResNet-18/34 in arcface_torch's style ("resnet18", "resnet34").

Improved residual blocks (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a
conv1x1-BN shortcut where the shape changes), a 3x3 stride-1 stem, four stages of 64/128/256/512
channels (times `width`) and the "E" output block: BN -> flatten -> dropout -> FC -> BN1d.

Input sizes: the four stage entries are the design's halving points; `layers.downsample_strides`
keeps them all while the final map stays >= 4 pixels, otherwise the earliest become stride 1.
112 -> 7x7 (as arcface_torch), 64 -> 4x4, 32 -> 4x4 (stage 1 at stride 1), 160 -> 10x10,
224 -> 14x14. The FC is built for that map, so it grows with the input (512*14*14 inputs at 224).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facelab.models.backbones.layers import (
    FlattenEmbedding,
    conv_bn,
    downsample_strides,
    final_map_size,
    make_divisible,
)
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

STAGE_CHANNELS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    """Pre-BN basic block: no activation after the addition, which keeps the identity path clean."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            conv_bn(in_channels, out_channels, 3, act="prelu"),
            conv_bn(out_channels, out_channels, 3, stride),
        )
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """(N, 3, S, S) -> (N, embedding_dim) raw embeddings; `blocks` = blocks per stage."""

    def __init__(
        self,
        blocks: Sequence[int],
        embedding_dim: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [make_divisible(c * width) for c in STAGE_CHANNELS]
        strides = downsample_strides(input_size, len(STAGE_CHANNELS))
        self.stem = conv_bn(3, channels[0], 3, act="prelu")
        stages = []
        in_channels = channels[0]
        for out_channels, count, stride in zip(channels, blocks, strides, strict=True):
            stage = [IBasicBlock(in_channels, out_channels, stride)]
            stage += [IBasicBlock(out_channels, out_channels, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        map_size = final_map_size(input_size, strides)
        self.embedding = FlattenEmbedding(in_channels, map_size, embedding_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.stages(self.stem(x)))


@BACKBONES.register("resnet18", preprocess=Preprocess())
def resnet18(
    embedding_dim: int = 512, input_size: int = 112, width: float = 1.0, dropout: float = 0.0
) -> IResNet:
    """IResNet-18 (2, 2, 2, 2 blocks)."""
    return IResNet((2, 2, 2, 2), embedding_dim, input_size, width, dropout)


@BACKBONES.register("resnet34", preprocess=Preprocess())
def resnet34(
    embedding_dim: int = 512, input_size: int = 112, width: float = 1.0, dropout: float = 0.0
) -> IResNet:
    """IResNet-34 (3, 4, 6, 3 blocks)."""
    return IResNet((3, 4, 6, 3), embedding_dim, input_size, width, dropout)
