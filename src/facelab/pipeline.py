"""Image files -> aligned faces -> embeddings, with the model's own preprocessing.

Models aligned by a centre crop need no detector. Models aligned by five landmarks
(`Preprocess.alignment == "five_point"`) get them from a face detector (MTCNN by default);
models aligned by dlib's chip ("dlib_chip") get them from dlib's 5-point shape model, run on
the rectangle dlib's own detector would give, mapped from the detector's landmarks.

Users bring photos, but also tight crops (the face fills the frame), thumbnails and dark or
grey faces, on which a detector trained on photos often finds nothing. `locate_faces` then
tries, in order (the order measured best by benchmarks/tight_crops.py, see docs/inputs.md):
the image upsampled if it is small, the image padded so the face has context around it, and
at last dlib's 5-point shape model on the whole frame, as dlib does with crops; that model
also places the points of a detected face whose box is as large as the frame (`fills_frame`:
the frame cuts the face). Each
embedding records the route that produced it (`ROUTES`); the old assumption of LFW's
geometry (the centre-crop region holds the face) is only used when asked for
(`no_face="centre"`) and is logged naming each file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from facelab.data.align import ARCFACE_TEMPLATE_112, dlib_chip_points, similarity_transform
from facelab.data.images import ImageError, check_image_array, read_image
from facelab.models.backbones.dlib_resnet import DLIB_RESNET_TEMPLATE
from facelab.models.detectors.dlib_landmarks import dlib_box_from_mtcnn, shape_predictor_5
from facelab.models.detectors.mtcnn import MIN_FACE_SIZE, Detections, main_face
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import DLIB_CHIP_PADDING, LANDMARK_ALIGNMENTS, Preprocess
from facelab.models.registry import DETECTORS

log = logging.getLogger(__name__)

# How each embedding's face was found (`Embedded.routes`, CLI output, .npz, server replies).
DETECTED = "detected"  # the detector found it in the image as given
UPSAMPLED = "upsampled"  # ... in the image enlarged (a small image: a thumbnail)
PADDED = "padded"  # ... in the image padded (and enlarged if small): a tight crop
WHOLE_FRAME = "whole_frame"  # dlib's 5-point model on the whole frame: none found, or it fills it
ALIGNED = "aligned"  # input="aligned": taken as an aligned crop, nothing detected
CENTRE_CROP = "centre_crop"  # the model aligns by a centre crop (no detector by design)
CENTRE_FALLBACK = "centre_fallback"  # no detection, no_face="centre": LFW's geometry assumed
ROUTES = (DETECTED, UPSAMPLED, PADDED, WHOLE_FRAME, ALIGNED, CENTRE_CROP, CENTRE_FALLBACK)

# input="photo": find the face; "aligned": the image is an already aligned face crop laid out
# like insightface's 112x112 ArcFace crops (any size: the template is scaled to the image).
INPUT_MODES = ("photo", "aligned")
# What to do when no detection route finds a face (landmark-aligned models).
NO_FACE_FALLBACKS = ("whole_frame", "centre")


@dataclass(frozen=True)
class FaceSearch:
    """The detection retries for an image in which the detector found no face.

    upsample_to: an image whose shorter side is below this is enlarged (bicubic) to it, so a
    face filling a thumbnail reaches the detector's smallest face (MTCNN: 40 px) with room
    to spare; pad: border added on each side, as a fraction of the (enlarged) image's side,
    so a face that fills the frame gets the context a detector trained on photos expects;
    pad_mode: "edge" (replicate the border pixels) or "constant" (mid grey); padded_side: the
    padded view is reduced so its longer side is at most this: padding helps only a face that
    fills the frame, which stays hundreds of pixels wide there, while a large photo padded at
    full size costs the detector many times the photo itself (measured in docs/collections.md).
    """

    upsample_to: int = 3 * MIN_FACE_SIZE
    pad: float = 0.5
    pad_mode: str = "constant"
    padded_side: int = 640

    def __post_init__(self) -> None:
        if self.pad_mode not in ("edge", "constant"):
            raise ValueError(f"pad_mode must be 'edge' or 'constant', not {self.pad_mode!r}")
        if self.pad < 0 or self.upsample_to < 0:
            raise ValueError("pad and upsample_to must not be negative")
        if self.padded_side < 2 * MIN_FACE_SIZE:
            raise ValueError(f"padded_side must be at least {2 * MIN_FACE_SIZE}")


@dataclass
class Embedded:
    """Embeddings of a list of images, row i for path i; `routes[i]` says how image i's face
    was found (one of `ROUTES`); `seconds` holds the time spent waiting for decoded images,
    detecting, aligning and embedding; `skipped` the unreadable files left out (with
    `skip_bad`), in order."""

    paths: list[Path | np.ndarray]
    embeddings: np.ndarray
    routes: np.ndarray
    seconds: dict[str, float]
    skipped: list[Path] = field(default_factory=list)

    def route_counts(self) -> dict[str, int]:
        """How many faces each route produced, most common first."""
        return dict(Counter(self.routes.tolist()).most_common())


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


def whole_frame_landmarks(image: np.ndarray) -> np.ndarray:
    """Detector-order five points (eyes, nose, mouth corners) of a face that fills the frame:
    dlib's 5-point shape model on the whole image rectangle (what dlib users do with crops),
    its eye corners and nose base carried to MTCNN's points through dlib's chip, where
    DLIB_RESNET_TEMPLATE records where MTCNN's points fall (median over LFW faces).

    The shape model compares pixel differences with fixed thresholds, so it reads a
    histogram-equalised copy: dark, low-contrast and side-lit faces then look like the
    photos it was trained on (measured in docs/inputs.md; the network still sees the image)."""
    h, w = image.shape[:2]
    equalised = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    parts = shape_predictor_5().predict(equalised, (0, 0, w - 1, h - 1))
    chip_to_image = similarity_transform(dlib_chip_points(150, DLIB_CHIP_PADDING), parts)
    template = np.asarray(DLIB_RESNET_TEMPLATE)
    return template @ chip_to_image[:, :2].T + chip_to_image[:, 2]


def aligned_landmarks(shape: tuple[int, ...]) -> np.ndarray:
    """Detector-order five points of an aligned crop: insightface's ArcFace template scaled
    from 112x112 to the image."""
    h, w = shape[:2]
    return np.asarray(ARCFACE_TEMPLATE_112) * np.array([w / 112, h / 112])


def _search_views(
    image: np.ndarray, search: FaceSearch
) -> list[tuple[str, np.ndarray, float, float]]:
    """The retries of one image: (route, image to detect on, scale, offset) such that a point
    p of the retried image is (p - offset) / scale in the original."""
    views = []
    picture = Image.fromarray(image)
    h, w = image.shape[:2]
    scale = 1.0
    if min(h, w) < search.upsample_to:
        scale = search.upsample_to / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        picture = picture.resize(size, Image.BICUBIC)
        views.append((UPSAMPLED, np.asarray(picture), scale, 0.0))
    if search.pad > 0:
        shrink = search.padded_side / ((1 + 2 * search.pad) * max(picture.size))
        if shrink < 1:
            size = (max(1, round(picture.width * shrink)), max(1, round(picture.height * shrink)))
            picture = picture.resize(size, Image.BILINEAR, reducing_gap=2.0)
            scale *= shrink
        border = round(search.pad * max(picture.size))
        if search.pad_mode == "edge":
            array = np.asarray(picture)
            padded = np.pad(array, ((border, border), (border, border), (0, 0)), mode="edge")
        else:
            padded = np.asarray(ImageOps.expand(picture, border, fill=(127, 127, 127)))
        views.append((PADDED, padded, scale, float(border)))
    return views


def _to_original(det: Detections, scale: float, offset: float) -> Detections:
    return Detections(
        ((det.boxes - offset) / scale).astype(np.float32),
        det.scores,
        ((det.landmarks - offset) / scale).astype(np.float32),
    )


@dataclass(frozen=True)
class Located:
    """The faces found in one image and the route that found them (empty: none found)."""

    route: str
    detections: Detections


def locate_faces(
    detector: object, images: Sequence[np.ndarray], search: FaceSearch | None = None
) -> list[Located]:
    """Detect faces in each image; where none is found, retry on the views `search` makes
    (enlarged, padded) and map what they find back to the image's pixels."""
    search = search or FaceSearch()
    found = [Located(DETECTED, det) for det in detector.detect(images)]
    pending = [i for i, loc in enumerate(found) if len(loc.detections) == 0]
    views = {i: _search_views(images[i], search) for i in pending}
    for step in range(max((len(v) for v in views.values()), default=0)):
        tries = [(i, views[i][step]) for i in pending if step < len(views[i])]
        if not tries:
            break
        results = detector.detect([view for _, (_, view, _, _) in tries])
        for (i, (route, _, scale, offset)), det in zip(tries, results, strict=True):
            if len(det):
                found[i] = Located(route, _to_original(det, scale, offset))
        pending = [i for i in pending if len(found[i].detections) == 0]
    return found


def fills_frame(box: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether a detector box (x1, y1, x2, y2) is at least as large as the image: the frame
    cuts the face, as in a tight crop."""
    return max(box[2] - box[0], box[3] - box[1]) >= max(shape[:2])


def detected_landmarks(image: np.ndarray, located: Located, index: int) -> tuple[str, np.ndarray]:
    """(route, detector-order five points) of detected face `index`. A face that fills the
    frame takes its points from dlib's shape model run on the whole frame (dlib's convention
    for crops): a detector trained on photos places points worse on a face the frame cuts
    (measured in docs/inputs.md)."""
    if fills_frame(located.detections.boxes[index], image.shape):
        return WHOLE_FRAME, whole_frame_landmarks(image)
    return located.route, located.detections.landmarks[index]


def detected_points(
    spec: Preprocess, image: np.ndarray, located: Located, index: int
) -> tuple[str, np.ndarray]:
    """(route, alignment points) of detected face `index` (`detected_landmarks`)."""
    route, landmarks = detected_landmarks(image, located, index)
    return route, alignment_points(spec, image, landmarks)


def fallback_landmarks(image: np.ndarray, no_face: str, name: str) -> tuple[str, np.ndarray | None]:
    """(route, detector-order five points) where no route found a face: dlib's shape model on
    the whole frame, or (no_face="centre", logged naming the image) None for LFW's centre
    geometry (`alignment_points` of None)."""
    if no_face == "centre":
        log.warning("%s: no face found, assumed centred (route %s)", name, CENTRE_FALLBACK)
        return CENTRE_FALLBACK, None
    return WHOLE_FRAME, whole_frame_landmarks(image)


def face_points(
    spec: Preprocess, image: np.ndarray, located: Located, no_face: str, name: str
) -> tuple[str, np.ndarray]:
    """(route, alignment points) of the image's main face, with the no-face fallback where
    nothing was found: dlib's shape model on the whole frame, or LFW's centre geometry."""
    index = main_face(located.detections, image.shape)
    if index is not None:
        return detected_points(spec, image, located, index)
    route, landmarks = fallback_landmarks(image, no_face, name)
    return route, alignment_points(spec, image, landmarks)


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


def image_name(item: ImageLike, index: int) -> str:
    """How an input is named in messages: its path, or "<array N>" for an in-memory image."""
    return f"<array {index}>" if isinstance(item, np.ndarray) else str(item)


def load_image(item: ImageLike, index: int = 0) -> np.ndarray:
    """A path read (`read_image`) or an array checked (`check_image_array`): RGB uint8,
    each side at least MIN_IMAGE_SIDE, else ImageError naming the input."""
    if isinstance(item, np.ndarray):
        return check_image_array(item, image_name(item, index))
    return read_image(item)


def _read_all(
    batch: Sequence[ImageLike], start: int, skip_bad: bool = False
) -> list[np.ndarray | None]:
    """The decoded images; with `skip_bad` an unreadable file is logged and read as None."""
    images: list[np.ndarray | None] = []
    for i, item in enumerate(batch):
        try:
            images.append(load_image(item, start + i))
        except ImageError as exc:
            if not skip_bad:
                raise
            log.warning("skipped: %s", exc)
            images.append(None)
    return images


def check_options(input: str, no_face: str) -> None:
    if input not in INPUT_MODES:
        raise ValueError(f"input must be one of {INPUT_MODES}, not {input!r}")
    if no_face not in NO_FACE_FALLBACKS:
        raise ValueError(f"no_face must be one of {NO_FACE_FALLBACKS}, not {no_face!r}")


def face_cropper(spec: Preprocess, input: str) -> Preprocess:
    """The preprocessing that cuts the faces of `input` images: the model's own, except that a
    centre-crop model keeps all of an aligned crop (the crop is the face)."""
    if input == "aligned" and spec.alignment not in LANDMARK_ALIGNMENTS:
        return replace(spec, crop=1.0)
    return spec


def _points_of_batch(
    spec: Preprocess,
    images: list[np.ndarray],
    names: list[str],
    aligner: object | None,
    input: str,
    no_face: str,
    search: FaceSearch | None,
) -> tuple[list[str], list[np.ndarray | None]]:
    """Route and alignment points of each image of a batch (None: the model's centre crop)."""
    if input == "aligned":
        if spec.alignment not in LANDMARK_ALIGNMENTS:
            return [ALIGNED] * len(images), [None] * len(images)
        return [ALIGNED] * len(images), [
            alignment_points(spec, image, aligned_landmarks(image.shape)) for image in images
        ]
    if aligner is None:
        return [CENTRE_CROP] * len(images), [None] * len(images)
    picked = [
        face_points(spec, image, located, no_face, name)
        for image, located, name in zip(
            images, locate_faces(aligner, images, search), names, strict=True
        )
    ]
    return [route for route, _ in picked], [points for _, points in picked]


def embed_images(
    model: FaceModel,
    items: Sequence[ImageLike],
    flip: bool = False,
    batch_size: int = 64,
    detector: str | object | None = None,
    workers: int = 2,
    progress: bool = True,
    input: str = "photo",
    no_face: str = "whole_frame",
    search: FaceSearch | None = None,
    skip_bad: bool = False,
) -> Embedded:
    """Embed each image (file path or RGB uint8 array; its main face, `face_order`) with the model's
    stored preprocessing. A background thread decodes the next batch while this one is
    detected, aligned and embedded; `Embedded.seconds` says where the time went.

    detector: a registered name or a detector object (default: the one the preprocessing
    names); input: "photo" (find the face: `locate_faces`) or "aligned" (`aligned_landmarks`);
    no_face: where no route finds a face, "whole_frame" (dlib's shape model on the whole
    image) or "centre" (LFW's geometry); `search`: the detection retries (`FaceSearch`).
    An unreadable file raises ImageError naming it, or with `skip_bad` is left out of the
    result (listed in `Embedded.skipped`)."""
    check_options(input, no_face)
    paths = [item if isinstance(item, np.ndarray) else Path(item) for item in items]
    spec = model.preprocess
    aligner = None
    if spec.alignment in LANDMARK_ALIGNMENTS and input == "photo":
        aligner = make_detector(spec, detector)
    cropper = face_cropper(spec, input)
    batches = [paths[s : s + batch_size] for s in range(0, len(paths), batch_size)]
    seconds = dict.fromkeys(("read", "detect", "align", "embed"), 0.0)
    chunks = []
    routes = np.empty(len(paths), dtype=object)
    kept: list[int] = []  # the rows of `paths` embedded
    bar = tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress)
    with (
        ThreadPoolExecutor(max_workers=1) as loader,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        upcoming = loader.submit(_read_all, batches[0], 0, skip_bad) if batches else None
        for n, batch in enumerate(batches):
            tick = time.perf_counter()
            images = upcoming.result()
            if n + 1 < len(batches):
                upcoming = loader.submit(_read_all, batches[n + 1], (n + 1) * batch_size, skip_bad)
            seconds["read"] += time.perf_counter() - tick
            start = n * batch_size
            rows = [start + i for i, image in enumerate(images) if image is not None]
            images = [image for image in images if image is not None]
            kept += rows
            bar.update(len(batch))
            if not images:
                continue
            tick = time.perf_counter()
            names = [image_name(paths[row], row) for row in rows]
            batch_routes, marks = _points_of_batch(
                spec, images, names, aligner, input, no_face, search
            )
            routes[rows] = batch_routes
            seconds["detect"] += time.perf_counter() - tick
            tick = time.perf_counter()
            faces = list(pool.map(cropper.crop_face, images, marks))
            inputs = spec.normalise(np.stack(faces))
            seconds["align"] += time.perf_counter() - tick
            tick = time.perf_counter()
            chunks.append(model.embed_tensors(inputs, flip=flip, batch_size=batch_size))
            seconds["embed"] += time.perf_counter() - tick
            bar.set_postfix(faces_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    dim = chunks[0].shape[1] if chunks else model.embedding_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    skipped = sorted(set(range(len(paths))) - set(kept))
    result = Embedded(
        [paths[i] for i in kept],
        embeddings,
        routes[kept].astype(str),
        seconds,
        [paths[i] for i in skipped],
    )
    if kept and result.route_counts().get(DETECTED, 0) < len(kept):
        log.info("faces found by route: %s", result.route_counts())
    return result
