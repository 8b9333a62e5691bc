"""The public surface: what a Python user calls, and what the CLI and server call too."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facelab.collections.service import cluster_people as cluster_people
from facelab.collections.service import index_photos as index_photos
from facelab.collections.service import search_photos as search_photos
from facelab.data.folders import IdentityFolder, Sample, list_images
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import roc_curve, threshold_at_far, verification_report
from facelab.eval.plots import rates_at
from facelab.fileio import atomic_write, atomic_write_text
from facelab.models import catalogue
from facelab.models.catalogue import ModelSummary
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.operating_points import TARGET_FARS
from facelab.models.registry import BACKBONES, DETECTORS
from facelab.pipeline import Embedded, ImageLike, embed_images
from facelab.submission import load_classifier as load_classifier
from facelab.submission import predict_folder as predict_folder
from facelab.submission import score_trial_file as score_trial_file
from facelab.train.loop import topk_accuracy

log = logging.getLogger(__name__)


RUNTIMES = ("torch", "onnx")


def is_model_name(spec: str | Path) -> bool:
    """Whether `spec` names a registered pretrained model (so it is never read as a file)."""
    return isinstance(spec, str) and spec in BACKBONES.names()


def with_detector(model: FaceModel, detector: str | None) -> FaceModel:
    """The model with its preprocessing naming `detector` (a registered face detector, e.g.
    "blazeface"); None or its own: the model itself.

    The detector is part of the preprocessing, so of the fingerprint (except the default,
    MTCNN): a gallery built with one detector refuses embeddings made with another. A model
    whose fingerprint is frozen (ONNX file, traced fast path) gets one derived from it. The
    operating points stay: they are the embedding network's (calibrated with MTCNN's faces;
    BlazeFace's alignment measured the same LFW accuracy, docs/detectors.md)."""
    if detector is None or detector == model.preprocess.detector:
        return model
    DETECTORS.get(detector)  # an unknown name fails here, listing the known ones
    frozen = model.frozen_fingerprint
    if frozen is not None:
        frozen = hashlib.sha256(f"{frozen}|detector={detector}".encode()).hexdigest()[:16]
    spec = replace(model.preprocess, detector=detector)
    changed = type(model)(
        model.backbone, spec, model.name, model.kwargs, frozen, model.operating_points
    )
    return changed.train(model.training)


def load_model(
    spec: str | Path,
    device: str | None = None,
    runtime: str | None = None,
    detector: str | None = None,
) -> FaceModel:
    """A facelab checkpoint file, the name of a registered backbone that ships pretrained
    weights (e.g. "dlib_resnet"), or an ONNX file made by `facelab export`, loaded offline.

    runtime: "torch", or "onnx" to embed with onnxruntime (a PyTorch model is exported in
    memory first); default: "onnx" for .onnx files, else "torch". detector: the face detector
    of landmark-aligned models (`with_detector`); default: the one the model records."""
    if detector is not None:
        return with_detector(load_model(spec, device, runtime), detector)
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
    if is_model_name(spec):  # a name wins over a stray file of that name in the cwd
        model = FaceModel.create(str(spec), pretrained=True)
    elif path.suffix in (".pt", ".pth") or path.is_file():
        model = model_from_checkpoint(load_checkpoint(path))
    else:
        raise FileNotFoundError(
            f"{spec}: neither a checkpoint file nor a pretrained model name "
            f"({', '.join(BACKBONES.names())})"
        )
    model.eval()
    return model.to(device) if device else model


def embed(
    model: FaceModel, images: Sequence[ImageLike], flip: bool = False, input: str = "photo"
) -> np.ndarray:
    """L2-normalised embeddings (N, D) of images given as paths or RGB uint8 arrays.

    input: "photo" (find each face), or "aligned" for crops already aligned like
    insightface's 112x112 ArcFace crops (`facelab.pipeline.INPUT_MODES`)."""
    return embed_images(model, images, flip=flip, progress=False, input=input).embeddings


def embed_directory(
    model: FaceModel,
    root: str | Path,
    batch_size: int = 32,
    flip: bool = False,
    fast: bool = True,
    progress: bool = True,
    skip_bad: bool = False,
    input: str = "photo",
) -> Embedded:
    """Embed every image under `root` (recursively, sorted), its main face, in batches; each
    row's route (how its face was found) is in `Embedded.routes`.

    fast: run a traced, frozen copy of the model (`FaceModel.for_inference`); input: as `embed`.
    skip_bad: leave unreadable files out (listed in `Embedded.skipped`) instead of stopping
    at the first one with an ImageError naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images")
    paths = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images found")
    runner = model.for_inference() if fast else model
    result = embed_images(
        runner,
        paths,
        flip=flip,
        batch_size=batch_size,
        progress=progress,
        skip_bad=skip_bad,
        input=input,
    )
    if not result.paths:
        raise ValueError(f"{root}: none of its {len(paths)} image files is readable")
    return result


def save_embeddings(result: Embedded, model: FaceModel, out: str | Path) -> Path:
    """Write paths, embeddings, each face's route and the model fingerprint to an .npz,
    atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(
        buffer,
        paths=np.array([str(p) for p in result.paths]),
        embeddings=result.embeddings,
        routes=result.routes,
        model=np.array(model.name),
        fingerprint=np.array(model.fingerprint()),
    )
    return atomic_write(out, lambda fh: fh.write(buffer.getvalue()))


@dataclass(frozen=True)
class Verification:
    score: float  # cosine similarity
    threshold: float | None
    same: bool | None  # None when no threshold is known
    reason: str  # where the threshold came from, or why there is none
    routes: tuple[str, str] = ("", "")  # how each image's face was found (pipeline.ROUTES)


def verify(
    model: FaceModel,
    a: ImageLike,
    b: ImageLike,
    threshold: float | None = None,
    flip: bool = False,
    far: float | None = None,
    input: str = "photo",
) -> Verification:
    """1:1 comparison of two face images by cosine similarity, decided at the threshold given,
    else at the model's operating point for target FAR `far` (default 1e-3); a model without
    that operating point gives no decision (same=None) and says so in `reason`. input: as
    `embed`."""
    from facelab.gallery.service import resolve_threshold
    from facelab.gallery.store import GalleryError

    try:
        chosen = resolve_threshold(None, threshold, far, model)
    except GalleryError as exc:
        chosen, reason = None, str(exc)
    result = embed_images(model, [a, b], flip=flip, progress=False, input=input)
    emb = result.embeddings
    score = float(emb[0] @ emb[1])
    routes = tuple(result.routes.tolist())
    if chosen is None:
        log.warning("%s", reason)
        return Verification(score, None, None, reason, routes)
    return Verification(score, chosen.value, score >= chosen.value, chosen.describe(), routes)


def list_models() -> list[ModelSummary]:
    """Every registered backbone and detector: kind, input and alignment, embedding size,
    parameters, GFLOPs per face, licence and source, and for pretrained weights their measured
    LFW View 2 accuracy and operating points, with provenance (`facelab.models.catalogue`)."""
    return catalogue.list_models()


def score_trials(
    model: FaceModel,
    trials: Sequence[Trial],
    flip: bool = False,
    batch_size: int = 64,
    input: str = "photo",
) -> np.ndarray:
    """Cosine score of every trial, embedding each unique image once; input: as `embed`."""
    unique = sorted({p for t in trials for p in (t.a, t.b)})
    index = {p: i for i, p in enumerate(unique)}
    emb = embed_images(model, unique, flip=flip, batch_size=batch_size, input=input).embeddings
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
    input: str = "photo",
) -> dict[str, Any]:
    """Verification metrics of a labelled trial list (10-fold accuracy when it has folds), and
    where the model's operating points fall on it (FAR/FRR at each; a model without any gets
    this list's own thresholds at FAR 1e-2, 1e-3, 1e-4 instead). With `out_dir`, also
    metrics.json, roc.png (linear and logarithmic FPR), det.png and scores.png there, each
    with those operating points marked."""
    trials = read_trials(trials_path, images_root)
    if any(t.label is None for t in trials):
        raise ValueError(f"{trials_path}: evaluation needs a label on every trial")
    scores = score_trials(model, trials, flip=flip, batch_size=batch_size, input=input)
    labels = np.array([t.label for t in trials])
    folds = np.array([t.fold for t in trials]) if trials[0].fold is not None else None
    report = verification_report(scores, labels, folds)
    report.update(trials=str(trials_path), pairs=len(trials), flip=flip, model=model.name)
    marks = [(f"{model.name} {p.name}", p.threshold) for p in model.operating_points] or [
        (f"FAR {far:g} on these trials", threshold_at_far(scores, labels, far)["threshold"])
        for far in TARGET_FARS
    ]
    points = rates_at(scores, labels, marks)
    report["operating_points"] = [
        {"label": label, "threshold": value, "far": far, "frr": 1.0 - tar}
        for (label, value), (_, far, tar) in zip(marks, points, strict=True)
    ]
    if out_dir is not None:
        from facelab.eval.plots import plot_det, plot_roc, plot_score_histogram

        out = Path(out_dir)
        title = f"{model.name} on {Path(trials_path).name}"
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
        fpr, tpr, _ = roc_curve(scores, labels)
        plot_roc(fpr, tpr, out / "roc.png", title=title, auc=report["auc"], points=points)
        plot_det(fpr, tpr, out / "det.png", title=title, points=points)
        plot_score_histogram(
            scores,
            labels,
            out / "scores.png",
            threshold=report["best_accuracy_threshold"],
            marks=marks,
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
