"""The collection functions `facelab.api` exposes: open a library, index, cluster, search.

The model: the one the library was indexed with (its recorded source: a pretrained name or a
checkpoint path) unless the caller gives one. The threshold: the caller's, else the one stored
in the library's gallery by `facelab calibrate --gallery LIB` for the caller's target FAR (the
cosine at a target false-accept rate on labelled pairs, e.g. LFW View 1 pairsDevTrain); never a
silent default. Clustering without either takes the model's operating point at FAR =
`FALSE_MATCHES_PER_FACE` / N for the library's N faces (`clustering_threshold`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facelab.collections.cluster import FALSE_MATCHES_PER_FACE, ClusterConfig
from facelab.collections.indexer import IndexConfig, IndexReport, index_folder
from facelab.collections.library import Library, LibraryError
from facelab.collections.people import ClusterReport, cluster_library
from facelab.collections.search import PhotoHit, search_face, search_person
from facelab.gallery.service import find_faces, resolve_threshold
from facelab.gallery.store import GalleryError, Threshold
from facelab.models.face_model import FaceModel
from facelab.models.operating_points import OperatingPoint, threshold_for_far

log = logging.getLogger(__name__)


def library_model(library: Library, model: FaceModel | str | None = None) -> FaceModel:
    """The caller's model (object or source), else the library's recorded one."""
    from facelab.api import load_model

    if isinstance(model, FaceModel):
        return model
    source = model or library.meta("model_source")
    if source is None:
        raise LibraryError(f"{library.path}: no model recorded; give one (e.g. dlib_resnet)")
    return load_model(source)


def index_photos(
    library: str | Path,
    folder: str | Path,
    model: FaceModel | str = "dlib_resnet",
    config: IndexConfig | None = None,
    progress: bool = True,
    detector: str | None = None,
) -> IndexReport:
    """Index (or bring up to date) every face of the photos under `folder` into `library`.

    detector: the face detector (a registered name); default: the one the library was built
    with, else the model's own (`Preprocess.detector`), as `facelab embed` uses. A library
    refuses faces found with another detector (`Library.bind_model`)."""
    from facelab.api import with_detector

    with Library(library, create=True) as lib:
        source = model if isinstance(model, str) else lib.meta("model_source")
        chosen = with_detector(library_model(lib, model), detector or lib.detector())
        return index_folder(lib, chosen, folder, config, source, progress)


def clustering_threshold(
    points: Sequence[OperatingPoint],
    faces: int,
    model_name: str,
    per_face: float = FALSE_MATCHES_PER_FACE,
) -> Threshold:
    """The model's threshold for clustering `faces` faces: at FAR = `per_face` / N, so that
    a face expects `per_face` false matches among the others (interpolated between the model's
    operating points, `threshold_for_far`)."""
    if not any(p.resolved for p in points):
        raise GalleryError(
            f"{model_name} carries no operating points to take a clustering threshold from; "
            "give --threshold, or calibrate the library (`facelab calibrate --gallery LIB "
            "PAIRS --far F`) and give --far F"
        )
    far = per_face / max(faces, 2)
    value, how = threshold_for_far(points, far)
    source = f"{model_name} at FAR {far:.3g} ({per_face:g} / {faces:,} faces): {how}"
    return Threshold(value, source=source, target_far=far)


def cluster_people(
    library: str | Path,
    threshold: float | None = None,
    far: float | None = None,
    min_quality: float = 0.0,
    model: FaceModel | str | None = None,
) -> ClusterReport:
    """Cluster the library's free faces into people (`collections.people`) at the caller's
    threshold, the library's calibrated one for `far`, or else the model's operating point for
    the library's size (`clustering_threshold`)."""
    with Library(library) as lib:
        faces = lib.stats()["faces"]
        if threshold is None and far is None:
            found = library_model(lib, model)
            chosen = clustering_threshold(found.operating_points, faces, found.name)
        else:
            chosen = resolve_threshold(lib.gallery, threshold, far)
        if chosen.target_far is not None and chosen.target_far * faces > 1:
            log.warning(
                "%s: the threshold for FAR %g expects about %.0f false matches per face among "
                "%d faces; clustering wants FAR <= %g / N (docs/collections.md) or --threshold",
                library,
                chosen.target_far,
                chosen.target_far * faces,
                faces,
                FALSE_MATCHES_PER_FACE,
            )
        config = ClusterConfig(threshold=chosen.value, min_quality=min_quality)
        return cluster_library(lib, chosen, config)


def search_photos(
    library: str | Path,
    face: str | Path | np.ndarray | None = None,
    person: str | None = None,
    threshold: float | None = None,
    far: float | None = None,
    model: FaceModel | str | None = None,
    limit: int | None = None,
) -> list[PhotoHit]:
    """Photos of the person in the probe image `face` (its main face), or of a person of the
    library by name or id; exactly one of the two."""
    if (face is None) == (person is None):
        raise ValueError("search needs exactly one of a probe face or a person")
    with Library(library) as lib:
        if person is not None:
            return search_person(lib, person, limit)
        chosen = resolve_threshold(lib.gallery, threshold, far)
        probe = find_faces(library_model(lib, model), [face], no_face="error")[0]
        return search_face(lib, probe.embedding, chosen, limit)
