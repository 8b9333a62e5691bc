"""Knowledge distillation: a fast student learns to reproduce a teacher's embeddings.

Two ways to get the targets, chosen by the student's preprocessing:
- a student with its own preprocessing (e.g. a ShuffleNet on 112-pixel faces): the teacher
  (e.g. the imported dlib ResNet) embeds every training image once, with its own preprocessing
  (detection and alignment through `facelab.pipeline.embed_images`); the result is cached on
  disk, keyed by the teacher's fingerprint and the image paths, so the epochs cost only the
  student. Augmentation must then stay mild (flip): the targets belong to the clean images.
- a student with the teacher's preprocessing, at any input size (`alignment: teacher`, e.g. a
  ShuffleNet on dlib's template scaled to 112 pixels): training faces are cut at the teacher's
  size, the teacher embeds every augmented batch and the student sees the same batch resized
  (`OnlineTeacher`), so any augmentation, CutMix included, gets consistent targets and each
  epoch shows new input/target pairs ("consistent teaching", Beyer et al. 2022).
The student's embedding layer projects straight into the teacher's space (its
`embedding_dim` is the teacher's).

Centred targets (`centre_targets`, the default): dlib's embeddings of all faces share one
dominant direction (their mean cosine to the mean embedding is 0.91 on LFW), so a student that
outputs that mean already scores a cosine of 0.9 while knowing nothing about identity; its
gradient barely carries the identity part. The targets are therefore the teacher's embeddings
minus their mean over the training images, re-normalised: the student learns the part that
tells faces apart (a fixed shift of the teacher's space, the same for every face).

Batches of a distillation run carry training-sample indices instead of labels: `Distillation`
looks up each sample's cached teacher embedding (unless given the online teacher's) and, when
`identity_weight > 0`, its label for the identity loss. Labels are therefore optional: with
`identity_weight: 0` the folder structure is never used, any set of face images will do.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facelab.data.folders import Sample
from facelab.fileio import atomic_write
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess, resized
from facelab.models.registry import BACKBONES
from facelab.pipeline import FACE_SELECTION, embed_images
from facelab.train.batches import decode_faces
from facelab.train.config import DISTILL_LOSSES, TrainConfig
from facelab.train.losses import Criterion

log = logging.getLogger(__name__)


def load_teacher(spec: str) -> FaceModel:
    """A facelab checkpoint file or a registered backbone with pretrained weights, in eval mode."""
    if Path(spec).is_file():
        model = model_from_checkpoint(load_checkpoint(spec))
    elif spec in BACKBONES.names():
        model = FaceModel.create(spec, pretrained=True)
    else:
        raise FileNotFoundError(
            f"teacher {spec!r}: neither a checkpoint file nor a registered backbone "
            f"({', '.join(BACKBONES.names())})"
        )
    return model.eval()


def teacher_preprocess(spec: str) -> Preprocess:
    """The preprocessing of a teacher (`load_teacher`'s spec); a registered name's without
    reading its pretrained weights."""
    if spec in BACKBONES.names() and not Path(spec).is_file():
        return FaceModel.create(spec).preprocess
    return load_teacher(spec).preprocess


def embedding_cache_file(model: FaceModel, paths: Sequence[Path], cache_dir: str | Path) -> Path:
    """Where the model's embeddings of exactly these images are cached: another model (other
    weights or preprocessing) or another image list never reuses a stale file."""
    digest = hashlib.sha256(f"embeddings|{model.fingerprint()}|{FACE_SELECTION}|".encode())
    for p in paths:
        digest.update(f"{p}\n".encode())
    return Path(cache_dir) / f"embeddings-{digest.hexdigest()[:20]}.npz"


def cached_embeddings(
    model: FaceModel,
    paths: Sequence[Path],
    cache_dir: str | Path | None = None,
    workers: int = 2,
    batch_size: int = 32,
) -> np.ndarray:
    """L2-normalised embeddings (N, D) of the images, computed once and cached (.npz).

    The model sees each image as it would at inference (`embed_images`: its own detector,
    alignment and normalisation): a teacher's targets are its real outputs, whatever the
    student's preprocessing.
    """
    paths = [Path(p) for p in paths]
    cache_file = embedding_cache_file(model, paths, cache_dir) if cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file) as stored:
            if stored["paths"].tolist() == [str(p) for p in paths]:
                log.info("using embedding cache %s", cache_file)
                return stored["embeddings"]
        log.warning("%s does not hold these images: recomputing", cache_file)
    log.info("embedding %d images with %s", len(paths), model.name)
    result = embed_images(model, paths, batch_size=batch_size, workers=workers)
    embeddings = result.embeddings.astype(np.float32)
    if cache_file is not None:
        atomic_write(
            cache_file,
            lambda fh: np.savez(
                fh,
                embeddings=embeddings,
                paths=np.array([str(p) for p in paths]),
                routes=result.routes,
                fingerprint=np.array(model.fingerprint()),
            ),
        )
        log.info("cached the embeddings in %s", cache_file)
    return embeddings


def teaches_online(teacher: Preprocess, student: Preprocess) -> bool:
    """Whether the student's preprocessing is the teacher's up to its size, so the teacher can
    embed every training batch as the student sees it (`OnlineTeacher`)."""
    return student == resized(teacher, student.size)


def teacher_targets(
    cfg: TrainConfig,
    teacher: FaceModel,
    samples: Sequence[Sample],
    online: bool = False,
    faces: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, D), mean (D,)): the teacher's unit embeddings of the training samples, minus
    their mean and re-normalised when `cfg.centre_targets` (else the mean is zero).

    online: the samples are embedded as the training faces the online teacher will see (cut
    once into the decoded-face cache, which training then reads), not through the pipeline,
    which would detect every face a second time. `faces`: those faces, if the caller has
    them already (else they are decoded, or read from the cache).
    """
    paths = [s.path for s in samples]
    if online:
        if faces is None:
            faces = decode_faces(paths, teacher.preprocess, cfg.cache_dir, cfg.workers)
        embeddings = np.concatenate(
            [
                teacher.embed_tensors(teacher.preprocess.normalise(chunk))
                for chunk in np.array_split(faces, max(1, len(faces) // 256))
            ]
        )
    else:
        embeddings = cached_embeddings(teacher, paths, cfg.cache_dir, cfg.workers)
    mean = embeddings.mean(0) if cfg.centre_targets else np.zeros(embeddings.shape[1], np.float32)
    return centred(embeddings, mean), mean


def centred(embeddings: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Unit embeddings minus a mean embedding, re-normalised (how a teacher's embeddings look
    to its centred-target student)."""
    shifted = embeddings - mean
    return (shifted / np.linalg.norm(shifted, axis=1, keepdims=True)).astype(np.float32)


class OnlineTeacher(nn.Module):
    """The teacher's network as a frozen target function: (N, 3, S, S) inputs -> unit
    embeddings, centred on `mean` like the cached targets. Always in eval mode, never trained.

    Training batches are cut with the teacher's preprocessing; `student_view` resizes them to
    the student's input size (the rest of their preprocessing is the same).
    """

    def __init__(self, backbone: nn.Module, mean: torch.Tensor, student_size: int) -> None:
        super().__init__()
        self.student_size = student_size
        self.backbone = backbone.eval()
        for weight in backbone.parameters():
            weight.requires_grad_(False)
        self.register_buffer("mean", mean.float(), persistent=False)

    def train(self, mode: bool = True) -> OnlineTeacher:
        return super().train(False)

    def student_view(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-sized inputs as the student takes them."""
        if x.shape[-1] == self.student_size:
            return x
        size = (self.student_size, self.student_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = F.normalize(self.backbone(x).float(), dim=1) - self.mean
        return F.normalize(shifted, dim=1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean distance of raw student embeddings (N, D) to unit teacher embeddings (N, D).

    cosine: 1 - cos(student, teacher), blind to the student's norm, which cosine scoring ignores
    too. mse: squared Euclidean distance to the unit teacher vector, which also pulls the
    student's norm to 1; for unit student vectors it equals 2 * (1 - cos).
    """
    student = student.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if kind == "mse":
        return (student - teacher).square().sum(1).mean()
    raise ValueError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, not {kind!r}")


class Distillation(nn.Module):
    """The criterion of a distillation run, called with (raw student embeddings, sample indices).

    `targets[i]` is training sample i's teacher embedding and `labels[i]` its identity; with an
    `identity` criterion (weight > 0) its loss on those labels is added. Targets and labels are
    rebuilt from the cache on resume, so they are not part of the checkpointed state.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        labels: torch.Tensor,
        kind: str = "cosine",
        identity: Criterion | None = None,
        identity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}")
        if len(targets) != len(labels):
            raise ValueError(f"{len(targets)} teacher embeddings for {len(labels)} samples")
        self.register_buffer("targets", targets.float(), persistent=False)
        self.register_buffer("labels", labels.long(), persistent=False)
        self.kind = kind
        self.identity = identity if identity_weight > 0 else None
        self.identity_weight = identity_weight

    @property
    def head(self) -> nn.Module | None:
        """The identity classifier (for the loop's top-k accuracy), if labels are used."""
        return self.identity.head if self.identity is not None else None

    @property
    def margin(self) -> float | None:
        """No triplet margin: the loop's collapse check looks only at embedding spread."""
        return None

    def forward(
        self, features: torch.Tensor, index: torch.Tensor, taught: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`taught`: the online teacher's targets for this very batch (else the cached ones)."""
        target = self.targets[index] if taught is None else taught
        loss = distillation_loss(features, target, self.kind)
        if self.identity is not None:
            loss = loss + self.identity_weight * self.identity(features, self.labels[index])
        return loss

    def extra_repr(self) -> str:
        return f"kind={self.kind}, identity_weight={self.identity_weight}"


def distillation(
    cfg: TrainConfig,
    identity: Criterion,
    samples: Sequence[Sample],
    student: FaceModel,
    device: torch.device,
    faces: np.ndarray | None = None,
) -> tuple[Distillation, torch.Tensor, OnlineTeacher | None]:
    """The criterion of a run with `cfg.teacher`, what its batches carry (sample indices), and
    the online teacher on `device` when the student shares the teacher's preprocessing up to
    its size (`alignment: teacher`; else None). The online teacher runs as the traced, frozen
    `for_inference` copy.

    `identity` is the run's ordinary criterion (`cfg.loss`), kept when `identity_weight > 0`;
    `faces`: the samples as the teacher's preprocessing cuts them, if the caller has decoded
    them already (`teacher_targets`).
    """
    if cfg.teacher is None:
        raise ValueError("distillation needs cfg.teacher")
    teacher = load_teacher(cfg.teacher).to(device)
    fast = teacher.for_inference()
    teaches = teaches_online(teacher.preprocess, student.preprocess)
    targets, mean = teacher_targets(cfg, fast, samples, teaches, faces)
    if targets.shape[1] != student.embedding_dim:
        raise ValueError(
            f"the student embeds in {student.embedding_dim} dimensions, the teacher "
            f"{cfg.teacher} in {targets.shape[1]}: set embedding_dim: {targets.shape[1]} (the "
            "student's embedding layer is then its projection into the teacher's space)"
        )
    online = None
    if teaches:
        online = OnlineTeacher(fast.backbone, torch.from_numpy(mean), student.preprocess.size).to(
            device
        )
    log.info(
        "distilling %s (%s loss, %s targets %s, identity weight %g) into %s",
        cfg.teacher,
        cfg.distill_loss,
        "centred" if cfg.centre_targets else "raw",
        "of every augmented batch" if online else "cached",
        cfg.identity_weight,
        student.name,
    )
    criterion = Distillation(
        torch.from_numpy(np.ascontiguousarray(targets)),
        torch.tensor([s.label for s in samples]),
        cfg.distill_loss,
        identity,
        cfg.identity_weight,
    )
    return criterion, torch.arange(len(samples)), online
