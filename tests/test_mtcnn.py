"""facelab's MTCNN against facenet-pytorch's own detections, plus its edge cases.

The reference (`shared/reference/mtcnn_facenet_pytorch.json`) holds what facenet-pytorch
2.6.0's MTCNN found on 300 LFW images. On all 300 this port finds the same number of faces
on every image, mean IoU 0.9998 (min 0.947), mean landmark error 0.003 px (max 0.6 px),
probabilities within 3e-6; the two faces that differ at all come from an exact score tie
(broken the other way) and from a box edge within 3e-5 px of an integer (cropped one pixel
differently). On the first 40 images, on every tenth image after them and on the astronaut:
mean IoU 0.99999, landmark error 0.0004 px, probabilities within 1e-6. The tests below hold the
samples to that agreement; the whole set (a `slow` test) to what the two odd faces allow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mtcnn_weights_dir

from facelab.data.images import read_image
from facelab.models.converters.mtcnn_weights import NETS, WeightsError
from facelab.models.detectors.mtcnn import MTCNN, Detections, face_order, main_face, mtcnn

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "mtcnn_facenet_pytorch.json"


WEIGHTS = mtcnn_weights_dir()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None,
    reason="facenet-pytorch's MTCNN weights are absent "
    "(pip install --no-deps facenet-pytorch==2.6.0)",
)
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_file(), reason=f"shared reference data not found at {REFERENCE}"
)


@pytest.fixture(scope="module")
def detector() -> Iterator[MTCNN]:
    # One thread: on a shared CI machine, handing each small op to a second thread that may
    # not be scheduled costs more than it gains.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield mtcnn(min_face_size=20)  # facenet-pytorch's setting, which the reference used
    torch.set_num_threads(threads)


def _reference_lfw() -> list[dict]:
    items = json.loads(REFERENCE.read_text())["items"]
    return [it for it in items if it["image"].startswith("images/")]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _agreement(items: list[dict], found: list[Detections]) -> dict[str, float]:
    """Match each reference face to the detection with the highest IoU; summarise."""
    same_count, ious, landmark_err, prob_err = 0, [], [], []
    for item, det in zip(items, found, strict=True):
        same_count += len(det) == len(item["boxes"])
        if not len(det):
            ious += [0.0] * len(item["boxes"])
            continue
        overlap = _iou(np.asarray(item["boxes"]), det.boxes)
        for i, j in enumerate(overlap.argmax(1)):
            ious.append(overlap[i, j])
            points = np.asarray(item["landmarks"][i])
            landmark_err.append(np.linalg.norm(points - det.landmarks[j], axis=1).mean())
            prob_err.append(abs(item["probs"][i] - det.scores[j]))
    return {
        "same_count": same_count / len(items),
        "mean_iou": float(np.mean(ious)),
        "landmark_px": float(np.mean(landmark_err)),
        "max_prob_err": float(np.max(prob_err)),
    }


def _detect_reference(detector: MTCNN, items: list[dict]) -> tuple[list, list[Detections]]:
    images = [read_image(SHARED / "data" / "lfw" / it["image"]) for it in items]
    return images, detector.detect(images)


def _check_agreement(
    items: list[dict], found: list[Detections], mean_iou: float = 0.9999, landmark_px: float = 0.002
) -> None:
    stats = _agreement(items, found)
    assert stats["same_count"] == 1.0, stats
    assert stats["mean_iou"] >= mean_iou, stats
    assert stats["landmark_px"] < landmark_px, stats
    assert stats["max_prob_err"] < 1e-5, stats


@pytest.fixture(scope="module")
def lfw_sample(detector: MTCNN) -> tuple[list[dict], list[np.ndarray], list[Detections]]:
    """The first 40 reference images, detected as one batch."""
    items = _reference_lfw()[:40]
    return items, *_detect_reference(detector, items)


@needs_weights
@needs_reference
def test_matches_facenet_pytorch_on_lfw_sample(lfw_sample: tuple) -> None:
    items, _, found = lfw_sample
    _check_agreement(items, found)


@needs_weights
@needs_reference
def test_matches_facenet_pytorch_on_a_spread_of_the_reference(detector: MTCNN) -> None:
    """Every tenth image after the first 40: the fast stand-in for all 300 (below)."""
    items = _reference_lfw()[40::10]
    assert len(items) == 26
    _check_agreement(items, _detect_reference(detector, items)[1])


@pytest.mark.slow
@needs_weights
@needs_reference
def test_matches_facenet_pytorch_on_all_reference_images(detector: MTCNN) -> None:
    items = _reference_lfw()
    assert len(items) == 300
    # two faces differ (a score tie, a box edge: see the module doc)
    _check_agreement(
        items, _detect_reference(detector, items)[1], mean_iou=0.9995, landmark_px=0.01
    )


@needs_weights
@needs_reference
def test_matches_facenet_pytorch_on_astronaut(detector: MTCNN) -> None:
    """A 512x512 image outside LFW: another pyramid, faces nearer the border."""
    from skimage.data import astronaut  # scikit-image: in the `test` extra

    items = json.loads(REFERENCE.read_text())["items"]
    item = next(it for it in items if it["image"] == "skimage.data.astronaut()")
    _check_agreement([item], detector.detect([astronaut()]))


@needs_weights
@needs_reference
def test_one_at_a_time_equals_batched(detector: MTCNN, lfw_sample: tuple) -> None:
    _, images, batched = lfw_sample
    for image, together in zip(images[:4], batched[:4], strict=True):
        alone = detector.detect([image])[0]
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-3)
        np.testing.assert_allclose(alone.landmarks, together.landmarks, atol=1e-3)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)


@needs_weights
@needs_reference
def test_identical_images_in_a_batch_give_identical_results(detector: MTCNN) -> None:
    image = read_image(SHARED / "data" / "lfw" / _reference_lfw()[2]["image"])
    first, second = detector.detect([image, image.copy()])
    assert len(first) == 3
    for a, b in zip(
        (first.boxes, first.scores, first.landmarks),
        (second.boxes, second.scores, second.landmarks),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@needs_weights
@needs_reference
def test_mixed_sizes_keep_their_order_and_main_face(detector: MTCNN) -> None:
    # three faces; the reference lists the largest first, a face cut by the left border. LFW
    # centres each image on its subject (Abdullah Gul), the face `main_face` must pick.
    item = _reference_lfw()[2]
    image = read_image(SHARED / "data" / "lfw" / item["image"])
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    found = detector.detect([image, noise, image])
    assert [len(d) for d in found] == [3, 0, 3]
    assert np.all(np.diff(found[0].scores) <= 0)
    largest = _iou(np.asarray(item["boxes"][:1]), found[0].boxes)[0].argmax()
    subject = main_face(found[0], image.shape)
    assert subject is not None and subject != largest
    box = found[0].boxes[subject]
    assert np.abs((box[:2] + box[2:]) / 2 - 125).max() < 20  # the centred face
    assert main_face(found[1], noise.shape) is None


@needs_weights
def test_no_face_gives_empty_arrays_of_the_right_shapes(detector: MTCNN) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tiny = np.zeros((10, 10, 3), dtype=np.uint8)  # smaller than the smallest face
    for found in detector.detect([noise, tiny]):
        assert len(found) == 0
        assert found.boxes.shape == (0, 4) and found.boxes.dtype == np.float32
        assert found.scores.shape == (0,) and found.scores.dtype == np.float32
        assert found.landmarks.shape == (0, 5, 2) and found.landmarks.dtype == np.float32
    assert detector.detect([]) == []


@needs_weights
def test_rejects_what_is_not_a_list_of_rgb_images(detector: MTCNN) -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="wrap a single image"):
        detector.detect(image)
    with pytest.raises(ValueError, match="image 1"):
        detector.detect([image, image[..., 0]])
    with pytest.raises(ValueError, match="image 0"):
        detector.detect([image.astype(np.float32)])


def test_missing_weights_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"pnet\.pt.*pip install --no-deps facenet-pytorch"):
        mtcnn(pretrained=str(tmp_path))


@needs_weights
def test_corrupt_weights_give_a_clear_error(tmp_path: Path) -> None:
    for net in NETS:
        (tmp_path / f"{net}.pt").write_bytes((WEIGHTS / f"{net}.pt").read_bytes())
    (tmp_path / "rnet.pt").write_bytes(b"definitely not a state dict")
    with pytest.raises(WeightsError, match=r"rnet\.pt: not a readable PyTorch state dict"):
        mtcnn(pretrained=str(tmp_path))
    # A readable file with the wrong tensors: swapped nets.
    (tmp_path / "rnet.pt").write_bytes((WEIGHTS / "onet.pt").read_bytes())
    with pytest.raises(WeightsError, match=r"rnet\.pt: does not fit MTCNN's rnet"):
        mtcnn(pretrained=str(tmp_path))


def test_unpretrained_model_runs_and_settings_are_checked() -> None:
    torch.manual_seed(0)
    assert mtcnn(pretrained=False).min_face_size == 40
    # random weights pass no face at the usual thresholds; at 0 every stage keeps some
    model = mtcnn(pretrained=False, min_face_size=30, thresholds=(0.0, 0.0, 0.0))
    # the pyramid starts where a 30-pixel face fills P-Net's 12 pixels, ends at a 12-pixel image
    assert model._scales(60, 70) == pytest.approx([0.4, 0.4 * 0.709, 0.4 * 0.709**2])
    image = np.random.default_rng(1).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    (found,) = model.detect([image])
    n = len(found)
    assert n > 1 and found.boxes.shape == (n, 4) and found.landmarks.shape == (n, 5, 2)
    assert np.all(found.boxes[:, 2:] > found.boxes[:, :2]) and np.all(np.diff(found.scores) <= 0)
    # O-Net's threshold applies: raised to the median score, only faces above it remain
    median = float(np.median(found.scores))
    model.thresholds = (0.0, 0.0, median)
    (strict,) = model.detect([image])
    assert 0 < len(strict) < n and np.all(strict.scores > median)
    with pytest.raises(ValueError, match="factor"):
        MTCNN(factor=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        MTCNN(thresholds=(0.5, 0.5))


def test_registered_as_a_detector() -> None:
    from facelab.models.registry import DETECTORS

    assert DETECTORS.get("mtcnn").constructor is mtcnn


def _boxes(*boxes: tuple[float, float, float, float]) -> Detections:
    n = len(boxes)
    return Detections(
        np.array(boxes, np.float32), np.ones(n, np.float32), np.zeros((n, 5, 2), np.float32)
    )


def test_main_face_prefers_the_centred_subject_over_a_slightly_larger_bystander() -> None:
    shape = (250, 250, 3)
    centred = (85, 85, 165, 165)  # 80 x 80 at the centre
    bystander = (0, 20, 90, 110)  # 90 x 90 at the left edge
    assert main_face(_boxes(bystander, centred), shape) == 1
    # a face much larger than a small centred one still wins
    assert main_face(_boxes((110, 110, 140, 140), (0, 0, 160, 160)), shape) == 1
    # area is measured inside the image: a box hanging far past the border is not "large"
    assert main_face(_boxes((-400, -400, 120, 120), (95, 95, 155, 155)), shape) == 1
    assert main_face(_boxes(), shape) is None
    assert face_order(_boxes(centred, bystander, (120, 120, 130, 130)), shape).tolist() == [0, 2, 1]
