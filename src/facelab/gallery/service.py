"""Galleries at work: enroll people, check 1:1 claims, identify 1:N (open set), map unknown
faces onto known identities, calibrate thresholds, and evaluate identification on LFW.

Face policy (one place, used by every function here):

- models aligned on landmarks (five_point, dlib_chip) find faces with the detector their
  preprocessing names (MTCNN by default); models aligned by a centre crop were trained on
  pre-cropped faces, so each image is taken as one face;
- several faces in an image: the photo's subject is used, the largest face after a penalty for
  distance from the image centre (`face_order`, insightface's rule); `all_faces=True` uses each,
  numbered 0, 1, ... in that order;
- no face found, even after the detector's retries on the image enlarged and padded
  (`facelab.pipeline.locate_faces`): ``no_face="error"`` (default for enroll, verify_claim and
  identify: a clear error naming the file, nothing stored), ``"skip"`` (leave the image out,
  logged), ``"whole_frame"`` (the image is a face crop: dlib's 5-point model on the whole
  frame), or ``"centre"`` (assume the face fills the centre crop, as in pre-cropped data sets;
  default for calibrate, map_unknown and eval_identification, whose every image must get a
  score; logged naming the file).
- each `Face` records its route (`facelab.pipeline.ROUTES`): how it was found.

Decisions never use an unstated threshold: either the caller gives one, or it is read from
the gallery where `calibrate` stored it with its target FAR and measured FAR/FRR, or, for a
gallery not calibrated for the FAR asked (default 1e-3), it is the model's own operating point
(`FaceModel.operating_points`); each decision carries the `Threshold` it was made with. A
calibrated threshold is a 1:1 (verification) threshold; in 1:N identification against N
identities a non-enrolled face is falsely accepted more often (up to about N times the 1:1
FAR), which `eval_identification` measures on LFW.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facelab.data.folders import IMAGE_SUFFIXES, IdentityFolder
from facelab.data.images import check_image_array, decode_image, read_image_bytes
from facelab.data.layout import read_labels
from facelab.data.trials import read_trials
from facelab.eval.identification import (
    detection_identification_rate,
    dir_far_curve,
    rank_k_accuracy,
)
from facelab.eval.metrics import finite, threshold_at_far
from facelab.fileio import atomic_write_csv, atomic_write_text
from facelab.gallery.backends import gallery_exists, open_store
from facelab.gallery.postgres import redact
from facelab.gallery.search import GallerySearch, Match, check_k, identity_rows
from facelab.gallery.store import (
    MEMORY,
    UNKNOWN,
    EnrolledFace,
    GalleryConflict,
    GalleryError,
    GalleryStore,
    ModelInfo,
    Threshold,
    calibrated_for,
    identity_name,
)
from facelab.models.detectors.mtcnn import face_order
from facelab.models.face_model import FaceModel
from facelab.models.operating_points import DEFAULT_FAR, point_at
from facelab.models.preprocess import LANDMARK_ALIGNMENTS
from facelab.pipeline import (
    CENTRE_CROP,
    DETECTED,
    ImageLike,
    detected_points,
    face_points,
    image_name,
    locate_faces,
    make_detector,
)

log = logging.getLogger(__name__)

NO_FACE_POLICIES = ("error", "skip", "whole_frame", "centre")
MAPPING_COLUMNS = ("image", "identity")  # the header of `facelab map`'s CSV
GalleryLike = GalleryStore | str | Path


# -- faces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    """One face found in input `item` (its index in the list given), embedded."""

    item: int
    image: str  # file path, or "<array N>" for an in-memory image
    sha256: str
    face: int  # 0 = the image's main face (`face_order`), 1 = the next, ...
    box: tuple[float, float, float, float] | None  # None: the centre crop taken as the face
    embedding: np.ndarray
    route: str = DETECTED  # how the face was found (facelab.pipeline.ROUTES)


def array_sha256(image: np.ndarray) -> str:
    """The sha256 a gallery row stores for an image enrolled as an array (its pixels)."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def _load(item: ImageLike, index: int) -> tuple[str, str, np.ndarray]:
    """(name, content sha256, RGB image); a missing or corrupt file raises ImageError."""
    name = image_name(item, index)
    if isinstance(item, np.ndarray):
        image = check_image_array(item, name)
        return name, array_sha256(image), image
    data = read_image_bytes(item)
    return name, hashlib.sha256(data).hexdigest(), decode_image(data, name)


def find_faces(
    model: FaceModel,
    items: Sequence[ImageLike],
    all_faces: bool = False,
    no_face: str = "error",
    detector: str | object | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Face]:
    """Read, detect, align and embed the faces the policy keeps (module docstring), in input
    order, with the model's own preprocessing."""
    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, not {no_face!r}")
    spec = model.preprocess
    aligner = None
    if spec.alignment in LANDMARK_ALIGNMENTS:
        aligner = make_detector(spec, detector)
    faces: list[Face] = []
    bar = tqdm(total=len(items), desc="faces", unit="img", disable=not progress)
    for start in range(0, len(items), batch_size):
        loaded = [
            _load(item, start + i) for i, item in enumerate(items[start : start + batch_size])
        ]
        images = [image for _, _, image in loaded]
        located = locate_faces(aligner, images) if aligner is not None else [None] * len(images)
        chosen = []  # (item, face number, box, landmarks, route)
        for i, ((name, _, image), found) in enumerate(zip(loaded, located, strict=True)):
            if found is None:
                chosen.append((i, 0, None, None, CENTRE_CROP))
            elif len(found.detections) == 0:
                if no_face == "error":
                    raise GalleryError(
                        f"{name}: no face found (use no_face='skip' to leave such images out, "
                        f"'whole_frame' for a face crop, or 'centre' to assume a centred face)"
                    )
                if no_face == "skip":
                    log.warning("%s: no face found, skipped", name)
                    continue
                route, points = face_points(spec, image, found, no_face, name)
                chosen.append((i, 0, None, points, route))
            else:
                det = found.detections
                order = face_order(det, image.shape)
                if not all_faces:
                    if len(order) > 1:
                        log.debug("%s: %d faces, using the main one", name, len(order))
                    order = order[:1]
                for number, j in enumerate(order):
                    box = tuple(float(v) for v in det.boxes[j])
                    route, points = detected_points(spec, image, found, j)
                    chosen.append((i, number, box, points, route))
        if chosen:
            embeddings = model.embed_faces(
                [images[c[0]] for c in chosen], [c[3] for c in chosen], batch_size=batch_size
            )
            for (i, number, box, _, route), emb in zip(chosen, embeddings, strict=True):
                name, sha, _ = loaded[i]
                faces.append(Face(start + i, name, sha, number, box, emb, route))
        bar.update(len(loaded))
    bar.close()
    return faces


def _main_face_per_item(
    model: FaceModel,
    items: Sequence[ImageLike],
    no_face: str,
    detector: str | object,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D), found (n,) bool): the main face of each item; zero rows where
    no face was kept."""
    faces = find_faces(model, items, no_face=no_face, detector=detector, progress=progress)
    emb = np.zeros((len(items), model.embedding_dim), dtype=np.float32)
    found = np.zeros(len(items), dtype=bool)
    for f in faces:
        emb[f.item] = f.embedding
        found[f.item] = True
    return emb, found


@contextmanager
def _opened(gallery: GalleryLike, create: bool = False) -> Iterator[GalleryStore]:
    """The store itself, or one opened from a path for the duration of the call."""
    if isinstance(gallery, GalleryStore):
        yield gallery
        return
    with open_store(gallery, create=create) as store:
        yield store


# -- enrollment ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollReport:
    gallery: str
    enrolled: dict[str, int]  # identity -> faces stored by this enrollment
    skipped: list[str]  # images left out because no face was found (no_face="skip")
    routes: dict[str, int] = field(default_factory=dict)  # faces stored, by how each was found


def enroll_people(
    gallery: GalleryLike,
    model: FaceModel,
    people: Mapping[str, Sequence[ImageLike]],
    append: bool = False,
    all_faces: bool = False,
    no_face: str = "error",
    detector: str | object | None = None,
    progress: bool = True,
) -> EnrollReport:
    """Enroll several people in one transaction: all of them are stored, or (on any error or
    a kill) none. A name already enrolled is refused before anything is embedded unless
    `append`, which adds the new images to it. A gallery file that does not exist yet is made
    only when there are faces to store: a failed first enrollment leaves no file behind."""
    names = checked_names(people)
    for raw, name in names.items():
        if not people[raw]:
            raise GalleryError(f"{name!r}: no images to enroll")
    info = ModelInfo.of(model)
    if isinstance(gallery, GalleryStore) or gallery_exists(gallery):
        with _opened(gallery) as store:  # refuse early, before the embedding work
            _check_enrollable(store, info, set(names.values()), append)
    owners = [name for raw, name in names.items() for _ in people[raw]]
    items = [item for raw in names for item in people[raw]]
    faces = find_faces(
        model, items, all_faces=all_faces, no_face=no_face, detector=detector, progress=progress
    )
    by_name: dict[str, list[EnrolledFace]] = {name: [] for name in names.values()}
    for f in faces:
        by_name[owners[f.item]].append(EnrolledFace(f.image, f.sha256, f.face, f.embedding))
    for name in [n for n, got in by_name.items() if not got]:
        log.warning("%r: no face in any of its images, not enrolled", name)
        del by_name[name]
    used = {f.item for f in faces}
    skipped = [str(item) for i, item in enumerate(items) if i not in used]
    path = gallery.path if isinstance(gallery, GalleryStore) else redact(str(gallery))
    if by_name:
        with _opened(gallery, create=True) as store:  # add() checks model and names again
            store.add(by_name, info, append=append)
    log.info("%s: enrolled %d identities (%d faces)", path, len(by_name), len(faces))
    stored = [f.route for f in faces if owners[f.item] in by_name]
    enrolled = {n: len(v) for n, v in by_name.items()}
    return EnrollReport(path, enrolled, skipped, dict(Counter(stored)))


def _check_enrollable(store: GalleryStore, info: ModelInfo, names: set[str], append: bool) -> None:
    store.check_writable()
    store.check_model(info)
    clash = sorted(name for name in names if store.contains(name))
    if clash and not append:
        raise GalleryConflict(
            f"{store.path}: already enrolled: {', '.join(map(repr, clash))}; "
            f"pass append to add images to them"
        )


def checked_names(raws: Iterable[str], where: str = "identity names") -> dict[str, str]:
    """{raw name: identity name} (`identity_name`); every invalid name, and every group of raw
    names that normalise to one name, is reported at once (GalleryError, led by `where`)."""
    names: dict[str, str] = {}
    problems = []
    for raw in raws:
        try:
            names[raw] = identity_name(raw)
        except GalleryError as exc:
            problems.append(str(exc))
    by_name: dict[str, list[str]] = {}
    for raw, name in names.items():
        by_name.setdefault(name, []).append(raw)
    problems += [
        f"{' and '.join(map(ascii, same))} are one name, {name!r}"
        for name, same in by_name.items()
        if len(same) > 1
    ]
    if problems:
        raise GalleryError(f"{where}: {'; '.join(problems)}")
    return names


def enroll(
    gallery: GalleryLike,
    model: FaceModel,
    name: str,
    images: Sequence[ImageLike],
    **options: Any,
) -> EnrollReport:
    """Enroll one person from one or a few images (options as in `enroll_people`)."""
    return enroll_people(gallery, model, {name: images}, **options)


def enroll_tree(
    gallery: GalleryLike, model: FaceModel, root: str | Path, **options: Any
) -> EnrollReport:
    """Enroll every identity folder under `root` (one sub-folder per person) at once; folder
    names must be valid identity names (`identity_name`), all of them are checked first."""
    folder = IdentityFolder.scan(root)
    checked_names(folder.identities, where=f"{root}: identity folders")
    people: dict[str, list[Path]] = {name: [] for name in folder.identities}
    for sample in folder.samples:
        people[folder.identities[sample.label]].append(sample.path)
    return enroll_people(gallery, model, people, **options)


# -- decisions ----------------------------------------------------------------------------------


def model_threshold(model: FaceModel, far: float | None = None) -> Threshold | None:
    """The model's own operating point for target `far` (default 1e-3) as a `Threshold`, or
    None when the model carries none for it."""
    point = point_at(model.operating_points, DEFAULT_FAR if far is None else far)
    if point is None:
        return None
    return Threshold(
        point.threshold,
        source=f"{model.name}'s operating point {point.name}, calibrated on {point.trials}",
        target_far=point.target_far,
        measured_far=point.far,
        measured_frr=point.frr,
        n_genuine=point.n_genuine,
        n_impostor=point.n_impostor,
    )


def resolve_threshold(
    store: GalleryStore | None,
    threshold: float | None = None,
    far: float | None = None,
    model: FaceModel | None = None,
) -> Threshold:
    """The caller's threshold; else the gallery's calibrated for `far` (without `far`: its
    most recently calibrated one); else the model's operating point for `far` (default 1e-3).
    No threshold at all is an error saying so, never a silent default."""
    if threshold is not None:
        if far is not None:
            raise ValueError("give a threshold or a target FAR, not both")
        return Threshold(finite(threshold, "threshold"), source="given by the caller")
    if far is not None:
        finite(far, "target FAR")
    stored = store.thresholds() if store is not None else []
    calibrated = calibrated_for(stored, far)
    if calibrated is not None:
        return calibrated
    own = model_threshold(model, far) if model is not None else None
    if own is not None:
        return own
    if stored:
        return store.threshold(far)  # names the FARs the gallery was calibrated for
    wanted = DEFAULT_FAR if far is None else far
    where = f"{store.path}: no calibrated threshold, and " if store is not None else ""
    name = model.name if model is not None else "the model"
    raise GalleryError(
        f"{where}no threshold known: {name} carries no operating point for FAR {wanted:g}; "
        f"give a threshold, or calibrate one with `facelab calibrate` on labelled trials"
    )


@dataclass(frozen=True)
class Claim:
    """A 1:1 decision: is the face in `image` the claimed, enrolled `identity`?"""

    identity: str
    image: str
    score: float
    accepted: bool
    threshold: Threshold


def verify_claim(
    gallery: GalleryLike,
    model: FaceModel,
    name: str,
    image: ImageLike,
    threshold: float | None = None,
    far: float | None = None,
    aggregate: str = "max",
    no_face: str = "error",
    detector: str | object | None = None,
) -> Claim:
    """Accept or reject "this is `name`" for the main face of `image` (1:1)."""
    with _opened(gallery) as store:
        store.check_model(ModelInfo.of(model))
        chosen = resolve_threshold(store, threshold, far, model)
        enrolled = store.embeddings(name)
        rows, _ = identity_rows(enrolled, np.zeros(len(enrolled), np.int64), aggregate)
        face = find_faces(model, [image], no_face=no_face, detector=detector)
        if not face:
            raise GalleryError(f"{image}: no face found")
        score = float((rows @ face[0].embedding).max())
        return Claim(name, face[0].image, score, score >= chosen.value, chosen)


@dataclass(frozen=True)
class Identification:
    """A 1:N decision for one face: the best identity, or UNKNOWN under the threshold."""

    image: str
    face: int
    box: tuple[float, float, float, float] | None
    identity: str
    score: float  # the best candidate's score
    candidates: list[Match]
    threshold: Threshold
    route: str = DETECTED  # how the face was found (facelab.pipeline.ROUTES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def identify(
    gallery: GalleryLike,
    model: FaceModel,
    images: Sequence[ImageLike],
    k: int = 5,
    threshold: float | None = None,
    far: float | None = None,
    method: str = "exact",
    aggregate: str = "max",
    all_faces: bool = False,
    no_face: str = "error",
    detector: str | object | None = None,
    search: GallerySearch | None = None,
) -> list[Identification]:
    """Top-k enrolled identities for each face (the main one, or each with `all_faces`); the
    decision is the best one if its score reaches the threshold, else UNKNOWN.

    Pass a `GallerySearch` to reuse its index across calls (it rebuilds itself when the
    gallery changes)."""
    check_k(k)
    with _opened(gallery) as store:
        store.check_model(ModelInfo.of(model))
        chosen = resolve_threshold(store, threshold, far, model)
        searcher = search or GallerySearch(store, method, aggregate)
        faces = find_faces(model, images, all_faces=all_faces, no_face=no_face, detector=detector)
        if not faces:
            return []
        results = searcher.search(np.stack([f.embedding for f in faces]), k)
        out = []
        for f, matches in zip(faces, results, strict=True):
            best = matches[0]
            identity = best.identity if best.score >= chosen.value else UNKNOWN
            out.append(
                Identification(
                    f.image, f.face, f.box, identity, best.score, matches, chosen, f.route
                )
            )
        return out


# -- mapping unknown faces to known identities ---------------------------------------------------


@dataclass(frozen=True)
class MappingResult:
    rows: list[tuple[str, str, float]]  # (unknown image, identity, score)
    accuracy: float | None  # over the images that have a label; None without labels
    labelled: int


def _nearest_identities(
    info: ModelInfo,
    known: Mapping[str, Sequence[EnrolledFace]],
    queries: np.ndarray,
    method: str,
    aggregate: str,
) -> list[Match]:
    """Closed-set: the best known identity of each query, through a throw-away gallery."""
    with GalleryStore(MEMORY) as store:
        store.add(known, info)
        return [m[0] for m in GallerySearch(store, method, aggregate).search(queries, k=1)]


def _image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder of unknown images does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no images")
    return files


def write_mapping_csv(
    rows: Sequence[tuple[str, str, float]],
    path: str | Path,
    columns: Sequence[str] = MAPPING_COLUMNS,
) -> Path:
    """The submission file: one (image, identity) row per unknown image, under the header
    `columns` (default `image,identity`), written like every facelab submission CSV."""
    return atomic_write_csv(path, columns, ((image, identity) for image, identity, _ in rows))


def _accuracy(
    rows: Sequence[tuple[str, str, float]], labels: Mapping[str, str]
) -> tuple[float, int]:
    hits = [identity == labels[image] for image, identity, _ in rows if image in labels]
    if len(hits) < len(rows):
        log.warning("%d of %d mapped images have no label", len(rows) - len(hits), len(rows))
    if not hits:
        raise ValueError("no mapped image has a label: check the labels file's image column")
    return float(np.mean(hits)), len(hits)


def map_unknown(
    model: FaceModel,
    known: str | Path,
    unknown: str | Path,
    labels: str | Path | None = None,
    out: str | Path | None = None,
    method: str = "exact",
    aggregate: str = "max",
    no_face: str = "centre",
    detector: str | object | None = None,
    progress: bool = True,
    columns: Sequence[str] = MAPPING_COLUMNS,
) -> MappingResult:
    """Map each image under `unknown` to the known identity (a sub-folder of `known`) it most
    resembles. Several images may map to one identity; nobody is rejected (closed set).

    Image names in the result, the labels and the output CSV are relative to `unknown`.
    """
    folder = IdentityFolder.scan(known)
    known_faces = find_faces(
        model,
        [s.path for s in folder.samples],
        no_face=no_face,
        detector=detector,
        progress=progress,
    )
    by_name: dict[str, list[EnrolledFace]] = {}
    for f in known_faces:
        name = folder.identities[folder.samples[f.item].label]
        by_name.setdefault(name, []).append(EnrolledFace(f.image, f.sha256, f.face, f.embedding))
    root = Path(unknown)
    files = _image_files(root)
    emb, found = _main_face_per_item(model, files, no_face, detector, progress)
    kept = [i for i in range(len(files)) if found[i]]
    matches = _nearest_identities(ModelInfo.of(model), by_name, emb[kept], method, aggregate)
    rows = [
        (files[i].relative_to(root).as_posix(), m.identity, m.score)
        for i, m in zip(kept, matches, strict=True)
    ]
    if out is not None:
        write_mapping_csv(rows, out, columns)
    if labels is None:
        return MappingResult(rows, None, 0)
    accuracy, labelled = _accuracy(rows, read_labels(labels))
    return MappingResult(rows, accuracy, labelled)


# -- calibration --------------------------------------------------------------------------------


def calibrate(
    gallery: GalleryLike,
    model: FaceModel,
    trials: str | Path,
    target_far: float = 1e-3,
    images_root: str | Path | None = None,
    no_face: str = "centre",
    detector: str | object | None = None,
    progress: bool = True,
) -> Threshold:
    """Pick the threshold whose false-accept rate on a labelled trial list does not exceed
    `target_far` (the highest-TPR such threshold), store it in the gallery with the FAR and
    FRR measured there, and return it."""
    trial_list = read_trials(trials, images_root)
    if any(t.label is None for t in trial_list):
        raise ValueError(f"{trials}: calibration needs a same/different label on every trial")
    unique = sorted({p for t in trial_list for p in (t.a, t.b)})
    emb, found = _main_face_per_item(model, unique, no_face, detector, progress)
    index = {p: i for i, p in enumerate(unique)}
    pairs = [(index[t.a], index[t.b], t.label) for t in trial_list]
    pairs = [p for p in pairs if found[p[0]] and found[p[1]]]
    if len(pairs) < len(trial_list):
        log.warning("%s: %d trials dropped (no face found)", trials, len(trial_list) - len(pairs))
    a, b, y = (np.array(col) for col in zip(*pairs, strict=True))
    scores = np.einsum("ij,ij->i", emb[a], emb[b])
    y = y.astype(bool)
    point = threshold_at_far(scores, y, target_far)
    n_impostor = point["n_impostor"]
    if target_far * n_impostor < 1:
        log.warning(
            "%s: %d impostor trials cannot measure a FAR of %g (one false accept is %.2g)",
            trials,
            n_impostor,
            target_far,
            1 / n_impostor,
        )
    chosen = Threshold(
        value=point["threshold"],
        source=f"calibrated on {trials}",
        target_far=float(target_far),
        measured_far=point["far"],
        measured_frr=point["frr"],
        n_genuine=point["n_genuine"],
        n_impostor=n_impostor,
    )
    with _opened(gallery, create=True) as store:
        store.set_threshold(chosen, ModelInfo.of(model))
    log.info("%s", chosen.describe())
    return chosen


# -- LFW identification protocol ----------------------------------------------------------------


@dataclass(frozen=True)
class LfwSplit:
    """Deterministic LFW splits (images sorted by file name within each person).

    Open-set identification (Best-Rowden et al. 2014 style): `gallery` = the first image of
    every person with at least two images, `probes` = their other images (mated),
    `impostors` = the image of every person with exactly one (never enrolled).
    Mapping task: `known` = the first ceil(n/2) images of every person with at least two,
    `unknown` = the rest of their images (with the person as label).
    """

    gallery: list[tuple[str, Path]]
    probes: list[tuple[str, Path]]
    impostors: list[Path]
    known: list[tuple[str, Path]]
    unknown: list[tuple[str, Path]]

    @classmethod
    def from_root(cls, lfw_root: str | Path) -> LfwSplit:
        images = Path(lfw_root) / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: LFW images folder not found")
        split = cls([], [], [], [], [])
        for person in sorted(p for p in images.iterdir() if p.is_dir()):
            files = sorted(person.glob("*.jpg"))
            if len(files) == 1:
                split.impostors.append(files[0])
                continue
            split.gallery.append((person.name, files[0]))
            split.probes.extend((person.name, f) for f in files[1:])
            half = math.ceil(len(files) / 2)
            split.known.extend((person.name, f) for f in files[:half])
            split.unknown.extend((person.name, f) for f in files[half:])
        return split


def write_lfw_mapping_split(lfw_root: str | Path, dest: str | Path) -> Path:
    """Lay out the LFW mapping task as `facelab map` takes it, without copying an image:
    dest/known/<person>/ and dest/unknown/NNNNN.jpg are symbolic links, dest/labels.csv
    holds the answers (unknown images get opaque names so no file name gives them away)."""
    split = LfwSplit.from_root(lfw_root)
    dest = Path(dest)
    for name, path in split.known:
        link = dest / "known" / name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
    (dest / "unknown").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, path) in enumerate(split.unknown):
        link = dest / "unknown" / f"{i:05d}{path.suffix}"
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
        rows.append((link.name, name, 0.0))
    write_mapping_csv(rows, dest / "labels.csv")
    return dest


def eval_identification(
    model: FaceModel,
    lfw_root: str | Path,
    out_dir: str | Path | None = None,
    fars: Sequence[float] = (0.01, 0.001),
    no_face: str = "centre",
    detector: str | object | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LFW open-set identification (rank-1/5, DIR at each FAR, DIR-vs-FAR curve) and the
    mapping-task accuracy on the split of `LfwSplit`; every image is embedded once.

    With `out_dir`: metrics.json and dir_far.png there."""
    split = LfwSplit.from_root(lfw_root)
    items = [p for _, p in split.gallery] + [p for _, p in split.probes] + split.impostors
    emb, _ = _main_face_per_item(model, items, no_face, detector, progress)
    row = {p: i for i, p in enumerate(items)}
    n_gal, n_probe = len(split.gallery), len(split.probes)
    gallery, probes, impostors = emb[:n_gal], emb[n_gal : n_gal + n_probe], emb[n_gal + n_probe :]
    gallery_labels = np.array([name for name, _ in split.gallery])
    probe_labels = np.array([name for name, _ in split.probes])
    sims = probes @ gallery.T
    impostor_max = (impostors @ gallery.T).max(axis=1)
    report: dict[str, Any] = {
        "model": asdict(ModelInfo.of(model)),
        "protocol": "LFW open-set identification, Best-Rowden et al. 2014 style (LfwSplit)",
        "gallery_identities": n_gal,
        "mated_probes": n_probe,
        "non_mated_probes": len(impostors),
        "rank1": rank_k_accuracy(sims, probe_labels, gallery_labels, 1),
        "rank5": rank_k_accuracy(sims, probe_labels, gallery_labels, 5),
    }
    for far in fars:
        rate, thr = detection_identification_rate(
            sims, probe_labels, gallery_labels, impostor_max, far
        )
        report[f"dir_at_far_{far:g}"] = rate
        report[f"threshold_at_far_{far:g}"] = thr
    info = ModelInfo.of(model)
    known: dict[str, list[EnrolledFace]] = {}
    for name, path in split.known:
        known.setdefault(name, []).append(EnrolledFace(str(path), "", 0, emb[row[path]]))
    unknown = np.stack([emb[row[p]] for _, p in split.unknown])
    matches = _nearest_identities(info, known, unknown, "exact", "max")
    hits = [m.identity == name for m, (name, _) in zip(matches, split.unknown, strict=True)]
    report.update(
        mapping_known_images=len(split.known),
        mapping_unknown_images=len(split.unknown),
        mapping_accuracy=float(np.mean(hits)),
    )
    if out_dir is not None:
        from facelab.eval.plots import plot_curve

        out = Path(out_dir)
        far_grid, dirs, _ = dir_far_curve(sims, probe_labels, gallery_labels, impostor_max)
        plot_curve(
            far_grid,
            {model.name: dirs},
            out / "dir_far.png",
            xlabel="false alarm rate (FAR)",
            ylabel="detection and identification rate (DIR)",
            title=f"LFW open-set identification, {n_gal} enrolled",
            log_x=True,
        )
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    return report
