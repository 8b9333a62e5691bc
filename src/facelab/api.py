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

from facelab.collections.service import cluster_people as cluster_people
from facelab.collections.service import index_photos as index_photos
from facelab.collections.service import search_photos as search_photos
from facelab.data.folders import IdentityFolder, Sample, list_images
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import roc_curve, verification_report
from facelab.fileio import atomic_write, atomic_write_text
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.registry import BACKBONES
from facelab.pipeline import Embedded, ImageLike, embed_images
from facelab.submission import load_classifier as load_classifier
from facelab.submission import predict_folder as predict_folder
from facelab.submission import score_trial_file as score_trial_file
from facelab.train.loop import topk_accuracy

log = logging.getLogger(__name__)


RUNTIMES = ("torch", "onnx")


def load_model(
    spec: str | Path, device: str | None = None, runtime: str | None = None
) -> FaceModel:
    """A facelab checkpoint file, the name of a registered backbone that ships pretrained
    weights (e.g. "dlib_resnet"), or an ONNX file made by `facelab export`, loaded offline.

    runtime: "torch", or "onnx" to embed with onnxruntime (a PyTorch model is exported in
    memory first); default: "onnx" for .onnx files, else "torch"."""
    path = Path(spec)
    if runtime not in (None, *RUNTIMES):
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if path.suffix == ".onnx" or runtime == "onnx":
        from facelab.models.export import load_onnx, onnx_bytes

        if runtime == "torch":
            raise ValueError(f"{spec}: an ONNX file runs with runtime 'onnx', not 'torch'")
        if device not in (None, "cpu"):
            raise ValueError(f"runtime 'onnx' runs on the CPU, not {device!r}")
        return load_onnx(path if path.suffix == ".onnx" else onnx_bytes(load_model(spec)))
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


def embed_directory(
    model: FaceModel,
    root: str | Path,
    batch_size: int = 32,
    flip: bool = False,
    fast: bool = True,
    progress: bool = True,
) -> Embedded:
    """Embed every image under `root` (recursively, sorted), its main face, in batches.

    fast: run a traced, frozen copy of the model (`FaceModel.for_inference`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images")
    paths = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images found")
    runner = model.for_inference() if fast else model
    return embed_images(runner, paths, flip=flip, batch_size=batch_size, progress=progress)


def save_embeddings(result: Embedded, model: FaceModel, out: str | Path) -> Path:
    """Write paths, embeddings, no-face flags and the model fingerprint to an .npz, atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(
        buffer,
        paths=np.array([str(p) for p in result.paths]),
        embeddings=result.embeddings,
        no_face=result.fallback,
        model=np.array(model.name),
        fingerprint=np.array(model.fingerprint()),
    )
    return atomic_write(out, lambda fh: fh.write(buffer.getvalue()))


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


def run_folder(config: dict[str, Any]) -> IdentityFolder:
    """The identity folder a training run (its saved config) sees, as the training loop scans
    it (`training_folder`)."""
    from facelab.train.config import TrainConfig
    from facelab.train.loop import training_folder

    return training_folder(TrainConfig.from_dict(config))


def run_images(config: dict[str, Any], split: str = "val") -> tuple[tuple[str, ...], list[Sample]]:
    """The identities a training run learnt and its held-out ("val") or training images: the
    same deterministic split the run made, so that accuracy and submission checks use images
    the run never trained on."""
    from facelab.data.folders import split_images

    folder = run_folder(config)
    train_part, val_part = split_images(folder.samples, config["val_fraction"], config["seed"])
    return folder.identities, val_part if split == "val" else train_part


def classify(checkpoint: str | Path, split: str = "val", batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 accuracy of a classification checkpoint on the held-out images of its own
    training identities (the same deterministic split the run used)."""
    clf = load_classifier(checkpoint)
    identities, samples = run_images(clf.config, split)
    if identities != clf.classes:
        raise ValueError(
            f"{clf.config['data']}: identities differ from those {checkpoint} was trained on"
        )
    if not samples:
        raise ValueError(f"{checkpoint}: its run held out no images (val_fraction 0)")
    logits = embed_images(
        clf.model, [s.path for s in samples], batch_size=batch_size, progress=False
    ).embeddings
    labels = torch.tensor([s.label for s in samples])
    return {**topk_accuracy(torch.from_numpy(logits), labels), "images": len(samples)}
