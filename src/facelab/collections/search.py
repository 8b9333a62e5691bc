"""Find a person's photos in a library: by a probe photo's face, or by a named person.

A probe face ranks every indexed face by cosine similarity and keeps those at or above the
operating point; a named person ranks its own faces by similarity to the person's mean face.
Either way a photo appears once, with every matching face's box, ranked by its best face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facelab.collections.library import FaceTable, Library, LibraryError
from facelab.collections.people import person_faces
from facelab.gallery.search import build_index
from facelab.gallery.store import Threshold


@dataclass(frozen=True)
class FaceHit:
    face_id: int
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class PhotoHit:
    path: str
    score: float  # the best face's
    faces: list[FaceHit]


def _photos(table: FaceTable, rows: np.ndarray, scores: np.ndarray) -> list[PhotoHit]:
    by_path: dict[str, list[FaceHit]] = {}
    for r, s in sorted(zip(rows.tolist(), scores.tolist(), strict=True), key=lambda x: -x[1]):
        box = tuple(float(v) for v in table.boxes[r])
        by_path.setdefault(table.file_paths[r], []).append(FaceHit(int(table.ids[r]), box, s))
    return [PhotoHit(path, hits[0].score, hits) for path, hits in by_path.items()]


def search_face(
    library: Library, probe: np.ndarray, threshold: Threshold, limit: int | None = None
) -> list[PhotoHit]:
    """Photos with a face at least `threshold` similar to the probe embedding, best first."""
    table = library.faces()
    if len(table.ids) == 0:
        raise LibraryError(f"{library.path}: library has no faces (index some photos first)")
    probe = np.asarray(probe, np.float32).reshape(1, -1)
    if probe.shape[1] != table.embeddings.shape[1]:
        raise LibraryError(
            f"{library.path}: probe embedding has {probe.shape[1]} dimensions, the library's "
            f"{table.embeddings.shape[1]}"
        )
    scores, rows = build_index(table.embeddings).search(probe, len(table.ids))
    keep = scores[0] >= threshold.value
    return _photos(table, rows[0][keep], scores[0][keep])[:limit]


def search_person(library: Library, ref: str | int, limit: int | None = None) -> list[PhotoHit]:
    """The photos of a person (by name or id), most typical face first."""
    table = person_faces(library, ref)
    centre = table.embeddings.mean(0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    return _photos(table, np.arange(len(table.ids)), table.embeddings @ centre)[:limit]
