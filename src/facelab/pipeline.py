"""Image files -> aligned faces -> embeddings, with the model's own preprocessing.

Models aligned by a centre crop need no detector. Models aligned by five landmarks
(`Preprocess.alignment == "five_point"`) get them from a face detector (MTCNN by default);
models aligned by dlib's chip ("dlib_chip") get them from dlib's 5-point shape model, run on
the rectangle dlib's own detector would give, mapped from the detector's landmarks. When the
detector finds no face the centre-crop region is assumed to hold it (the policy for
pre-cropped data sets such as LFW) and the image is counted in `Embedded.fallback`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facelab.data.images import ImageError, read_image
from facelab.models.detectors.dlib_landmarks import dlib_box_from_mtcnn, shape_predictor_5
from facelab.models.detectors.mtcnn import MIN_FACE_SIZE, Detections, main_face
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import LANDMARK_ALIGNMENTS, Preprocess
from facelab.models.registry import DETECTORS

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """Embeddings of a list of images, row i for path i; `fallback[i]` is True where no face
    was detected and the centre-crop assumption was used; `seconds` holds the time spent
    waiting for decoded images, detecting, aligning and embedding; `skipped` the unreadable
    files left out (with `skip_bad`), in order."""

    paths: list[Path | np.ndarray]
    embeddings: np.ndarray
    fallback: np.ndarray
    seconds: dict[str, float]
    skipped: list[Path] = field(default_factory=list)


def centred_landmarks(
    template: np.ndarray, size: int, shape: tuple[int, ...], crop: float
) -> np.ndarray:
    """Where the template's landmarks fall if the face fills the image's centre-crop region."""
    h, w = shape[:2]
    side = min(h, w) * crop
    return template * (side / size) + np.array([(w - side) / 2, (h - side) / 2])


def centred_box(shape: tuple[int, ...], crop: float) -> tuple[float, float, float, float]:
    """The centre-crop region as a (left, top, right, bottom) rectangle, whole pixels."""
    h, w = shape[:2]
    side = min(h, w) * crop
    left, top = round((w - side) / 2), round((h - side) / 2)
    return left, top, left + round(side), top + round(side)


def alignment_points(
    spec: Preprocess, image: np.ndarray, landmarks: np.ndarray | None
) -> np.ndarray:
    """The points `spec.crop_face` aligns on, from the detector's landmarks of one face (None
    where it found none: the face is assumed to fill the centre-crop region).

    five_point: the landmarks themselves. dlib_chip: dlib's 5-point shape model run on the
    rectangle dlib's detector would give.
    """
    if spec.alignment == "dlib_chip":
        if landmarks is None:
            box = centred_box(image.shape, spec.crop)
        else:
            box = dlib_box_from_mtcnn(landmarks)
        return shape_predictor_5().predict(image, box)
    if landmarks is None:
        return centred_landmarks(np.asarray(spec.template), spec.size, image.shape, spec.crop)
    return landmarks


# Names the default detector and face-selection rule in cache keys: faces cached under
# another detector setting or rule are not reused.
FACE_SELECTION = f"mtcnn-min{MIN_FACE_SIZE}-main-face"


def main_face_landmarks(detections: Detections, shape: tuple[int, ...]) -> np.ndarray | None:
    """Landmarks (5, 2) of the photo's subject (`face_order`: large and central), or None."""
    index = main_face(detections, shape)
    return None if index is None else detections.landmarks[index]


ImageLike = str | Path | np.ndarray


def make_detector(spec: Preprocess, detector: str | object | None = None) -> object:
    """`detector` as an object: built by name, or the one `spec` names when None."""
    if detector is None:
        detector = spec.detector
    return DETECTORS.create(detector) if isinstance(detector, str) else detector


def _as_image(item: ImageLike) -> np.ndarray:
    return item if isinstance(item, np.ndarray) else read_image(item)


def _read_all(batch: Sequence[ImageLike], skip_bad: bool = False) -> list[np.ndarray | None]:
    """The decoded images; with `skip_bad` an unreadable file is logged and read as None."""
    images: list[np.ndarray | None] = []
    for item in batch:
        try:
            images.append(_as_image(item))
        except ImageError as exc:
            if not skip_bad:
                raise
            log.warning("skipped: %s", exc)
            images.append(None)
    return images


def embed_images(
    model: FaceModel,
    items: Sequence[ImageLike],
    flip: bool = False,
    batch_size: int = 64,
    detector: str | object | None = None,
    workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
) -> Embedded:
    """Embed each image (file path or RGB uint8 array; its main face, `face_order`) with the model's
    stored preprocessing. A background thread decodes the next batch while this one is
    detected, aligned and embedded; `Embedded.seconds` says where the time went. `detector`:
    a registered name or a detector object; default: the one the preprocessing names.

    An unreadable file raises ImageError naming it, or with `skip_bad` is left out of the
    result (listed in `Embedded.skipped`)."""
    paths = [item if isinstance(item, np.ndarray) else Path(item) for item in items]
    spec = model.preprocess
    aligner = None
    if spec.alignment in LANDMARK_ALIGNMENTS:
        aligner = make_detector(spec, detector)
    batches = [paths[s : s + batch_size] for s in range(0, len(paths), batch_size)]
    seconds = dict.fromkeys(("read", "detect", "align", "embed"), 0.0)
    chunks = []
    fallback = np.zeros(len(paths), dtype=bool)
    kept: list[int] = []  # the rows of `paths` embedded
    bar = tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress)
    with (
        ThreadPoolExecutor(max_workers=1) as loader,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        upcoming = loader.submit(_read_all, batches[0], skip_bad) if batches else None
        for n, batch in enumerate(batches):
            tick = time.perf_counter()
            images = upcoming.result()
            if n + 1 < len(batches):
                upcoming = loader.submit(_read_all, batches[n + 1], skip_bad)
            seconds["read"] += time.perf_counter() - tick
            rows = [n * batch_size + i for i, image in enumerate(images) if image is not None]
            images = [image for image in images if image is not None]
            kept += rows
            bar.update(len(batch))
            if not images:
                continue
            marks: list[np.ndarray | None] = [None] * len(images)
            if aligner is not None:
                tick = time.perf_counter()
                for i, det in enumerate(aligner.detect(images)):
                    found = main_face_landmarks(det, images[i].shape)
                    fallback[rows[i]] = found is None
                    marks[i] = alignment_points(spec, images[i], found)
                seconds["detect"] += time.perf_counter() - tick
            tick = time.perf_counter()
            faces = list(pool.map(spec.crop_face, images, marks))
            inputs = spec.normalise(np.stack(faces))
            seconds["align"] += time.perf_counter() - tick
            tick = time.perf_counter()
            chunks.append(model.embed_tensors(inputs, flip=flip, batch_size=batch_size))
            seconds["embed"] += time.perf_counter() - tick
            bar.set_postfix(faces_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    if fallback.any():
        log.info(
            "no face detected in %d of %d images: used the centre crop", fallback.sum(), len(paths)
        )
    dim = chunks[0].shape[1] if chunks else model.embedding_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    skipped = sorted(set(range(len(paths))) - set(kept))
    return Embedded(
        [paths[i] for i in kept], embeddings, fallback[kept], seconds, [paths[i] for i in skipped]
    )
