"""From decoded faces to network-ready batches, optionally in background loader processes.

Faces are decoded (and aligned) once into a uint8 array, memory-mapped when cached
(`facelab.data.faces.load_faces`); an epoch then only indexes that array, augments whole
batches in torch and normalises them. `loader_workers > 0` moves that work into DataLoader
worker processes that prepare the next batches while the model trains on the current one.
Their augmentation seeds derive from the training RNG, so runs stay reproducible and resumable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facelab.data.augment import Augment
from facelab.data.faces import load_faces
from facelab.models.preprocess import LANDMARK_ALIGNMENTS, Preprocess
from facelab.pipeline import (
    FACE_SELECTION,
    alignment_points,
    main_face_landmarks,
    make_detector,
)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class FaceBatches(Dataset[Batch]):
    """Item `idx` (a tensor of sample indices) is the batch (normalised inputs, labels)."""

    def __init__(
        self, faces: np.ndarray, labels: torch.Tensor, spec: Preprocess, augment: Augment
    ) -> None:
        self.faces = faces
        self.labels = labels
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        batch = self.augment(torch.from_numpy(np.ascontiguousarray(self.faces[idx.numpy()])))
        return self.spec.normalise(batch), self.labels[idx]


def batch_loader(
    batches: FaceBatches, plan: Sequence[torch.Tensor], workers: int, pin_memory: bool = False
) -> Iterable[Batch]:
    """Iterate the batches `plan` lists, prepared `workers` processes ahead (0: in this one)."""
    return DataLoader(
        batches,
        sampler=plan,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


class _Aligner:
    """Landmark alignment on the main face (`face_order`) the preprocessing's detector finds,
    with the pipeline's fallback (the centre-crop region) where none is found; counts the
    fallbacks."""

    def __init__(self, spec: Preprocess) -> None:
        self.spec = spec
        self.fallbacks = 0
        self._detector: Any = None  # built on first use: only when the face cache misses
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._detector is None:
                self._detector = make_detector(self.spec)
        found = main_face_landmarks(self._detector.detect([image])[0], image.shape)
        if found is None:
            with self._lock:
                self.fallbacks += 1
        return self.spec.crop_face(image, alignment_points(self.spec, image, found))


def decode_faces(
    paths: Sequence[Path], spec: Preprocess, cache_dir: str | Path | None, workers: int
) -> np.ndarray:
    """uint8 (N, S, S, 3) faces as `spec` crops them; for five-point models the landmarks are
    detected once, while the cache is built."""
    if spec.alignment not in LANDMARK_ALIGNMENTS:
        return load_faces(paths, spec.crop_face, spec.size, spec.fingerprint(), cache_dir, workers)
    aligner = _Aligner(spec)
    key = f"{spec.fingerprint()}|{FACE_SELECTION}"
    faces = load_faces(paths, aligner, spec.size, key, cache_dir, workers)
    if aligner.fallbacks:
        log.info(
            "no face detected in %d of %d images: used the centre crop",
            aligner.fallbacks,
            len(paths),
        )
    return faces
