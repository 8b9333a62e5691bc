"""A small photo library of real LFW faces for the People view tests (API and browser): single
photos of three people linked from ../shared and one group picture composed of a fourth photo of
each (`data.groups`), indexed with the pretrained dlib ResNet (MTCNN) and clustered at cosine
0.93 into one cluster per person. About a second to build; tests copy the built file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from facelab.collections.cluster import ClusterConfig
from facelab.collections.indexer import index_folder
from facelab.collections.library import Library
from facelab.collections.people import cluster_library
from facelab.data.groups import compose_group
from facelab.gallery.store import Threshold
from facelab.models.face_model import FaceModel

PHOTOS = {"Colin_Powell": 3, "Serena_Williams": 2, "Tony_Blair": 2}  # single photos each
GROUP = "group.jpg"  # one more photo of each of them, on one canvas
THRESHOLD = 0.93


def build_library(lfw: Path, folder: Path, model: FaceModel) -> Path:
    """Index and cluster the photos into folder/lib.db; returns its path."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for name, count in PHOTOS.items():
        for n in range(1, count + 1):
            src = lfw / "images" / name / f"{name}_{n:04d}.jpg"
            (photos / src.name).symlink_to(src)
    extra = [
        lfw / "images" / name / f"{name}_{count + 1:04d}.jpg" for name, count in PHOTOS.items()
    ]
    group = compose_group(extra, np.random.default_rng(0))
    Image.fromarray(group.image).save(photos / GROUP, quality=95)
    path = folder / "lib.db"
    with Library(path, create=True) as lib:
        index_folder(lib, model, photos, model_source="dlib_resnet", progress=False)
        cluster_library(lib, Threshold(THRESHOLD, "test"), ClusterConfig(threshold=THRESHOLD))
    return path


def copy_library(built: Path, folder: Path) -> Path:
    """A private copy (the built library is closed, so its file holds everything)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(built, folder / "lib.db"))


def person_of(lib: Library, lfw_name: str) -> int:
    """The id of the person holding the faces of `lfw_name`'s single photos."""
    table = lib.faces("lib_files.path LIKE ?", (f"%/{lfw_name}_0001.jpg",))
    return int(table.person[0])
