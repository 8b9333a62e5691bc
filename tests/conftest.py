"""Shared fixtures: the LFW copy beside the repository, tiny synthetic identity folders, one torch
thread, a seeded random state, and the pretrained weights of the face-recognition-models and
facenet-pytorch packages."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelab.models.face_model import FaceModel

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


@pytest.fixture(scope="session")
def lfw() -> Path:
    if not (LFW / "images").is_dir():
        pytest.skip(f"LFW not found at {LFW} (the repository's sibling ../shared/data/lfw)")
    return LFW


@pytest.fixture(scope="session")
def lfw_subset(tmp_path_factory: pytest.TempPathFactory, lfw: Path) -> Path:
    """An identity folder of 6 LFW people with many images, linked (not copied) from ../shared."""
    root = tmp_path_factory.mktemp("lfw_subset")
    people = [
        "George_W_Bush",
        "Colin_Powell",
        "Tony_Blair",
        "Donald_Rumsfeld",
        "Gerhard_Schroeder",
        "Ariel_Sharon",
    ]
    for name in people:
        (root / name).mkdir()
        for src in sorted((lfw / "images" / name).glob("*.jpg"))[:12]:
            (root / name / src.name).symlink_to(src)
    return root


def write_synthetic_folder(
    root: Path, people: int = 3, per_person: int = 4, size: int = 40
) -> Path:
    """Identity folder of tiny generated images: each person a distinct colour pattern."""
    rng = np.random.default_rng(0)
    for p in range(people):
        (root / f"person_{p}").mkdir(parents=True)
        base = rng.integers(0, 255, (size, size, 3))
        for i in range(per_person):
            noise = rng.integers(-20, 20, (size, size, 3))
            img = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"person_{p}" / f"person_{p}_{i:04d}.jpg")
    return root


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Every test starts from the same random state (torch, numpy's global generator, random):
    what a test draws without its own seed is the same alone, in the suite, in any order. And
    no test may leave torch's thread count changed: that would slow (or speed) every later one."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    threads = torch.get_num_threads()
    yield
    left = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert left == threads, f"the test left torch at {left} threads instead of {threads}"


@pytest.fixture()
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny models gain nothing from two, and on a shared
    2-core machine OpenMP threads waiting for each other make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dlib_model_file(file: str) -> Path:
    """`default_weights_path(file)` (a path inside the face-recognition-models package, such as
    dlib_resnet.MODEL_FILE); skips the test when the package is not installed."""
    from facelab.models.backbones.dlib_resnet import default_weights_path

    try:
        return default_weights_path(file)
    except ModuleNotFoundError:
        pytest.skip("face-recognition-models not installed (pip install face-recognition-models)")


def mtcnn_weights_dir() -> Path | None:
    """The folder of facenet-pytorch's MTCNN weights (pnet/rnet/onet.pt), None when absent."""
    from facelab.models.converters.mtcnn_weights import (
        NETS,
        WeightsError,
        facenet_pytorch_weights_dir,
    )

    try:
        folder = facenet_pytorch_weights_dir()
    except WeightsError:
        return None
    return folder if all((folder / f"{net}.pt").is_file() for net in NETS) else None


@pytest.fixture(scope="session")
def pretrained_dlib_resnet() -> FaceModel:
    """`load_model("dlib_resnet")`, the README's model (MTCNN + five-point alignment), loaded once
    per session; skips when either package's weights are not installed."""
    from facelab import api
    from facelab.models.backbones.dlib_resnet import MODEL_FILE

    dlib_model_file(MODEL_FILE)
    if mtcnn_weights_dir() is None:
        pytest.skip("MTCNN weights absent (pip install --no-deps facenet-pytorch==2.6.0)")
    return api.load_model("dlib_resnet")


def dlib_points(shape) -> np.ndarray:  # noqa: ANN001
    """A dlib full_object_detection's points as an (N, 2) float64 array."""
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
