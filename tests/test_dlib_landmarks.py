"""dlib's 5-point shape model in facelab: the file reader, the predictor, and the dlib-chip path.

The predictor and the end-to-end path are checked against dlib itself (dlib-bin) on real LFW
faces; those checks skip when dlib, the face-recognition-models package or ../shared are absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import dlib_model_file, dlib_points

import facelab.models.converters.dlib_serialize as dlib_serialize
from facelab.data.images import read_image
from facelab.models import BACKBONES, FaceModel
from facelab.models.backbones.dlib_resnet import (
    DLIB_CHIP_PREPROCESS,
    DLIB_PREPROCESS,
    MODEL_FILE,
)
from facelab.models.converters.dlib_serialize import DlibStream
from facelab.models.converters.dlib_shape import read_dlib_shape_predictor
from facelab.models.detectors.dlib_landmarks import (
    SHAPE_PREDICTOR_FILE,
    ShapePredictor,
    shape_predictor_5,
)
from facelab.models.preprocess import Preprocess
from facelab.pipeline import embed_images

SP_BYTES = 9_150_489

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def sp_path() -> Path:
    return dlib_model_file(SHAPE_PREDICTOR_FILE)


@pytest.fixture(scope="module")
def sp_bytes(sp_path: Path) -> bytes:
    return sp_path.read_bytes()


@pytest.fixture(scope="module")
def predictor(sp_path: Path) -> ShapePredictor:
    return shape_predictor_5(sp_path)


# ---------------------------------------------------------------- reader


def test_reader_reads_the_whole_real_file(predictor: ShapePredictor, sp_bytes: bytes) -> None:
    assert len(sp_bytes) == SP_BYTES  # the reader itself refuses any byte left unread
    m = predictor.model
    assert m.initial_shape.shape == (5, 2) and m.initial_shape.dtype == np.float32
    assert m.splits.shape == (15, 500, 15, 2) and m.thresholds.shape == (15, 500, 15)
    assert m.leaves.shape == (15, 500, 16, 5, 2) and m.depth == 4
    assert m.anchors.shape == (15, 800) and m.deltas.shape == (15, 800, 2)
    # The mean shape is a face in its box: eyes above the nose, image-right eye first.
    (r_out, r_in, l_out, l_in, nose) = m.initial_shape
    assert l_out[0] < l_in[0] < nose[0] < r_in[0] < r_out[0]
    assert max(r_out[1], l_out[1]) < nose[1] < 1


@pytest.mark.parametrize("length", [0, 1, 7, 1000, SP_BYTES - 1])
def test_truncated_file_is_refused(tmp_path: Path, sp_bytes: bytes, length: int) -> None:
    path = tmp_path / "truncated.dat"
    path.write_bytes(sp_bytes[:length])
    with pytest.raises(ValueError, match=r"truncated\.dat: .*truncated\?\) at byte offset \d+"):
        read_dlib_shape_predictor(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # Errors found before the end: only the head of the file is needed.
        (lambda b: b"\x01\x02" + b[2:1000], "version is 2, expected 1 at byte offset 0"),
        (lambda b: b[:4] + b"\x70" + b[5:1000], "bad integer control byte 0x70 .* offset 4"),
        (lambda b: b + b"\x01\x00", f"2 trailing bytes .* offset {SP_BYTES}"),
    ],
)
def test_garbled_file_is_refused(tmp_path: Path, sp_bytes: bytes, edit, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "garbled.dat"
    path.write_bytes(edit(sp_bytes))
    with pytest.raises(ValueError, match=rf"garbled\.dat: .*{message}"):
        read_dlib_shape_predictor(path)


def _encode(value: int) -> bytes:
    """One dlib integer: sign/size control byte, then the magnitude's bytes."""
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


@pytest.mark.parametrize("span", [64, 2048])
def test_bulk_integers_match_one_at_a_time(monkeypatch: pytest.MonkeyPatch, span: int) -> None:
    """The vectorised token walk (many walkers, most starting inside a token) reads what the
    one-value-at-a-time reader reads."""
    monkeypatch.setattr(dlib_serialize, "_WALK_SPAN", span)
    monkeypatch.setattr(dlib_serialize, "_WALK_OVERLAP", span // 8)
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(-(2**62), 2**62, 3000) >> rng.integers(0, 62, 3000)]
    data = b"".join(_encode(v) for v in values)
    offsets, decoded = DlibStream(data, "x").integer_tokens("test")
    stream = DlibStream(data, "x")
    expected_offsets = []
    for _ in values:
        expected_offsets.append(stream.pos)
        stream.integer("test")
    assert decoded.tolist() == values
    assert offsets.tolist() == [*expected_offsets, len(data)]


# ---------------------------------------------------------------- against dlib, real faces


# LFW people whose first image holds one face for dlib's HOG detector and for MTCNN (where
# MTCNN also reports a false face, the pipeline's largest-face rule can pick that one).
PEOPLE = (
    "AJ_Cook", "Billy_Graham", "Chang_Sang", "Daniel_Scioli", "Drew_Barrymore",
    "Francis_Crick", "Jaime_Pressly", "Jim_Flaherty", "Joseph_Safra", "Kwon_Young-gil",
)  # fmt: skip


@pytest.fixture(scope="module")
def dlib_shape_model(sp_path: Path):  # noqa: ANN201
    """dlib's own shape predictor (dlib.shape_predictor) on the same file."""
    dlib = pytest.importorskip("dlib", reason="dlib (pip install dlib-bin) is the reference")
    return dlib.shape_predictor(str(sp_path))


@pytest.fixture(scope="module")
def dlib_faces(lfw: Path, dlib_shape_model) -> list[tuple[np.ndarray, object, object]]:
    """(image, dlib HOG rect, dlib 5-point shape) for the first image of each of PEOPLE."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    faces = []
    for name in PEOPLE:
        image = read_image(lfw / "images" / name / f"{name}_0001.jpg")
        (rect,) = detector(image, 0)
        faces.append((image, rect, dlib_shape_model(image, rect)))
    return faces


def _box(rect) -> tuple[int, int, int, int]:  # noqa: ANN001
    return rect.left(), rect.top(), rect.right(), rect.bottom()


def test_same_landmarks_as_dlib(dlib_faces: list, predictor: ShapePredictor) -> None:
    diff = [
        np.abs(predictor.predict(im, _box(r)) - dlib_points(s)).max() for im, r, s in dlib_faces
    ]
    assert max(diff) < 0.01, f"max |diff| per face (px): {diff}"


def test_same_landmarks_as_dlib_grey_and_at_the_border(
    dlib_faces: list,
    predictor: ShapePredictor,
    dlib_shape_model,
) -> None:
    """Grey input (no RGB averaging) and a box whose feature pixels fall outside the image."""
    import dlib

    image, rect, _ = dlib_faces[0]
    grey = np.ascontiguousarray(image[..., 1])
    assert np.array_equal(
        predictor.predict(grey, _box(rect)), dlib_points(dlib_shape_model(grey, rect))
    )
    w, h = rect.width(), rect.height()
    corner = dlib.rectangle(-w // 2, -h // 3, w // 2, 2 * h // 3)
    theirs = dlib_points(dlib_shape_model(image, corner))
    assert np.array_equal(predictor.predict(image, _box(corner)), theirs)


def test_dlib_chip_pipeline_gives_dlib_descriptors(
    dlib_faces: list, predictor: ShapePredictor
) -> None:
    """facelab end to end (MTCNN -> mapped rectangle -> shape model -> chip -> native network)
    against dlib end to end (HOG -> shape model -> compute_face_descriptor)."""
    import dlib

    recogniser = dlib.face_recognition_model_v1(str(dlib_model_file(MODEL_FILE)))
    images = [image for image, _, _ in dlib_faces]
    ref = np.array([recogniser.compute_face_descriptor(im, s) for im, _, s in dlib_faces])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    model = FaceModel.create("dlib_resnet", preprocess=DLIB_CHIP_PREPROCESS, pretrained=True)
    result = embed_images(model, images, batch_size=len(images), workers=1, progress=False)
    assert set(result.routes) == {"detected"}
    cos = (result.embeddings * ref).sum(axis=1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.99, f"cosines {np.round(cos, 5)}"


# ---------------------------------------------------------------- preprocessing spec


def test_dlib_chip_preprocess_is_chosen_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BACKBONES.get("dlib_resnet").preprocess == DLIB_PREPROCESS  # default unchanged
    spec = DLIB_CHIP_PREPROCESS
    assert spec.alignment == "dlib_chip" and spec.size == 150
    assert Preprocess.from_dict(spec.to_dict()) == spec
    assert spec.fingerprint() != DLIB_PREPROCESS.fingerprint()
    model = FaceModel.create("dlib_resnet", preprocess=spec)
    assert FaceModel.from_description(model.describe()).preprocess == spec
    registered = FaceModel.create("dlib_resnet_chip")  # the same network, dlib's chip
    assert registered.name == "dlib_resnet_chip" and registered.preprocess == spec
    assert registered.backbone.state_dict().keys() == model.backbone.state_dict().keys()
    with pytest.raises(ValueError, match="five points per face"):
        spec.crop_face(np.zeros((100, 100, 3), np.uint8))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install face-recognition-models"):
        shape_predictor_5()
