"""Pieces every backbone shares: conv-BN-activation, the stride rule, embedding heads.

Stride rule (`downsample_strides`): each backbone is designed for 112x112 input and halves its
feature map at a fixed list of points (stem, max-pool, stage entries). For another input size
we keep as many of those halvings as possible while the final map stays at least
`MIN_FINAL_MAP` pixels wide, turning the *earliest* ones into stride 1 first: small inputs keep
their resolution in the cheap early layers (as CIFAR-style nets do), and the last stages, which
hold most of the parameters, stay unchanged. Every halving is a stride-2 convolution or
max-pool with "same" padding, so a map of side s becomes ceil(s / 2); `final_map_size` chains
that, and the embedding layers (FC or GDC) are built for the map that results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

MIN_INPUT_SIZE = 32
MIN_FINAL_MAP = 4

Activation = Literal["prelu", "relu", "relu6"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width-scaled channel count to a multiple of `divisor`, losing at most 10%.

    Multiples of 8 keep grouped/vectorised kernels efficient for any width multiplier.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def final_map_size(input_size: int, strides: Sequence[int]) -> int:
    """Side of the feature map after the given strides ("same" padding: ceil division)."""
    size = input_size
    for stride in strides:
        size = -(-size // stride)
    return size


def downsample_strides(input_size: int, num_downsamples: int) -> list[int]:
    """Stride (1 or 2) for each of a design's `num_downsamples` halving points (module rule)."""
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE}, not {input_size}")
    keep = num_downsamples
    while keep > 0 and final_map_size(input_size, [2] * keep) < MIN_FINAL_MAP:
        keep -= 1
    return [1] * (num_downsamples - keep) + [2] * keep


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: Activation | None = None,
    padding: int | None = None,
) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BN -> optional activation; padding defaults to "same"."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride,
            kernel // 2 if padding is None else padding,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act == "prelu":
        layers.append(nn.PReLU(out_channels))
    elif act == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif act == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection (MobileNetV2, MobileFaceNet).

    The projection has no activation ("linear bottleneck"): a ReLU on the narrow
    representation would destroy information. `expand=False` drops the 1x1 expansion
    (MobileNetV2's t=1 blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        stride: int,
        act: Activation,
        residual: bool,
        expand: bool = True,
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual block needs stride 1 and equal in/out channels")
        self.residual = residual
        layers = [conv_bn(in_channels, hidden, 1, act=act)] if expand else []
        layers += [
            conv_bn(hidden if expand else in_channels, hidden, 3, stride, groups=hidden, act=act),
            conv_bn(hidden, out_channels, 1),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def _check_map(x: torch.Tensor, map_size: int) -> None:
    """Fail with a readable message (not a matmul shape error) when fed the wrong input size."""
    if x.shape[-2:] != (map_size, map_size):
        raise ValueError(
            f"expected a {map_size}x{map_size} final feature map, got "
            f"{x.shape[-2]}x{x.shape[-1]}: feed the input_size the backbone was built for"
        )


class GDCEmbedding(nn.Module):
    """Global depthwise conv -> FC -> BN1d (MobileFaceNet's embedding head).

    The depthwise kernel spans the whole final map, so each channel learns its own weighting of
    face positions; global average pooling would weigh the face centre and the border alike.
    """

    def __init__(self, channels: int, map_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.map_size = map_size
        self.gdc = conv_bn(channels, channels, map_size, groups=channels, padding=0)
        self.fc = nn.Linear(channels, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.map_size)
        return self.bn(self.fc(self.gdc(x).flatten(1)))


class FlattenEmbedding(nn.Module):
    """BN2d -> flatten -> dropout -> FC -> BN1d (IResNet's "E" output block, arcface_torch).

    The FC sees every position of the final map (channels * map^2 inputs), so it is large but
    keeps spatial layout. The final BN1d has its scale frozen at 1, as in arcface_torch: only
    its shift is learnt, so no embedding dimension can be up- or down-weighted by it.
    """

    def __init__(self, channels: int, map_size: int, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.map_size = map_size
        self.bn2d = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * map_size * map_size, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self.bn.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.map_size)
        return self.bn(self.fc(self.dropout(self.bn2d(x).flatten(1))))
