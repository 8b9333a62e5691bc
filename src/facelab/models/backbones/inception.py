"""A FaceNet/OpenFace-style Inception network ("inception"; OpenFace's nn4.small2).

Szegedy et al.'s Inception modules as FaceNet's NN4 uses them (Schroff et al. 2015, table 2),
in OpenFace's small variant for 96x96 faces (Amos et al. 2016): a 7x7/2 stem, max-pool, 1x1 and
3x3 convolutions, max-pool, then modules 3a, 3b, 3c (reduction), 4a, 4e (reduction), 5a, 5b,
global average pooling and a linear layer to the 128-D embedding (L2-normalised by FaceModel).
Batch norm follows every convolution and replaces the stem's local response normalisation.
"L2" pooling branches pool the root mean square of the window (OpenFace pools the L2 norm, a
fixed multiple of it away from the border; the batch norm after the projection absorbs it).

Input sizes: the stem, the two max-pools and the reductions 3c and 4e are the five halving
points. nn4.small2 keeps all five down to a 3x3 final map (96 -> 3x3, 112 -> 4x4) before global
average pooling; inputs too small for that follow `layers.downsample_strides` (the earliest
halvings become stride 1, a stride-1 max-pool is dropped): 64 -> 4x4, 32 -> 4x4.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from facelab.models.backbones.layers import conv_bn, downsample_strides, final_map_size
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

MIN_POOLED_MAP = 3  # nn4.small2's final map at 96x96; global average pooling follows
Pool = Literal["max", "l2"]


class RMSPool(nn.Module):
    """3x3 root-mean-square pooling ("same" padding; the floor keeps the gradient finite)."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = F.avg_pool2d(x.square(), 3, self.stride, 1, count_include_pad=False)
        return (mean_square + 1e-6).sqrt()


class Inception(nn.Module):
    """Parallel 1x1, 1x1->3x3, 1x1->5x5 and pool(->1x1) branches, concatenated.

    A zero width drops a branch. In a reduction module (stride 2) the 3x3 and 5x5 branches
    stride and the max-pool branch passes its input through unprojected (pool_proj 0).
    """

    def __init__(
        self,
        in_channels: int,
        conv1: int,
        conv3: tuple[int, int],
        conv5: tuple[int, int] | None,
        pool: Pool,
        pool_proj: int,
        stride: int = 1,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = []
        if conv1:
            branches.append(conv_bn(in_channels, conv1, 1, act="relu"))
        for kernel, widths in ((3, conv3), (5, conv5)):
            if widths is not None:
                reduce, out = widths
                branches.append(
                    nn.Sequential(
                        conv_bn(in_channels, reduce, 1, act="relu"),
                        conv_bn(reduce, out, kernel, stride, act="relu"),
                    )
                )
        pooling = nn.MaxPool2d(3, stride, 1) if pool == "max" else RMSPool(stride)
        if pool_proj:
            branches.append(nn.Sequential(pooling, conv_bn(in_channels, pool_proj, 1, act="relu")))
        else:
            branches.append(pooling)
        self.branches = nn.ModuleList(branches)
        self.out_channels = conv1 + conv3[1] + (conv5[1] if conv5 else 0)
        self.out_channels += pool_proj or in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def inception_strides(input_size: int) -> list[int]:
    """nn4.small2's five halvings while the final map stays >= 3 pixels, else the shared rule."""
    if final_map_size(input_size, [2] * 5) >= MIN_POOLED_MAP:
        return [2] * 5
    return downsample_strides(input_size, 5)


@BACKBONES.register("inception", preprocess=Preprocess(size=96))
class InceptionNN4Small2(nn.Module):
    """(N, 3, S, S) -> (N, embedding_dim) raw embeddings; defaults are OpenFace's nn4.small2."""

    def __init__(self, embedding_dim: int = 128, input_size: int = 96) -> None:
        super().__init__()
        stem, pool1, pool2, reduce3, reduce4 = inception_strides(input_size)
        layers: list[nn.Module] = [conv_bn(3, 64, 7, stem, act="relu")]
        if pool1 == 2:
            layers.append(nn.MaxPool2d(3, 2, 1))
        layers += [conv_bn(64, 64, 1, act="relu"), conv_bn(64, 192, 3, act="relu")]
        if pool2 == 2:
            layers.append(nn.MaxPool2d(3, 2, 1))
        modules = [
            Inception(192, 64, (96, 128), (16, 32), "max", 32),  # 3a -> 256
            Inception(256, 64, (96, 128), (32, 64), "l2", 64),  # 3b -> 320
            Inception(320, 0, (128, 256), (32, 64), "max", 0, reduce3),  # 3c -> 640
            Inception(640, 256, (96, 192), (32, 64), "l2", 128),  # 4a -> 640
            Inception(640, 0, (160, 256), (64, 128), "max", 0, reduce4),  # 4e -> 1024
            Inception(1024, 256, (96, 384), None, "l2", 96),  # 5a -> 736
            Inception(736, 256, (96, 384), None, "max", 96),  # 5b -> 736
        ]
        self.body = nn.Sequential(*layers, *modules)
        self.embedding = nn.Linear(modules[-1].out_channels, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(x).mean(dim=(2, 3)))
