"""ShuffleNetV2 with a GDC embedding head ("shufflenetv2"; Ma et al. 2018).

A 3x3 stem, a 3x3 max-pool and three stages (4, 8, 4 units) of channel split / shuffle units,
then a 1x1 conv; `width` picks the paper's channel table (0.5, 1.0, 1.5 or 2.0). Global average
pooling is replaced by MobileFaceNet's GDC head (global depthwise conv -> FC -> BN1d).

Input sizes: stem, max-pool and the three stage entries are the design's five halving points;
`layers.downsample_strides` keeps them all while the final map stays >= 4 pixels, otherwise
the earliest become stride 1 (a max-pool at stride 1 is dropped, not kept as a blur).
112 -> 4x4 (the standard /32 net), 224 -> 7x7, 160 -> 5x5, 96 -> 6x6 (stride-1 stem),
64 -> 4x4 (stride-1 stem), 32 -> 4x4 (stride-1 stem, no max-pool); the GDC kernel is built
for that map.
"""

from __future__ import annotations

import torch
from torch import nn

from facelab.models.backbones.layers import (
    GDCEmbedding,
    conv_bn,
    downsample_strides,
    final_map_size,
)
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

STEM_CHANNELS = 24
STAGE_UNITS = (4, 8, 4)
# width -> output channels of the three stages and of the final 1x1 conv (Ma et al., table 5)
CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of the two branches so information crosses between them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: concat(left, right) then shuffle.

    An `entry` unit (first of a stage, may stride) feeds the whole input to both branches;
    the others split the channels in half, pass the left half through and transform the right.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, entry: bool) -> None:
        super().__init__()
        if not entry and (stride != 1 or in_channels != out_channels):
            raise ValueError("a split unit keeps stride 1 and its channel count")
        branch = out_channels // 2
        branch_in = in_channels if entry else in_channels // 2
        self.entry = entry
        self.left = (
            nn.Sequential(
                conv_bn(in_channels, in_channels, 3, stride, groups=in_channels),
                conv_bn(in_channels, branch, 1, act="relu"),
            )
            if entry
            else nn.Identity()
        )
        self.right = nn.Sequential(
            conv_bn(branch_in, branch, 1, act="relu"),
            conv_bn(branch, branch, 3, stride, groups=branch),
            conv_bn(branch, branch, 1, act="relu"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = (x, x) if self.entry else x.chunk(2, dim=1)
        out = torch.cat((self.left(left), self.right(right)), dim=1)
        return channel_shuffle(out)


@BACKBONES.register("shufflenetv2", preprocess=Preprocess())
class ShuffleNetV2(nn.Module):
    """(N, 3, S, S) -> (N, embedding_dim) raw embeddings."""

    def __init__(self, embedding_dim: int = 512, input_size: int = 112, width: float = 1.0) -> None:
        super().__init__()
        if width not in CHANNELS:
            raise ValueError(f"shufflenetv2 width must be one of {sorted(CHANNELS)}, not {width}")
        *stage_channels, last_channels = CHANNELS[width]
        strides = downsample_strides(input_size, 2 + len(STAGE_UNITS))
        stem_stride, pool_stride, *stage_strides = strides
        layers: list[nn.Module] = [conv_bn(3, STEM_CHANNELS, 3, stem_stride, act="relu")]
        if pool_stride == 2:
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        channels = STEM_CHANNELS
        for out_channels, units, stride in zip(
            stage_channels, STAGE_UNITS, stage_strides, strict=True
        ):
            layers.append(ShuffleUnit(channels, out_channels, stride, entry=True))
            layers += [ShuffleUnit(out_channels, out_channels, 1, False) for _ in range(units - 1)]
            channels = out_channels
        layers.append(conv_bn(channels, last_channels, 1, act="relu"))
        self.body = nn.Sequential(*layers)
        map_size = final_map_size(input_size, strides)
        self.embedding = GDCEmbedding(last_channels, map_size, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(x))
