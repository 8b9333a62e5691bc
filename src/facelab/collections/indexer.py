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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from facelab.collections.library import FileState, IndexedFace, IndexedFile, Library
from facelab.collections.quality import face_quality
from facelab.data.folders import list_images
from facelab.data.images import ImageError, decode_image, read_image_bytes
from facelab.gallery.store import ModelInfo
from facelab.models.detectors.mtcnn import Detections, face_order
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import LANDMARK_ALIGNMENTS
from facelab.models.registry import DETECTORS
from facelab.pipeline import alignment_points, centred_box, centred_landmarks

log = logging.getLogger(__name__)

NO_FACE_POLICIES = ("skip", "centre")
CENTRE_SOURCE = "centre-crop"  # the `source` of a face assumed to fill the centre crop


@dataclass(frozen=True)
class IndexConfig:
    """batch_size: photos per batch (and per committed transaction); thumbnail: longest side
    in pixels; no_face: "skip" (a photo without a detected face has no faces) or "centre" (take
    the centre crop as its face, for pre-cropped sets such as LFW)."""

    batch_size: int = 32
    thumbnail: int = 96
    jpeg_quality: int = 85
    no_face: str = "skip"
    detector: str = "mtcnn"

    def __post_init__(self) -> None:
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
    return _Loaded(path, FileState(sha, state.size, state.mtime_ns), image)


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


class _FaceFinder:
    """Detect every face of a batch of photos, align each with the model's preprocessing,
    embed them, and measure quality and thumbnails."""

    def __init__(self, model: FaceModel, config: IndexConfig) -> None:
        self.dim = model.embedding_dim  # the traced copy cannot be probed for it
        self.model = model.for_inference()
        self.spec = model.preprocess
        self.config = config
        self.detector = (
            DETECTORS.create(config.detector)
            if self.spec.alignment in LANDMARK_ALIGNMENTS
            else None
        )

    def _candidates(
        self, image: np.ndarray, det: Detections | None
    ) -> list[tuple[tuple[float, ...], np.ndarray, float, str]]:
        """(box, landmarks, detection score, source) of each face of one photo, main one first."""
        if det is not None and len(det):
            return [
                (
                    tuple(float(v) for v in det.boxes[j]),
                    det.landmarks[j],
                    float(det.scores[j]),
                    self.config.detector,
                )
                for j in face_order(det, image.shape)
            ]
        if self.config.no_face == "skip" and det is not None:
            return []
        marks = centred_landmarks(
            np.asarray(self.spec.template) if self.spec.template is not None else np.zeros((5, 2)),
            self.spec.size,
            image.shape,
            self.spec.crop,
        )
        return [
            (
                tuple(float(v) for v in centred_box(image.shape, self.spec.crop)),
                marks,
                0.0,
                CENTRE_SOURCE,
            )
        ]

    def run(self, loaded: list[_Loaded]) -> list[IndexedFile]:
        images = [item.image for item in loaded if item.image is not None]
        detections = (
            self.detector.detect(images)
            if self.detector is not None and images
            else [None] * len(images)
        )
        per_file: list[list[tuple]] = []
        crops: list[np.ndarray] = []
        it = iter(zip(images, detections, strict=True))
        for item in loaded:
            if item.image is None:
                per_file.append([])
                continue
            image, det = next(it)
            found = []
            for box, marks, score, source in self._candidates(image, det):
                points = (
                    alignment_points(self.spec, image, None if source == CENTRE_SOURCE else marks)
                    if self.spec.alignment in LANDMARK_ALIGNMENTS
                    else None
                )
                crop = self.spec.crop_face(image, points)
                crops.append(crop)
                found.append((box, marks, score, source, crop, image))
            per_file.append(found)
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
                    box=box,
                    landmarks=np.asarray(marks, np.float32),
                    det_score=score,
                    source=source,
                    quality=face_quality(crop, marks).as_dict(),
                    embedding=next(rows),
                    thumbnail=thumbnail_jpeg(
                        image, box, self.config.thumbnail, self.config.jpeg_quality
                    ),
                )
                for number, (box, marks, score, source, crop, image) in enumerate(found)
            ]
            out.append(
                IndexedFile(
                    item.path, item.state.sha256, item.state.size, item.state.mtime_ns, faces
                )
            )
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
    finder = _FaceFinder(model, config) if todo else None
    batches = [todo[s : s + config.batch_size] for s in range(0, len(todo), config.batch_size)]
    indexed = faces = 0
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
    )
