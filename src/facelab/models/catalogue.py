"""What every registered model is: kind, input, embedding size, parameters, GFLOPs per face,
licence and source, and (for pretrained weights) the measured LFW accuracy and operating points
from its model card (`model_cards.json`). Behind `facelab models` and `facelab.list_models()`.

Sizes and FLOPs do not depend on the weights, so each network is built with random weights
(no weight file is read) and run once on a zero input, with forward hooks on its convolution
and linear layers counting two FLOPs per multiply-add (bias, batch-norm, activations, pooling
and residual additions are not counted), the convention of `torch.utils.flop_counter`, which
the tests check this count against. The hooks are used rather than that module because its
first use loads much of torch's compiler stack (13.7 s here, on a heavily loaded 2-core
machine where the whole listing with hooks took 8.7 s), which `facelab models` need not pay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from facelab.models.operating_points import model_card
from facelab.models.registry import BACKBONES, DETECTORS

# A model without a card is facelab's own architecture, trained by the user.
OWN_LICENCE = "MIT (facelab's own code; no pretrained weights)"
OWN_SOURCE = "facelab"
# What the detector's FLOPs are counted on: LFW's frame size.
DETECTOR_IMAGE = 250


@dataclass(frozen=True)
class ModelSummary:
    name: str
    kind: str  # "backbone" or "detector"
    input: str
    alignment: str | None
    embedding_dim: int | None
    parameters: int
    gflops: float
    gflops_counted_on: str
    pretrained: bool
    licence: str
    source: str
    lfw_view2: dict[str, Any] | None
    operating_points: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_flops(layer: nn.Module, output: torch.Tensor) -> int:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return 2 * output.numel() * (layer.in_channels // layer.groups) * kh * kw
    return 2 * output.numel() * layer.in_features  # nn.Linear


def count_flops(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """(FLOPs, output) of one forward pass of `module` on a zero input of `shape`."""
    total = 0

    def hook(layer: nn.Module, _: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_flops(layer, output)

    layers = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            out = module(torch.zeros(shape))
    finally:
        for handle in handles:
            handle.remove()
    return total, out


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _card_fields(name: str) -> dict[str, Any]:
    card = model_card(name)
    return {
        "pretrained": "source" in card,
        "licence": card.get("licence", OWN_LICENCE),
        "source": card.get("source", OWN_SOURCE),
        "lfw_view2": card.get("lfw_view2"),
        "operating_points": card.get("operating_points"),
    }


def backbone_summary(name: str) -> ModelSummary:
    entry = BACKBONES.get(name)
    network = entry.constructor().eval()
    spec = entry.preprocess
    flops, out = count_flops(network, (1, 3, spec.size, spec.size))
    return ModelSummary(
        name=name,
        kind="backbone",
        input=f"{spec.size}x{spec.size} {spec.colour}",
        alignment=spec.alignment,
        embedding_dim=int(out.shape[1]),
        parameters=_parameters(network),
        gflops=flops / 1e9,
        gflops_counted_on=f"one {spec.size}x{spec.size} face",
        **_card_fields(name),
    )


def detector_summary(name: str) -> ModelSummary:
    """A detector's cost depends on the image. MTCNN's is counted as P-Net over the whole
    pyramid of a 250x250 image plus R-Net and O-Net on one candidate each (the least a one-face
    image costs); a single-shot detector's (BlazeFace) as one pass of its network at its input
    size, counted by torch's FlopCounterMode, since the converted graph runs its 1x1
    convolutions as matrix products, which forward hooks on convolutions do not see."""
    if name == "mtcnn":  # the one cascade detector
        net = DETECTORS.create(name, pretrained=False).eval()
        flops = 0
        for scale in net._scales(DETECTOR_IMAGE, DETECTOR_IMAGE):
            side = math.ceil(DETECTOR_IMAGE * scale)
            flops += count_flops(net.pnet, (1, 3, side, side))[0]
        flops += count_flops(net.rnet, (1, 3, 24, 24))[0]
        flops += count_flops(net.onet, (1, 3, 48, 48))[0]
        accepts = f"any RGB image; faces from {net.min_face_size:g} px"
        counted_on = (
            f"a {DETECTOR_IMAGE}x{DETECTOR_IMAGE} image: P-Net pyramid + R-Net and O-Net on "
            "one candidate each"
        )
    else:
        from torch.utils.flop_counter import FlopCounterMode

        net = DETECTORS.create(name)
        size = net.variant.input_size
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.network(torch.zeros(1, 3, size, size))
        flops = counter.get_total_flops()
        accepts = f"any RGB image, letterboxed to {size}x{size}"
        counted_on = f"one {size}x{size} network pass"
    return ModelSummary(
        name=name,
        kind="detector",
        input=accepts,
        alignment=None,
        embedding_dim=None,
        parameters=_parameters(net),
        gflops=flops / 1e9,
        gflops_counted_on=counted_on,
        **_card_fields(name),
    )


def list_models() -> list[ModelSummary]:
    """Every registered backbone, then every registered detector, by name."""
    return [backbone_summary(n) for n in BACKBONES.names()] + [
        detector_summary(n) for n in DETECTORS.names()
    ]
