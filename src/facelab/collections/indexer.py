"""Index a folder of photos into a library: every face, its box, landmarks, quality, embedding
and thumbnail, incrementally.

A file is looked at again only when its size or modification time changed, and re-indexed only
when its content hash (sha256) changed; files that vanished from under the folder lose their
faces. Photos go through in batches: a background thread reads, hashes and decodes the next
batch while this one is detected, aligned and embedded, and each batch is committed as one
transaction, so a killed run keeps every finished batch and the next run continues from there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from facelab.collections.library import FileState, IndexedFace, IndexedFile, Library
from facelab.collections.quality import face_quality
from facelab.data.folders import list_images
from facelab.data.images import ImageError, decode_image, read_image_bytes
from facelab.gallery.store import ModelInfo
from facelab.models.detectors.mtcnn import face_order
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import LANDMARK_ALIGNMENTS
from facelab.pipeline import (
    ALIGNED,
    CENTRE_CROP,
    CENTRE_FALLBACK,
    INPUT_MODES,
    NO_FACE_FALLBACKS,
    Located,
    aligned_landmarks,
    alignment_points,
    centred_box,
    centred_landmarks,
    detected_landmarks,
    face_cropper,
    fallback_landmarks,
    locate_faces,
    make_detector,
)

log = logging.getLogger(__name__)

# A photo in which no route finds a face: no faces, its centre crop (pre-cropped sets such as
# LFW), or dlib's shape model on the whole frame (a folder of face crops).
NO_FACE_POLICIES = ("skip", *NO_FACE_FALLBACKS)


@dataclass(frozen=True)
class IndexConfig:
    """batch_size: photos per batch (and per committed transaction); thumbnail: longest side
    in pixels; no_face: where no route finds a face, "skip" (the photo has no faces), "centre"
    (its centre crop, for pre-cropped sets such as LFW) or "whole_frame" (dlib's shape model
    on the whole frame, for a folder of face crops); input: "photo" (find the faces) or
    "aligned" (each image is one aligned face crop, `pipeline.aligned_landmarks`). The detector
    is the model's (`Preprocess.detector`; `api.with_detector` changes it)."""

    batch_size: int = 32
    thumbnail: int = 96
    jpeg_quality: int = 85
    no_face: str = "skip"
    input: str = "photo"

    def __post_init__(self) -> None:
        if self.input not in INPUT_MODES:
            raise ValueError(f"input must be one of {INPUT_MODES}, not {self.input!r}")
        if self.no_face not in NO_FACE_POLICIES:
            raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, not {self.no_face!r}")
        if self.batch_size < 1 or self.thumbnail < 8:
            raise ValueError("batch_size must be >= 1 and thumbnail >= 8")


@dataclass(frozen=True)
class IndexReport:
    library: str
    files_seen: int
    indexed: int  # new or changed files processed now
    unchanged: int
    removed: int
    unreadable: list[str]
    faces: int  # faces stored by this run
    seconds: float
    routes: dict[str, int]  # faces stored by this run, by how each was found (pipeline.ROUTES)
    detector: str | None  # the library's detector (the model's; None: it aligns without one)

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Loaded:
    path: str
    state: FileState | None  # None: the file could not be read at all (not stored)
    image: np.ndarray | None  # None: not a readable image (stored with no faces)


def _state(path: Path) -> FileState:
    st = path.stat()
    return FileState("", st.st_size, st.st_mtime_ns)


def _load(path: str) -> _Loaded:
    """Stat, hash and decode one photo, reading its bytes once."""
    p = Path(path)
    try:  # regular files only, size-capped: a FIFO named .jpg must not hang the run
        state = _state(p)
        data = read_image_bytes(p)
    except (OSError, ImageError) as exc:  # gone or unreadable since the folder was listed
        log.warning("%s: cannot read (%s), skipped", path, exc)
        return _Loaded(path, None, None)
    try:
        image = decode_image(data, path)
    except ImageError as exc:
        log.warning("%s", exc)
        image = None
    sha = hashlib.sha256(data).hexdigest()
    return _Loaded(path, replace(state, sha256=sha), image)


def thumbnail_jpeg(image: np.ndarray, box: Sequence[float], side: int, quality: int) -> bytes:
    """The box grown by 20% each way (clipped to the image), longest side `side`, as JPEG."""
    x1, y1, x2, y2 = box
    mx, my = 0.2 * (x2 - x1), 0.2 * (y2 - y1)
    h, w = image.shape[:2]
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(w, int(np.ceil(x2 + mx))), min(h, int(np.ceil(y2 + my)))
    crop = Image.fromarray(image[top : max(bottom, top + 1), left : max(right, left + 1)])
    crop.thumbnail((side, side))
    out = io.BytesIO()
    crop.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _changed(
    root: Path, library: Library
) -> tuple[list[str], dict[str, FileState], list[str], int]:
    """(paths to read, unchanged-content candidates' states, vanished paths, files seen)."""
    stored = library.file_states()
    # absolute, not resolved: a symbolic link's faces are dropped when the link goes
    on_disk = [os.path.abspath(p) for p in list_images(root)]
    prefix = os.path.abspath(root) + os.sep
    present = set(on_disk)
    vanished = [p for p in stored if p.startswith(prefix) and p not in present]
    todo = []
    for path in on_disk:
        old = stored.get(path)
        new = _state(Path(path))
        if old is None or (old.size, old.mtime_ns) != (new.size, new.mtime_ns):
            todo.append(path)
    return todo, stored, vanished, len(on_disk)


class _Found(NamedTuple):
    """One face of a photo before embedding. landmarks: detector-order five points in image
    pixels (stored; quality reads them); a face no detector boxed has the whole frame (or the
    centre-crop region) as box and score 0."""

    route: str  # facelab.pipeline.ROUTES
    box: tuple[float, ...]
    landmarks: np.ndarray
    score: float

    @property
    def alignment(self) -> np.ndarray | None:
        """What `alignment_points` aligns from: the landmarks, or None for a face assumed to
        fill the centre-crop region (its landmarks are the template's points there)."""
        return None if self.route in (CENTRE_CROP, CENTRE_FALLBACK) else self.landmarks


class _FaceFinder:
    """Find every face of a batch of photos the way `facelab embed` finds one (the pipeline's
    routes: the detector, its retries on the photos where it found nothing, dlib's shape model
    where a face fills the frame), align each with the model's preprocessing, embed them, and
    measure quality and thumbnails."""

    def __init__(self, model: FaceModel, config: IndexConfig) -> None:
        self.dim = model.embedding_dim  # the traced copy cannot be probed for it
        self.model = model.for_inference()
        self.spec = model.preprocess
        self.cropper = face_cropper(self.spec, config.input)
        self.config = config
        self.detector = (
            make_detector(self.spec)
            if self.spec.alignment in LANDMARK_ALIGNMENTS and config.input == "photo"
            else None
        )

    def _centred(self, route: str, image: np.ndarray) -> _Found:
        """A face assumed to fill the centre-crop region: that box and the template's points
        there (stored, and read by the quality); it is aligned as `alignment_points` of None."""
        template = np.zeros((5, 2)) if self.spec.template is None else self.spec.template
        marks = centred_landmarks(np.asarray(template), self.spec.size, image.shape, self.spec.crop)
        return _Found(route, centred_box(image.shape, self.spec.crop), marks, 0.0)

    def _faces(self, image: np.ndarray, located: Located | None, name: str) -> list[_Found]:
        """Each face of one photo, main one first (`face_order`)."""
        h, w = image.shape[:2]
        frame = (0.0, 0.0, float(w), float(h))
        if self.config.input == "aligned":
            marks = aligned_landmarks(image.shape)
            return [_Found(ALIGNED, frame, marks, 0.0)]
        if located is None:  # a centre-crop model: no detector by design
            return [self._centred(CENTRE_CROP, image)]
        det = located.detections
        if len(det):
            faces = []
            for j in face_order(det, image.shape):
                route, marks = detected_landmarks(image, located, j)
                box = tuple(float(v) for v in det.boxes[j])
                faces.append(_Found(route, box, marks, float(det.scores[j])))
            return faces
        if self.config.no_face == "skip":
            return []
        route, marks = fallback_landmarks(image, self.config.no_face, name)
        if marks is None:
            return [self._centred(route, image)]
        return [_Found(route, frame, marks, 0.0)]

    def run(self, loaded: list[_Loaded]) -> list[IndexedFile]:
        images = [item.image for item in loaded if item.image is not None]
        located = (
            locate_faces(self.detector, images)
            if self.detector is not None and images
            else [None] * len(images)
        )
        per_file: list[list[tuple[_Found, np.ndarray, np.ndarray]]] = []  # face, image, crop
        it = iter(zip(images, located, strict=True))
        for item in loaded:
            if item.image is None:
                per_file.append([])
                continue
            image, found_here = next(it)
            found = []
            for face in self._faces(image, found_here, item.path):
                points = (
                    alignment_points(self.spec, image, face.alignment)
                    if self.spec.alignment in LANDMARK_ALIGNMENTS
                    else None
                )
                found.append((face, image, self.cropper.crop_face(image, points)))
            per_file.append(found)
        crops = [crop for found in per_file for _, _, crop in found]
        embeddings = (
            self.model.embed_tensors(self.spec.normalise(np.stack(crops)))
            if crops
            else np.zeros((0, self.dim), np.float32)
        )
        rows = iter(embeddings)
        out = []
        for item, found in zip(loaded, per_file, strict=True):
            faces = [
                IndexedFace(
                    face=number,
                    box=face.box,
                    landmarks=np.asarray(face.landmarks, np.float32),
                    det_score=face.score,
                    source=face.route,
                    quality=face_quality(crop, face.landmarks).as_dict(),
                    embedding=next(rows),
                    thumbnail=thumbnail_jpeg(
                        image, face.box, self.config.thumbnail, self.config.jpeg_quality
                    ),
                )
                for number, (face, image, crop) in enumerate(found)
            ]
            out.append(IndexedFile(item.path, item.state, faces))
        return out


def index_folder(
    library: Library,
    model: FaceModel,
    root: str | Path,
    config: IndexConfig | None = None,
    model_source: str | None = None,
    progress: bool = True,
) -> IndexReport:
    """Bring the library up to date with the photos under `root` (module docstring)."""
    config = config or IndexConfig()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of photos")
    start = time.perf_counter()
    library.bind_model(ModelInfo.of(model), model_source)
    todo, stored, vanished, seen = _changed(root, library)
    if vanished:
        library.remove_files(vanished)
        log.info("%d files gone from %s: their faces dropped", len(vanished), root)
    spec = model.preprocess
    finder = _FaceFinder(model, config) if todo else None
    batches = [todo[s : s + config.batch_size] for s in range(0, len(todo), config.batch_size)]
    indexed = faces = 0
    routes: Counter[str] = Counter()
    same_content: dict[str, FileState] = {}
    unreadable: list[str] = []
    bar = tqdm(total=len(todo), desc="indexing", unit="photo", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = reader.submit(lambda b: [_load(p) for p in b], batches[0]) if batches else None
        for n, _ in enumerate(batches):
            loaded = upcoming.result()
            if n + 1 < len(batches):
                upcoming = reader.submit(lambda b: [_load(p) for p in b], batches[n + 1])
            fresh = []
            for item in loaded:
                if item.state is None:
                    unreadable.append(item.path)
                    continue
                old = stored.get(item.path)
                if old is not None and old.sha256 == item.state.sha256:
                    same_content[item.path] = item.state
                else:
                    fresh.append(item)
                    if item.image is None:
                        unreadable.append(item.path)
            results = finder.run(fresh) if fresh else []
            library.store_files(results)
            indexed += len(results)
            faces += sum(len(r.faces) for r in results)
            routes.update(face.source for r in results for face in r.faces)
            bar.update(len(loaded))
            bar.set_postfix(faces_per_s=f"{faces / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    if same_content:
        library.touch_files(same_content)
    return IndexReport(
        library=library.path,
        files_seen=seen,
        indexed=indexed,
        unchanged=seen - indexed,
        removed=len(vanished),
        unreadable=unreadable,
        faces=faces,
        seconds=time.perf_counter() - start,
        routes=dict(routes.most_common()),
        detector=spec.detector if spec.alignment in LANDMARK_ALIGNMENTS else None,
    )
