"""Faces as users bring them: every image mode decoded right, EXIF orientation, special and
oversized files refused, tiny images refused, tight crops and thumbnails embedded like the
photo they came from, aligned crops, and the route of each embedding reported."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelab import api
from facelab.data.align import ARCFACE_TEMPLATE_112, warp_to_template
from facelab.data.images import (
    MAX_FILE_BYTES,
    MIN_IMAGE_SIDE,
    ImageError,
    decode_image,
    read_image,
)
from facelab.models.detectors.mtcnn import main_face
from facelab.models.registry import DETECTORS
from facelab.pipeline import ALIGNED, CENTRE_FALLBACK, DETECTED, embed_images

PEOPLE = ("Tony_Blair", "Colin_Powell", "Gerhard_Schroeder", "Ariel_Sharon")


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


GRADIENT16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))


# -- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt", "data"),
    [
        ("I;16", "PNG", GRADIENT16.astype("<u2")),
        ("I;16", "TIFF", GRADIENT16.astype("<u2")),
        ("I;16B", "TIFF", GRADIENT16.astype(">u2")),
    ],
)
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode: str, fmt: str, data: np.ndarray) -> None:
    image = Image.frombytes(mode, (64, 16), data.tobytes())
    rgb = decode_image(encoded(image, fmt), "grey16")
    assert rgb.shape == (16, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(GRADIENT16 / 257).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb.mean() < 160  # a mid-grey ramp, not the white image clipping gave


def test_32_bit_and_float_greyscale_use_their_range() -> None:
    ints = Image.fromarray((GRADIENT16.astype(np.int32) * 4 - 100_000).astype(np.int32))
    floats = Image.fromarray(GRADIENT16.astype(np.float32) / 65535)
    for image in (ints, floats):
        rgb = decode_image(encoded(image, "TIFF"), image.mode)
        assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
        assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)


def colourful(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1).astype(
        np.uint8
    )


@pytest.mark.parametrize(
    ("mode", "fmt", "tolerance"),
    [("RGB", "PNG", 0), ("L", "PNG", 0), ("P", "PNG", 0), ("CMYK", "JPEG", 40), ("1", "PNG", 0)],
)
def test_every_mode_round_trips_to_rgb(mode: str, fmt: str, tolerance: int) -> None:
    source = Image.fromarray(colourful()).convert(mode)
    rgb = decode_image(encoded(source, fmt), mode)
    # What the stored pixels mean (a palette's colours, grey levels); CMYK against the original.
    expected = colourful() if mode == "CMYK" else np.asarray(source.convert("RGB"))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).mean() <= tolerance / 4
    assert np.abs(rgb.astype(int) - expected).max() <= max(tolerance, 1) * 3


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 40
    rgba[:, 8:, 3] = 255  # left half transparent, right half opaque dark grey
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    rgb = decode_image(encoded(image), mode)
    assert (rgb[:, :8] == 255).all()
    assert (rgb[:, 8:] == 40).all()


@pytest.fixture(scope="module")
def model() -> object:
    return api.load_model("dlib_resnet")


def face_path(lfw: Path, name: str) -> Path:
    return lfw / "images" / name / f"{name}_0001.jpg"


@pytest.mark.parametrize(("orientation", "stored"), [(6, 90), (8, 270), (3, 180)])
def test_exif_orientation_is_applied(
    lfw: Path, model: object, orientation: int, stored: int
) -> None:
    """A phone stores the sensor's pixels and says in EXIF how to turn them upright."""
    upright = Image.open(face_path(lfw, "Tony_Blair"))
    sideways = upright.rotate(stored, expand=True)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(sideways, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, "phone.jpg")
    assert decoded.shape == (250, 250, 3)
    assert np.abs(decoded.astype(int) - np.asarray(upright).astype(int)).mean() < 4
    emb = embed_images(model, [np.asarray(upright), decoded], progress=False)
    assert float(emb.embeddings[0] @ emb.embeddings[1]) > 0.99


def test_max_side_decodes_a_smaller_image() -> None:
    big = Image.fromarray(np.tile(colourful(64), (40, 40, 1)))  # 2560 x 2560
    for fmt in ("JPEG", "PNG"):
        small = decode_image(encoded(big, fmt), "big", max_side=300)
        assert max(small.shape[:2]) <= 300 and min(small.shape[:2]) >= 150
    assert decode_image(encoded(big, "PNG"), "big").shape == (2560, 2560, 3)


# -- files that are not images ---------------------------------------------------------------


def refuses_within(seconds: float, fn: object, *args: object) -> str:
    """The ImageError message `fn(*args)` raises, failing (not hanging) after `seconds`."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            fn(*args)
            outcome["error"] = None
        except ImageError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} still blocked after {seconds} s"
    assert outcome["error"] is not None, "no ImageError raised"
    return str(outcome["error"])


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "face.jpg"
    os.mkfifo(fifo)
    try:
        message = refuses_within(10, read_image, fifo)
    finally:
        try:  # unblock a reader stuck in open() (the bug), so the test run can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to unblock
            pass
    assert str(fifo) in message and "not a regular file" in message


def test_device_behind_a_jpg_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    message = refuses_within(10, read_image, link)
    assert str(link) in message and "not a regular file" in message


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ImageError, match="byte limit"):
        read_image(huge)


def test_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path)


@pytest.mark.parametrize("shape", [(0, 0, 3), (1, 1, 3), (MIN_IMAGE_SIDE - 1, 200, 3)])
def test_tiny_arrays_are_refused_with_their_name(model: object, shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError, match=r"<array 1>.*too small"):
        api.embed(model, [np.zeros((64, 64, 3), np.uint8), np.zeros(shape, np.uint8)])


def test_tiny_files_are_refused_with_their_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from facelab.cli import main

    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ImageError, match=r"dot\.png.*1x1.*too small"):
        read_image(path)
    assert main(["verify", "dlib_resnet", str(path), str(path)]) == 2  # before: 0, a score
    assert any("dot.png" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# -- tight crops, thumbnails, aligned crops ---------------------------------------------------


@pytest.fixture(scope="module")
def photos(lfw: Path) -> list[np.ndarray]:
    return [read_image(face_path(lfw, name)) for name in PEOPLE]


@pytest.fixture(scope="module")
def photo_embeddings(model: object, photos: list[np.ndarray]) -> np.ndarray:
    result = embed_images(model, photos, progress=False)
    assert set(result.routes) == {DETECTED}
    return result.embeddings


def tight_crops(photos: list[np.ndarray], size: int, side: float = 1.1) -> list[np.ndarray]:
    """Each photo cut to its MTCNN face box (square on the longer side, times `side`)."""
    crops = []
    for photo, det in zip(photos, DETECTORS.create("mtcnn").detect(photos), strict=True):
        x1, y1, x2, y2 = det.boxes[main_face(det, photo.shape)]
        half = max(x2 - x1, y2 - y1) * side / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        box = tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half))
        face = Image.fromarray(photo).crop(box).resize((size, size), Image.LANCZOS)
        crops.append(np.asarray(face))
    return crops


@pytest.mark.parametrize("detector", ["mtcnn", "blazeface"])
@pytest.mark.parametrize(("size", "least"), [(112, 0.98), (64, 0.98), (32, 0.93)])
def test_tight_crops_embed_like_the_photo(
    model: object, photos: list[np.ndarray], size: int, least: float, detector: str
) -> None:
    """Before: a 32-px thumbnail fell back to the centre crop (cosine about 0.5). Crops and
    photos are embedded with the same detector."""
    photo_embeddings = embed_images(model, photos, detector=detector, progress=False).embeddings
    result = embed_images(model, tight_crops(photos, size), detector=detector, progress=False)
    cosines = (result.embeddings * photo_embeddings).sum(axis=1)
    assert CENTRE_FALLBACK not in set(result.routes)
    assert cosines.min() > least, f"{size} px: cosines {np.round(cosines, 3)}, {result.routes}"


def test_aligned_input_skips_detection(
    model: object, photos: list[np.ndarray], photo_embeddings: np.ndarray
) -> None:
    """insightface-style 112x112 crops (and the same at 224) embed like the photo."""
    detections = DETECTORS.create("mtcnn").detect(photos)
    template = np.asarray(ARCFACE_TEMPLATE_112)
    for size in (112, 224):
        crops = [
            warp_to_template(p, d.landmarks[main_face(d, p.shape)], template * size / 112, size)
            for p, d in zip(photos, detections, strict=True)
        ]
        result = embed_images(model, crops, input="aligned", progress=False)
        assert set(result.routes) == {ALIGNED}
        cosines = (result.embeddings * photo_embeddings).sum(axis=1)
        assert cosines.min() > 0.95, f"{size}: {np.round(cosines, 3)}"


def test_centre_fallback_is_never_silent(
    model: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blank = tmp_path / "wall.png"
    Image.new("RGB", (120, 120), (200, 190, 180)).save(blank)
    with caplog.at_level(logging.WARNING, logger="facelab.pipeline"):
        result = embed_images(model, [blank], no_face="centre", progress=False)
    assert result.routes.tolist() == [CENTRE_FALLBACK]
    assert any(
        str(blank) in r.getMessage() and CENTRE_FALLBACK in r.getMessage() for r in caplog.records
    )


# -- routes in outputs ------------------------------------------------------------------------


def test_routes_reach_cli_npz_and_verify(
    lfw: Path, photos: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from facelab.cli import main

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(photos[0]).save(folder / "photo.png")
    Image.fromarray(tight_crops(photos[:1], 32)[0]).save(folder / "thumb.png")
    out = tmp_path / "emb.npz"
    main(["embed", str(folder), "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["routes"] == {"detected": 1, "upsampled": 1}
    with np.load(out) as stored:
        assert dict(zip(stored["paths"].tolist(), stored["routes"].tolist(), strict=True)) == {
            str(folder / "photo.png"): "detected",
            str(folder / "thumb.png"): "upsampled",
        }
    main(["verify", "dlib_resnet", str(folder / "photo.png"), str(folder / "thumb.png")])
    reply = json.loads(capsys.readouterr().out)
    assert reply["routes"] == ["detected", "upsampled"]
    assert reply["score"] > 0.9
    det = DETECTORS.create("mtcnn").detect(photos[:1])[0]
    landmarks = det.landmarks[main_face(det, photos[0].shape)]
    aligned = warp_to_template(photos[0], landmarks, np.asarray(ARCFACE_TEMPLATE_112), 112)
    Image.fromarray(aligned).save(tmp_path / "aligned.png")
    main(["verify", "dlib_resnet", *[str(tmp_path / "aligned.png")] * 2, "--input", "aligned"])
    reply = json.loads(capsys.readouterr().out)
    assert reply["routes"] == ["aligned", "aligned"] and reply["score"] > 0.999


def test_gallery_finds_a_thumbnail_and_records_its_route(
    model: object, photos: list[np.ndarray], tmp_path: Path
) -> None:
    """Before: a 32-px face crop had no face for the gallery (no_face='error' refused it)."""
    from facelab.gallery import enroll, find_faces

    images = [photos[0], tight_crops(photos[:1], 32)[0]]
    faces = find_faces(model, images)
    assert [f.route for f in faces] == ["detected", "upsampled"]
    assert float(faces[0].embedding @ faces[1].embedding) > 0.93
    report = enroll(tmp_path / "g.db", model, "Tony Blair", images, progress=False)
    assert report.enrolled == {"Tony Blair": 2}
    assert report.routes == {"detected": 1, "upsampled": 1}


def test_server_replies_carry_the_route(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from serving import KEYS, READ, png, tiny_model, upload

    from facelab.serve import ServeConfig, create_app

    app = create_app(tiny_model(), ServeConfig(gallery=tmp_path / "gallery.db", keys=KEYS))
    with TestClient(app) as client:
        reply = client.post("/v1/embed", files=[upload("image", png(0))], headers=READ)
    assert reply.status_code == 200, reply.text
    assert [f["route"] for f in reply.json()["faces"]] == ["centre_crop"]


class SeesOnlyLarge:
    """A detector that finds nothing in images under `side` pixels: forces the later routes."""

    def __init__(self, side: int, detector: str = "mtcnn") -> None:
        self.side, self.detector = side, DETECTORS.create(detector)

    def detect(self, images: list[np.ndarray]) -> list[object]:
        found = self.detector.detect(images)
        empty = self.detector.detect([np.zeros((16, 16, 3), np.uint8)])[0]
        pairs = zip(images, found, strict=True)
        return [d if min(im.shape[:2]) >= self.side else empty for im, d in pairs]


@pytest.mark.parametrize("detector", ["mtcnn", "blazeface"])
@pytest.mark.parametrize(("side", "route"), [(200, "padded"), (10_000, "whole_frame")])
def test_later_routes_align_the_face(
    model: object,
    photos: list[np.ndarray],
    photo_embeddings: np.ndarray,
    side: int,
    route: str,
    detector: str,
) -> None:
    """Faces found in the padded view are mapped back to the crop's pixels, and dlib's shape
    model on the whole frame aligns a crop the detector cannot see (with either detector)."""
    crops = tight_crops(photos, 112)
    result = embed_images(model, crops, detector=SeesOnlyLarge(side, detector), progress=False)
    assert set(result.routes) == {route}
    cosines = (result.embeddings * photo_embeddings).sum(axis=1)
    assert cosines.min() > 0.95, f"{route}: {np.round(cosines, 3)}"


class MissesTheOriginal:
    """MTCNN that finds nothing in images of one shape (the photo as given): forces a retry."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.mtcnn, self.seen = shape, DETECTORS.create("mtcnn"), []

    def detect(self, images: list[np.ndarray]) -> list[object]:
        self.seen += [im.shape for im in images]
        found = self.mtcnn.detect(images)
        empty = self.mtcnn.detect([np.zeros((16, 16, 3), np.uint8)])[0]
        return [empty if im.shape == self.shape else d for im, d in zip(images, found, strict=True)]


def test_a_large_photo_is_padded_at_a_bounded_size(
    model: object, photos: list[np.ndarray], photo_embeddings: np.ndarray
) -> None:
    """Padding a 700x700 crop at full size gave the detector 1400x1400 pixels (a large photo
    without a face: many times its own cost); the padded view is reduced to 640 and what is
    found there is mapped back to the crop's pixels."""
    crop = tight_crops(photos[:1], 700)[0]
    detector = MissesTheOriginal(crop.shape)
    result = embed_images(model, [crop], detector=detector, progress=False)
    assert result.routes.tolist() == ["padded"]
    assert detector.seen == [(700, 700, 3), (640, 640, 3)]  # the crop, then the padded view
    assert float(result.embeddings[0] @ photo_embeddings[0]) > 0.95


def test_data_check_lists_a_fifo_without_hanging(tmp_path: Path) -> None:
    from facelab.data.check import check_dataset

    person = tmp_path / "data" / "Ada"
    person.mkdir(parents=True)
    Image.fromarray(colourful()).save(person / "Ada_0001.png")
    os.mkfifo(person / "Ada_0002.jpg")
    outcome: dict[str, object] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(check=check_dataset({"all": tmp_path / "data"})),
        daemon=True,
    )
    worker.start()
    worker.join(20)
    try:
        assert not worker.is_alive(), "data check blocked on the FIFO"
    finally:
        try:  # unblock a reader stuck in open() (the bug)
            os.close(os.open(person / "Ada_0002.jpg", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    unreadable = dict(outcome["check"].unreadable)
    assert list(unreadable) == [str(person / "Ada_0002.jpg")]
    assert "not a regular file" in unreadable[str(person / "Ada_0002.jpg")]


def test_a_face_the_frame_cuts_is_aligned_on_the_whole_frame(
    model: object, photos: list[np.ndarray], photo_embeddings: np.ndarray
) -> None:
    """Brow-to-chin crops (cheeks cut): the detector still finds the face, but its box
    overflows the frame, so dlib's shape model on the whole frame places the points."""
    result = embed_images(model, tight_crops(photos, 112, side=0.85), progress=False)
    assert set(result.routes) == {"whole_frame"}
    cosines = (result.embeddings * photo_embeddings).sum(axis=1)
    assert cosines.min() > 0.95, np.round(cosines, 3)


def test_unreadable_bytes_are_named_without_object_addresses() -> None:
    """Pillow's reason names its in-memory buffer (`<_io.BytesIO object at 0x...>`): the message
    names the input instead, and shows no address (the server passes it to clients)."""
    with pytest.raises(ImageError) as caught:
        decode_image(b"not an image" * 8, "upload.jpg")
    message = str(caught.value)
    assert message.startswith("upload.jpg: not a readable image") and "0x" not in message
