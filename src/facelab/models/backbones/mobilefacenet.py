"""MobileFaceNet as in arcface_torch ("mobilefacenet"; Chen et al. 2018).

A 3x3 stem, then inverted-residual bottlenecks with PReLU in three downsampling stages of
64*scale, 128*scale, 128*scale channels (expansion widths 128/256/512, fixed as in
arcface_torch), a 1x1 conv to 512 channels and the GDC head (global depthwise conv -> FC ->
BN1d). `blocks` counts the residual bottlenecks per stage; arcface_torch's "mbf" is
scale=2, blocks=(1, 4, 6, 2), its "mbf_large" scale=4, blocks=(2, 8, 12, 4).

Input sizes: the stem and the three stage-entry bottlenecks are the design's four halving points;
`layers.downsample_strides` keeps them all while the final map stays >= 4 pixels, otherwise
the earliest become stride 1. 112 -> 7x7 (as arcface_torch), 64 -> 4x4, 32 -> 4x4 (stride-1
stem), 96 -> 6x6, 160 -> 10x10, 224 -> 14x14; the GDC kernel is built for that map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facelab.models.backbones.layers import (
    GDCEmbedding,
    InvertedResidual,
    conv_bn,
    downsample_strides,
    final_map_size,
)
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

# (output channels per unit of scale, expansion width of the entry, of the residual blocks)
STAGES = ((64, 128, 128), (128, 256, 256), (128, 512, 256))
STEM_CHANNELS = 64
STEM_HIDDEN = 128  # expansion width of the stem bottlenecks when blocks[0] > 1
GDC_CHANNELS = 512


def _bottleneck(
    in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool
) -> InvertedResidual:
    return InvertedResidual(in_channels, out_channels, hidden, stride, "prelu", residual)


@BACKBONES.register("mobilefacenet", preprocess=Preprocess())
class MobileFaceNet(nn.Module):
    """(N, 3, S, S) -> (N, embedding_dim) raw embeddings; defaults are arcface_torch's "mbf"."""

    def __init__(
        self,
        embedding_dim: int = 512,
        input_size: int = 112,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
    ) -> None:
        super().__init__()
        if len(blocks) != 1 + len(STAGES):
            raise ValueError(f"blocks needs {1 + len(STAGES)} counts, got {tuple(blocks)}")
        strides = downsample_strides(input_size, 1 + len(STAGES))
        channels = STEM_CHANNELS * scale
        layers: list[nn.Module] = [conv_bn(3, channels, 3, strides[0], act="prelu")]
        if blocks[0] == 1:
            # arcface_torch's single stem block: a grouped 3x3 conv, not a bottleneck
            layers.append(conv_bn(channels, channels, 3, groups=STEM_CHANNELS, act="prelu"))
        else:
            stem = [_bottleneck(channels, channels, STEM_HIDDEN, 1, True) for _ in range(blocks[0])]
            layers += stem
        for (base, entry_hidden, hidden), count, stride in zip(
            STAGES, blocks[1:], strides[1:], strict=True
        ):
            layers.append(_bottleneck(channels, base * scale, entry_hidden, stride, False))
            channels = base * scale
            layers += [_bottleneck(channels, channels, hidden, 1, True) for _ in range(count)]
        layers.append(conv_bn(channels, GDC_CHANNELS, 1, act="prelu"))
        self.body = nn.Sequential(*layers)
        map_size = final_map_size(input_size, strides)
        self.embedding = GDCEmbedding(GDC_CHANNELS, map_size, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(x))
