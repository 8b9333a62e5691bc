"""Hostile and unlucky inputs (issue 21): model files that would run code, damaged checkpoints,
cross-site requests, costly uploads, wrong keys, a busy gallery and a crash mid-enrollment.
Each test failed before its fix; all run in seconds."""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from serving import KEYS, READ, RO, RW, WRITE, png, tiny_model, upload

import facelab
from facelab import api
from facelab.cli import _model_source, main
from facelab.gallery import GalleryStore, enroll
from facelab.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.serve import ApiKeys, KeyConfigError, ServeConfig, create_app
from facelab.serve.security import FailureLimiter

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
