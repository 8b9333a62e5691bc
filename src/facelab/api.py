"""The public surface: what a Python user calls, and what the CLI and server call too."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facelab.data.folders import IdentityFolder, Sample
from facelab.data.images import read_image
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import roc_curve, verification_report
from facelab.fileio import atomic_write_text
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.registry import BACKBONES, HEADS
from facelab.pipeline import ImageLike, embed_images
from facelab.train.loop import topk_accuracy

log = logging.getLogger(__name__)


def load_model(spec: str | Path, device: str | None = None) -> FaceModel:
    """A facelab checkpoint file, or the name of a registered backbone that ships pretrained
    weights (e.g. "dlib_resnet"), loaded offline."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth") or path.is_file():
        model = model_from_checkpoint(load_checkpoint(path))
    elif str(spec) in BACKBONES.names():
        model = FaceModel.create(str(spec), pretrained=True)
    else:
        raise FileNotFoundError(
            f"{spec}: neither a checkpoint file nor a pretrained model name "
            f"({', '.join(BACKBONES.names())})"
        )
    model.eval()
    return model.to(device) if device else model


def embed(model: FaceModel, images: Sequence[ImageLike], flip: bool = False) -> np.ndarray:
    """L2-normalised embeddings (N, D) of images given as paths or RGB uint8 arrays."""
    return embed_images(model, images, flip=flip, progress=False).embeddings


@dataclass(frozen=True)
class Verification:
    score: float  # cosine similarity
    threshold: float | None
    same: bool | None  # None when no threshold was given


def verify(
    model: FaceModel, a: ImageLike, b: ImageLike, threshold: float | None = None, flip: bool = False
) -> Verification:
    """1:1 comparison of two face images by cosine similarity."""
    emb = embed(model, [a, b], flip=flip)
    score = float(emb[0] @ emb[1])
    return Verification(score, threshold, None if threshold is None else score >= threshold)


def score_trials(
    model: FaceModel, trials: Sequence[Trial], flip: bool = False, batch_size: int = 64
) -> np.ndarray:
    """Cosine score of every trial, embedding each unique image once."""
    unique = sorted({p for t in trials for p in (t.a, t.b)})
    index = {p: i for i, p in enumerate(unique)}
    emb = embed_images(model, unique, flip=flip, batch_size=batch_size).embeddings
    a = np.fromiter((index[t.a] for t in trials), dtype=np.int64, count=len(trials))
    b = np.fromiter((index[t.b] for t in trials), dtype=np.int64, count=len(trials))
    return np.einsum("ij,ij->i", emb[a], emb[b])


def evaluate(
    model: FaceModel,
    trials_path: str | Path,
    images_root: str | Path | None = None,
    flip: bool = False,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Verification metrics of a labelled trial list (10-fold accuracy when it has folds);
    with `out_dir`, also metrics.json, roc.png and scores.png there."""
    trials = read_trials(trials_path, images_root)
    if any(t.label is None for t in trials):
        raise ValueError(f"{trials_path}: evaluation needs a label on every trial")
    scores = score_trials(model, trials, flip=flip, batch_size=batch_size)
    labels = np.array([t.label for t in trials])
    folds = np.array([t.fold for t in trials]) if trials[0].fold is not None else None
    report = verification_report(scores, labels, folds)
    report.update(trials=str(trials_path), pairs=len(trials), flip=flip, model=model.name)
    if out_dir is not None:
        from facelab.eval.plots import plot_roc, plot_score_histogram

        out = Path(out_dir)
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
        fpr, tpr, _ = roc_curve(scores, labels)
        plot_roc(
            fpr,
            tpr,
            out / "roc.png",
            title=f"{model.name} on {Path(trials_path).name}",
            auc=report["auc"],
        )
        plot_score_histogram(
            scores, labels, out / "scores.png", threshold=report["best_accuracy_threshold"]
        )
    return report


def classify(checkpoint: str | Path, split: str = "val", batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 accuracy of a classification checkpoint on the held-out images of its own
    training identities (the same deterministic split the run used)."""
    from facelab.data.folders import split_images
    from facelab.train.config import TrainConfig
    from facelab.train.loop import people_in

    payload = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(payload["config"])
    model = model_from_checkpoint(payload).eval()
    head_info = payload["head"]
    head = HEADS.create(
        head_info["name"],
        embedding_dim=head_info["embedding_dim"],
        num_classes=len(head_info["classes"]),
        **cfg.head_options,
    )
    head.load_state_dict(payload["head_state"])
    head.eval()
    excluded = set().union(*(people_in(p) for p in cfg.exclude_people))
    folder = IdentityFolder.scan(cfg.data, cfg.min_images, exclude=excluded or None)
    if list(folder.identities) != head_info["classes"]:
        raise ValueError(f"{cfg.data}: identities differ from those {checkpoint} was trained on")
    train_part, val_part = split_images(folder.samples, cfg.val_fraction, cfg.seed)
    samples: list[Sample] = val_part if split == "val" else train_part
    if not samples:
        raise ValueError(f"{checkpoint}: its run held out no images (val_fraction 0)")
    logits = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            faces = [
                model.preprocess.to_tensor(read_image(s.path))
                for s in samples[start : start + batch_size]
            ]
            logits.append(head(model.backbone(torch.stack(faces))))
    labels = torch.tensor([s.label for s in samples])
    return {**topk_accuracy(torch.cat(logits), labels), "images": len(samples)}
