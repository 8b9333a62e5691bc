"""Hostile and unlucky inputs (issue 21): model files that would run code, damaged checkpoints,
cross-site requests, costly uploads, wrong keys, a busy gallery and a crash mid-enrollment.
Each test failed before its fix; all run in seconds."""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from serving import KEYS, READ, RO, RW, WRITE, live_server, png, tiny_model, upload

import facelab
from facelab import api
from facelab.cli import _model_source, main
from facelab.gallery import GalleryStore, enroll
from facelab.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from facelab.models.detectors.mtcnn import Detections
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess
from facelab.models.registry import DETECTORS
from facelab.serve import ApiKeys, KeyConfigError, ServeConfig, create_app
from facelab.serve.app import run
from facelab.serve.security import FailureLimiter, HeaderTimeoutProtocol

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Payload:
    """A pickle that, when unpickled with weights_only=False, creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save({"kind": "facelab-checkpoint", "schema": 1, "model": Payload(marker)}, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def face_png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# -- 1. loading a model never runs code; checkpoints carry a checksum ---------------------------


def test_a_pickle_named_like_a_model_in_the_cwd_is_never_read(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hostile_pickle(tmp_path / "dlib_resnet", marker)
    assert facelab.load_model("dlib_resnet").name == "dlib_resnet"
    assert _model_source(argparse.Namespace(model="dlib_resnet")) == "dlib_resnet"
    assert not marker.exists()


def test_a_pickle_as_a_checkpoint_path_is_refused(tmp_path: Path, marker: Path) -> None:
    evil = hostile_pickle(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused: .*posix\.system"):
        facelab.load_model(evil)
    image = face_png(tmp_path / "a.png")
    assert main(["verify", str(evil), str(image), str(image)]) == 2
    assert main(["eval", str(evil), str(image)]) == 2
    assert not marker.exists()


def test_a_gallery_naming_a_pickle_as_its_model_never_runs_it(tmp_path: Path, marker: Path) -> None:
    gallery = tmp_path / "g.db"
    image = face_png(tmp_path / "a.png")
    enroll(gallery, tiny_model(), "ada", [image], progress=False)
    with GalleryStore(gallery) as store:
        store.set_model_source(str(hostile_pickle(tmp_path / "source.pt", marker)))
    assert main(["identify", "--gallery", str(gallery), str(image)]) == 2
    assert main(["enroll", "--gallery", str(gallery), "--name", "bob", str(image)]) == 2
    assert not marker.exists()


def flip_bits(path: Path, region: bytes, bits: int, seed: int = 0) -> None:
    """Flip `bits` random bits inside the first occurrence of `region` in the file."""
    raw = bytearray(path.read_bytes())
    start = raw.find(region)
    assert start >= 0
    rng = random.Random(seed)
    for offset in rng.sample(range(len(region) * 8), bits):
        raw[start + offset // 8] ^= 1 << (offset % 8)
    path.write_bytes(bytes(raw))


def test_flipped_bits_in_the_weights_are_a_named_error(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(tmp_path / "tiny.pt", model)
    weights = max(model.backbone.state_dict().values(), key=lambda t: t.numel())
    flip_bits(path, weights.numpy().tobytes(), bits=20)
    with pytest.raises(CheckpointError, match=r"tiny\.pt: checksum mismatch"):
        load_checkpoint(path)


def test_training_state_round_trips_as_plain_types(tmp_path: Path) -> None:
    """What the trainer saves (NumPy RNG state, NumPy numbers in the history, optimizer state)
    loads under weights_only and restores the same random streams."""
    from facelab.train.loop import rng_state, set_rng_state

    model = tiny_model()
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.1, momentum=0.9)
    model.backbone(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(
        tmp_path / "run.pt",
        model,
        rng=state,
        optimizer=optimizer.state_dict(),
        history=[{"epoch": np.int64(1), "auc": np.float64(0.9)}],
    )
    payload = load_checkpoint(path)
    assert payload["history"] == [{"epoch": 1, "auc": 0.9}]
    set_rng_state(payload["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    optimizer.load_state_dict(payload["optimizer"])


def test_an_older_checkpoint_with_numpy_state_still_loads(tmp_path: Path) -> None:
    """Written before checksums and plain types (torch.save of NumPy objects): readable, safe."""
    model = tiny_model()
    old = {
        "kind": "facelab-checkpoint",
        "schema": 1,
        "model": model.describe(),
        "model_state": model.backbone.state_dict(),
        "rng": {"numpy": np.random.get_state()},
        "history": [{"auc": np.float64(0.5)}],
    }
    torch.save(old, tmp_path / "old.pt")
    assert api.load_model(tmp_path / "old.pt").fingerprint() == model.fingerprint()


# -- 2. no cross-site writes, no foreign host names -----------------------------------------------

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return tiny_model()


def serve(model: FaceModel, tmp_path: Path, base_url: str = LOCAL, **options: object) -> TestClient:
    keyed = {} if options.get("insecure_local") else {"keys": KEYS}
    config = ServeConfig(gallery=tmp_path / "gallery.db", **{**keyed, **options})  # type: ignore[arg-type]
    return TestClient(create_app(model, config), base_url=base_url)


def post_enroll(client: TestClient, name: str, headers: dict[str, str], seed: int = 0) -> Response:
    files = [upload("images", png(seed))]
    return client.post("/v1/enroll", data={"name": name}, files=files, headers=headers)


def enrolled(client: TestClient, headers: dict[str, str] | None = None) -> list[str]:
    r = client.get("/v1/identities", headers=headers or {})
    return [i["name"] for i in r.json()["identities"]]


CROSS_SITE = (
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:9999"},
    {"Referer": "http://evil.example/page.html"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": LOCAL},
)


def test_insecure_local_refuses_cross_site_writes(model: FaceModel, tmp_path: Path) -> None:
    with serve(model, tmp_path, insecure_local=True) as client:
        for headers in CROSS_SITE:
            r = post_enroll(client, "Mallory", headers)
            assert (r.status_code, r.json()["error"]) == (403, "cross_origin"), headers
            r = client.delete("/v1/identities/Mallory", headers=headers)
            assert r.status_code == 403
        assert enrolled(client) == []
        same = {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}
        assert post_enroll(client, "Ada", same).status_code == 200
        assert post_enroll(client, "Alan", {}, seed=1).status_code == 200  # curl: no Origin
        assert enrolled(client) == ["Ada", "Alan"]


def test_insecure_local_answers_to_loopback_host_names_only(
    model: FaceModel, tmp_path: Path
) -> None:
    """DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    with serve(model, tmp_path, insecure_local=True) as client:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = client.get("/v1/identities", headers={"Host": host})
            assert (r.status_code, r.json()["error"]) == (421, "wrong_host"), host
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/v1/identities", headers={"Host": host}).status_code == 200
    with serve(model, tmp_path, insecure_local=True, allowed_hosts=("faces.lan",)) as client:
        assert client.get("/v1/identities", headers={"Host": "faces.lan:8000"}).status_code == 200


def test_keyed_mode_refuses_cross_site_writes_too(model: FaceModel, tmp_path: Path) -> None:
    with serve(model, tmp_path) as client:
        for headers in CROSS_SITE:
            assert post_enroll(client, "Mallory", {**WRITE, **headers}).status_code == 403
        assert post_enroll(client, "Ada", {**WRITE, "Origin": LOCAL}).status_code == 200
        # no host names configured: a keyed server answers to any (the key protects it)
        assert client.get("/v1/identities", headers={**READ, "Host": "x.example"}).is_success
    with serve(model, tmp_path, allowed_hosts=("faces.example",)) as client:
        assert (
            client.get("/v1/identities", headers={**READ, "Host": "x.example"}).status_code == 421
        )
        ok = client.get("/v1/identities", headers={**READ, "Host": "faces.example"})
        assert enrolled(client, {**READ, "Host": "faces.example"}) == ["Ada"] and ok.is_success


# -- keys: '#' inside a key, wrong-key throttling ------------------------------------------------


def test_a_key_containing_a_hash_is_read_whole() -> None:
    key = "rw-key#0123456789abcdef"
    keys = ApiKeys.parse([f"rw:{key}", f"ro:{RO} # the kiosk", "# a comment"], "test")
    assert keys.role(key) == "rw" and keys.role("rw-key") is None and keys.role(RO) == "ro"
    with pytest.raises(KeyConfigError, match="entry 1: a key cannot contain blanks"):
        ApiKeys.parse([f"rw:{RW} trailing"], "test")


def test_wrong_keys_are_throttled(model: FaceModel, tmp_path: Path) -> None:
    limiter = FailureLimiter(limit=5, window=60)
    with serve(model, tmp_path, key_failures=limiter) as client:
        for n in range(5):
            guess = {"X-API-Key": f"guess-{n:020d}"}
            assert client.get("/v1/identities", headers=guess).status_code == 401
        r = client.get("/v1/identities", headers={"X-API-Key": "guess-again-0000000"})
        assert (r.status_code, r.json()["error"]) == (429, "too_many_failures")
        assert 0 < int(r.headers["Retry-After"]) <= 60
        assert client.get("/v1/identities", headers=READ).status_code == 429  # no oracle
    assert limiter.retry_after("another-client") == 0


def test_failure_limiter_forgets_after_its_window() -> None:
    limiter = FailureLimiter(limit=2, window=0.2)
    limiter.fail("a")
    limiter.fail("a")
    assert limiter.retry_after("a") > 0
    time.sleep(0.25)
    assert limiter.retry_after("a") == 0


# -- error details name no server path and no object address ------------------------------------


def test_error_details_leak_no_server_path(model: FaceModel, tmp_path: Path) -> None:
    with serve(model, tmp_path) as client:
        assert post_enroll(client, "Ada", WRITE).status_code == 200
        r = client.post(
            "/v1/identify", data={"far": "0.01"}, files=[upload("image", png(0))], headers=READ
        )
        assert r.status_code == 422 and "gallery.db" in r.json()["detail"]
        bad = client.post("/v1/embed", files=[upload("image", b"garbage" * 9)], headers=READ)
        assert bad.status_code == 422 and "not a readable image" in bad.json()["detail"]
        for reply in (r, bad):
            assert str(tmp_path) not in reply.text and "/tmp" not in reply.text
            assert not re.search(r"0x[0-9a-f]{6,}", reply.text), reply.text


# -- a busy gallery is a 503, at once ------------------------------------------------------------


def test_a_gallery_locked_by_another_process_is_busy(model: FaceModel, tmp_path: Path) -> None:
    with serve(model, tmp_path, busy_seconds=0.3) as client:
        assert post_enroll(client, "Ada", WRITE).status_code == 200
        holder = sqlite3.connect(tmp_path / "gallery.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
        try:
            tick = time.monotonic()
            r = post_enroll(client, "Alan", WRITE, seed=1)
            assert time.monotonic() - tick < 10
            assert (r.status_code, r.json()["error"]) == (503, "gallery_busy")
            assert r.headers["Retry-After"] == "1"
            assert client.get("/v1/identities", headers=READ).status_code == 200  # reads go on
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert post_enroll(client, "Alan", WRITE, seed=1).status_code == 200


# -- 3. bounded work per request -------------------------------------------------------------------


def blank_png(width: int, height: int) -> bytes:
    """A few KB that declare width x height pixels (a 1-bit blank image)."""
    buf = io.BytesIO()
    Image.new("1", (width, height), 1).save(buf, "PNG", optimize=True)
    return buf.getvalue()


class GridDetector:
    """Finds `faces` small faces on a grid in any image, recording the shapes it was given and
    taking `seconds` per call (a detector's cost)."""

    def __init__(self, faces: int, seconds: float = 0.0) -> None:
        self.faces, self.seconds, self.shapes = faces, seconds, []

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        time.sleep(self.seconds)
        out = []
        for image in images:
            self.shapes.append(image.shape)
            h, w = image.shape[:2]
            side = min(h, w) / 10
            boxes = np.array(
                [[(i % 8) * side, (i // 8) * side, (i % 8 + 1) * side, (i // 8 + 1) * side]
                 for i in range(self.faces)],
                np.float32,
            )  # fmt: skip
            centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
            marks = centre + np.array([[-2, -2], [2, -2], [0, 0], [-2, 2], [2, 2]], np.float32)
            out.append(Detections(boxes, np.ones(self.faces, np.float32), marks))
        return out


def aligned_model() -> FaceModel:
    template = tuple(
        (x * 32, y * 32) for x, y in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
    )
    torch.manual_seed(0)
    preprocess = Preprocess(size=32, alignment="five_point", template=template)
    return FaceModel.create(
        "mobilefacenet", preprocess=preprocess, embedding_dim=32, input_size=32
    ).eval()


def with_detector(monkeypatch: pytest.MonkeyPatch, detector: GridDetector) -> None:
    monkeypatch.setattr(DETECTORS, "create", lambda name, **_: detector)


def test_a_request_over_its_pixel_budget_is_refused_unread(
    model: FaceModel, tmp_path: Path
) -> None:
    big = blank_png(2000, 2000)  # 4 Mpx in about a kilobyte
    assert len(big) < 5000
    with serve(model, tmp_path, max_request_pixels=10_000_000) as client:
        files = [upload("images", big) for _ in range(3)]
        r = client.post("/v1/enroll", data={"name": "Ada"}, files=files, headers=WRITE)
        assert r.status_code == 413 and "pixel limit of one request" in r.json()["detail"]
        assert enrolled(client, READ) == []
        ok = client.post("/v1/enroll", data={"name": "Ada"}, files=files[:2], headers=WRITE)
        assert ok.status_code == 200


def test_images_are_reduced_before_detection_and_faces_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = GridDetector(faces=50)
    with_detector(monkeypatch, detector)
    with serve(aligned_model(), tmp_path, max_side=1000, max_faces=7) as client:
        r = client.post(
            "/v1/embed",
            data={"all_faces": "true"},
            files=[upload("image", blank_png(4000, 3000))],
            headers=READ,
        )
    assert r.status_code == 200, r.text
    assert detector.shapes == [(750, 1000, 3)]
    faces = r.json()["faces"]
    assert len(faces) == 7
    side = 75 * 4  # a detected face's side at working size, in original pixels
    assert all(f["box"][2] - f["box"][0] == pytest.approx(side, rel=1e-3) for f in faces)
    assert max(f["box"][3] for f in faces) > 750  # original coordinates, not working ones


def test_a_request_over_its_time_limit_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_detector(monkeypatch, GridDetector(faces=1, seconds=0.5))
    with serve(aligned_model(), tmp_path, request_seconds=0.2) as client:
        r = post_enroll(client, "Ada", WRITE)
        assert (r.status_code, r.json()["error"]) == (503, "timeout")
        assert "at detection" in r.json()["detail"]
        assert enrolled(client, READ) == []


# -- stalled connections ---------------------------------------------------------------------------


class QuickHeaderTimeout(HeaderTimeoutProtocol):
    header_timeout = 0.5


def closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        while data := conn.recv(4096):
            if b"408" in data:
                return True
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_stalled_connections_are_closed(model: FaceModel, tmp_path: Path) -> None:
    config = ServeConfig(gallery=tmp_path / "g.db", keys=KEYS, read_seconds=0.5)
    with live_server(create_app(model, config), http=QuickHeaderTimeout) as url:
        port = int(url.rsplit(":", 1)[1])
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]
        partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]
        for conn in partial:
            conn.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-")
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + RO.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"ima"
        )  # fmt: skip
        assert all(closed_by_server(c, within=5) for c in silent + partial)
        reply = b""
        trickle.settimeout(5)
        while chunk := trickle.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        for conn in [*silent, *partial, trickle]:
            conn.close()


# -- 4. kept photos and gallery rows are one unit, even across a kill -----------------------------

CRASHING_ENROLL = """
import os, signal, sys
from pathlib import Path
from fastapi.testclient import TestClient
from serving import KEYS, WRITE, png, tiny_model, upload
import facelab.serve.app as served
from facelab.serve import ServeConfig, create_app

root, name, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = ServeConfig(gallery=root / "g.db", keys=KEYS, keep_dir=root / "kept")
client = TestClient(create_app(tiny_model(), config))
def keep(name, *seeds, **extra):
    files = [upload("images", png(s)) for s in seeds]
    data = {"name": name, "keep_images": "true", **extra}
    return client.post("/v1/enroll", data=data, files=files, headers=WRITE)
assert keep("Ada", 0).status_code == 200
def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "before_commit":
    served.enroll = kill
else:
    served.kept.settle = kill
keep(name, 1, 2, append="true")
"""


def run_until_killed(root: Path, name: str, point: str) -> None:
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_ENROLL, str(root), name, point],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]


def orphans(gallery: Path, keep_dir: Path) -> list[Path]:
    """Kept files no gallery row refers to (by name folder and image sha256)."""
    with GalleryStore(gallery) as store:
        rows = {
            i.name: {sha[:24] for _, sha, _ in store.images(i.name)} for i in store.identities()
        }
    return [
        p
        for p in keep_dir.rglob("*")
        if p.is_file() and p.name.split(".", 1)[0] not in rows.get(p.parent.name, set())
    ]


@pytest.mark.parametrize(
    ("name", "point", "after"),
    [
        ("Bob", "before_commit", {"Ada": 1}),  # a new name: nothing enrolled, nothing kept
        ("Bob", "after_commit", {"Ada": 1, "Bob": 2}),  # enrolled: its photos stay, deletable
        ("Ada", "before_commit", {"Ada": 1}),  # append cut short: Ada's own photo only
    ],
)
def test_a_kill_mid_enrollment_leaves_no_photo_without_a_row(
    model: FaceModel, tmp_path: Path, name: str, point: str, after: dict[str, int]
) -> None:
    run_until_killed(tmp_path, name, point)
    leftovers = orphans(tmp_path / "g.db", tmp_path / "kept")
    assert leftovers  # what the kill left: photos no row refers to (pending names)
    config = ServeConfig(gallery=tmp_path / "g.db", keys=KEYS, keep_dir=tmp_path / "kept")
    with TestClient(create_app(model, config)) as client:  # start-up reconciles
        assert orphans(tmp_path / "g.db", tmp_path / "kept") == []
        files = Counter(p.parent.name for p in (tmp_path / "kept").rglob("*") if p.is_file())
        assert files == after
        for person, count in after.items():
            r = client.delete(f"/v1/identities/{person}", headers=WRITE)
            assert r.status_code == 200 and r.json()["files"] == count, r.text
        assert client.delete("/v1/identities/Bob", headers=WRITE).status_code == 404
        assert list((tmp_path / "kept").rglob("*")) == []


def test_facelab_serve_runs_with_the_header_timeout(
    model: FaceModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` (what `facelab serve` calls) hands uvicorn the protocol tested above."""
    given: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: given.update(options))
    run(model, ServeConfig(gallery=tmp_path / "g.db", keys=KEYS), port=8123)
    assert given["http"] is HeaderTimeoutProtocol and given["timeout_keep_alive"] == 5
    assert HeaderTimeoutProtocol.header_timeout == 10.0
