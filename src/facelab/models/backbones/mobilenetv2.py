"""MobileNetV2 with a GDC embedding head ("mobilenetv2"; Sandler et al. 2018).

Inverted residual blocks with linear bottlenecks and ReLU6, the standard (t, c, n, s) table,
channels times `width` (rounded to multiples of 8), a 1x1 conv to 1280 channels (more when
width > 1) and, instead of global average pooling + classifier, MobileFaceNet's GDC head
(global depthwise conv -> FC -> BN1d), which suits aligned faces better.

Input sizes: the stem and the four stride-2 stages of the table are the design's five halving
points; `layers.downsample_strides` keeps them all while the final map stays >= 4 pixels,
otherwise the earliest become stride 1. 112 -> 4x4 (the standard /32 net), 224 -> 7x7,
160 -> 5x5, 96 -> 6x6 (stride-1 stem), 64 -> 4x4 (stride-1 stem), 32 -> 4x4 (stem and first
stride-2 stage at stride 1); the GDC kernel is built for that map.
"""

from __future__ import annotations

import torch
from torch import nn

from facelab.models.backbones.layers import (
    GDCEmbedding,
    InvertedResidual,
    conv_bn,
    downsample_strides,
    final_map_size,
    make_divisible,
)
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

# expansion t, output channels c, repeats n, first stride s (Sandler et al., table 2)
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


@BACKBONES.register("mobilenetv2", preprocess=Preprocess())
class MobileNetV2(nn.Module):
    """(N, 3, S, S) -> (N, embedding_dim) raw embeddings."""

    def __init__(self, embedding_dim: int = 512, input_size: int = 112, width: float = 1.0) -> None:
        super().__init__()
        num_downsamples = 1 + sum(s == 2 for _, _, _, s in SETTINGS)
        strides = downsample_strides(input_size, num_downsamples)
        adapted = iter(strides)
        channels = make_divisible(STEM_CHANNELS * width)
        layers: list[nn.Module] = [conv_bn(3, channels, 3, next(adapted), act="relu6")]
        for t, c, n, s in SETTINGS:
            out_channels = make_divisible(c * width)
            for i in range(n):
                stride = next(adapted) if i == 0 and s == 2 else 1
                residual = stride == 1 and channels == out_channels
                layers.append(
                    InvertedResidual(
                        channels, out_channels, channels * t, stride, "relu6", residual, t != 1
                    )
                )
                channels = out_channels
        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width))
        layers.append(conv_bn(channels, last_channels, 1, act="relu6"))
        self.body = nn.Sequential(*layers)
        map_size = final_map_size(input_size, strides)
        self.embedding = GDCEmbedding(last_channels, map_size, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(x))
