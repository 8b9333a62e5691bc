"""Transfer learning: where a run's backbone starts, and which of its blocks stay frozen.

`init_from` names a registered backbone with pretrained weights (e.g. "dlib_resnet") or a
facelab checkpoint; only the backbone is taken (a new head is built for the new identities)
and it keeps its own preprocessing, so e.g. dlib_resnet still gets five-point aligned 150x150
chips. `trainable_blocks: N` freezes all but the last N blocks (`backbone_blocks`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from facelab.data.align import ARCFACE_TEMPLATE_112
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess, resized
from facelab.models.registry import BACKBONES
from facelab.train.config import TrainConfig
from facelab.train.distill import teacher_preprocess

log = logging.getLogger(__name__)

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def training_preprocess(cfg: TrainConfig) -> Preprocess:
    """The preprocessing a fresh model trains (and later embeds) with."""
    if cfg.alignment == "teacher":
        return resized(teacher_preprocess(str(cfg.teacher)), cfg.image_size)
    if cfg.alignment == "five_point":
        arcface = Preprocess(crop=cfg.crop, alignment="five_point", template=ARCFACE_TEMPLATE_112)
        return resized(arcface, cfg.image_size)
    return Preprocess(size=cfg.image_size, crop=cfg.crop)


def initial_model(cfg: TrainConfig) -> FaceModel:
    """A fresh `cfg.backbone`, or the pretrained backbone / checkpoint `cfg.init_from`."""
    if cfg.init_from is None:
        return FaceModel.create(
            cfg.backbone,
            preprocess=training_preprocess(cfg),
            embedding_dim=cfg.embedding_dim,
            input_size=cfg.image_size,
            **cfg.backbone_options,
        )
    if Path(cfg.init_from).is_file():
        model = model_from_checkpoint(load_checkpoint(cfg.init_from))
    elif cfg.init_from in BACKBONES.names():
        model = FaceModel.create(cfg.init_from, pretrained=True)
    else:
        raise FileNotFoundError(
            f"init_from {cfg.init_from!r}: neither a checkpoint file nor a registered backbone "
            f"({', '.join(BACKBONES.names())})"
        )
    log.info(
        "starting from %s (%s, %dx%d %s input); backbone/image_size/embedding_dim options are "
        "not used",
        cfg.init_from,
        model.name,
        model.preprocess.size,
        model.preprocess.size,
        model.preprocess.alignment,
    )
    # Training changes the weights: the starting model's operating points no longer hold (the
    # run's validation trials, if any, calibrate new ones).
    model.operating_points = ()
    return model


def _composite(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order.

    Its children, descending into plain containers (Sequential, ModuleList) that hold composite
    modules: a conv-BN-activation Sequential is one block, a stage of residual blocks is its
    residual blocks, an embedding head is one block. (Every facelab backbone registers its
    children in the order its forward pass uses them.)
    """
    blocks: list[nn.Module] = []
    for child in backbone.children():
        if isinstance(child, _CONTAINERS) and any(_composite(c) for c in child.children()):
            blocks.extend(backbone_blocks(child))
        else:
            blocks.append(child)
    return blocks


def freeze_all_but_last(backbone: nn.Module, trainable: int) -> list[nn.Module]:
    """Stop gradients to all but the last `trainable` blocks; returns the frozen blocks, which
    the training loop keeps in eval mode (their batch-norm statistics stay as learnt)."""
    blocks = backbone_blocks(backbone)
    if trainable > len(blocks):
        raise ValueError(f"trainable_blocks {trainable}: this backbone has {len(blocks)} blocks")
    frozen = blocks[: len(blocks) - trainable]
    for block in frozen:
        block.requires_grad_(False)
    log.info("training the last %d of %d backbone blocks", trainable, len(blocks))
    return frozen
