"""`facelab serve`: keys and roles, both body formats, the gallery round trip through the same
functions as the CLI, limits (413/415/422), nothing written to disk, and dynamic batching;
in-process on a tiny randomly initialised model."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving import KEYS, READ, RO, RW, WRITE, png, png_header, tiny_model, upload

from facelab.cli import main
from facelab.gallery import GalleryStore, find_faces, identify
from facelab.models.checkpoint import save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.serve import ApiKeys, KeyConfigError, ServeConfig, create_app
from facelab.serve.app import run
from facelab.serve.batching import BatchedFaceModel, BatchQueue, InFlight

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return tiny_model()


@pytest.fixture()
def client(model: FaceModel, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(model, ServeConfig(gallery=tmp_path / "gallery.db", keys=KEYS))
    with TestClient(app) as c:
        yield c


def enroll(client: TestClient, name: str, *seeds: int, **fields: str) -> dict:
    files = [upload("images", png(s)) for s in seeds]
    r = client.post("/v1/enroll", data={"name": name, **fields}, files=files, headers=WRITE)
    assert r.status_code == 200, r.text
    return r.json()


# -- keys -----------------------------------------------------------------------------------------


def test_refuses_to_start_without_a_key(model: FaceModel, tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="no API key"):
        create_app(model, ServeConfig(gallery=tmp_path / "g.db"))
    local = ServeConfig(gallery=tmp_path / "g.db", insecure_local=True)
    with pytest.raises(KeyConfigError, match="127.0.0.1 only"):
        run(model, local, host="0.0.0.0")


def test_cli_refuses_to_serve_without_a_key(
    model: FaceModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("FACELAB_API_KEYS", raising=False)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    assert main(["serve", "--model", str(checkpoint), "--gallery", str(tmp_path / "g.db")]) == 2
    assert "no API key configured" in caplog.text
    local = ["serve", "--model", str(checkpoint), "--insecure-local", "--host", "0.0.0.0"]
    assert main(local) == 2
    assert "127.0.0.1 only" in caplog.text


def test_cli_serves_with_onnxruntime_unless_told(
    model: FaceModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`facelab serve` embeds with onnxruntime by default (the faster runtime for a request's
    few faces) and with PyTorch given `--runtime torch`; the answers agree."""
    import uvicorn

    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    apps: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    serve = ["serve", "--model", str(checkpoint), "--insecure-local"]
    assert main([*serve, "--gallery", str(tmp_path / "a.db")]) == 0
    assert main([*serve, "--gallery", str(tmp_path / "b.db"), "--runtime", "torch"]) == 0
    answers = []
    for app, runtime in zip(apps, ["onnx", "torch"], strict=True):
        with TestClient(app, base_url="http://127.0.0.1") as client:  # a local-only server
            assert client.get("/v1/info").json()["runtime"] == runtime
            reply = client.post("/v1/embed", files=[upload("image", png(3))])
            answers.append(reply.json()["faces"][0]["embedding"])
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-4)


def test_search_options_reach_the_replica_and_are_checked_first(
    model: FaceModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--search-option` is checked before the model loads (a missing checkpoint is not what
    gets reported), and ServeConfig.search_options reach the replica's index."""
    serve = ["serve", "--model", str(tmp_path / "absent.pt"), "--insecure-local"]
    serve += ["--gallery", str(tmp_path / "g.db"), "--search", "ivfpq"]
    assert main([*serve, "--search-option", "ef_search=64"]) == 2
    assert "search method 'ivfpq' has no option 'ef_search'; known: nlist, nprobe" in caplog.text
    assert "absent.pt" not in caplog.text
    with pytest.raises(SystemExit):
        main([*serve, "--search-option", "nprobe"])
    config = ServeConfig(gallery=tmp_path / "g.db", keys=KEYS, search="hnsw")
    with pytest.raises(ValueError, match="'hnsw' has no option 'nprobe'"):
        create_app(model, replace(config, search_options={"nprobe": 8}))


def test_keys_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FACELAB_API_KEYS", f"rw:{RW}, ro:{RO}")
    keys = ApiKeys.load()
    assert (keys.role(RW), keys.role(RO), keys.role("nope"), keys.role(None)) == (
        "rw",
        "ro",
        None,
        None,
    )
    path = tmp_path / "keys"
    path.write_text(f"# deployment keys\nro:{RO}  # the kiosk\n")
    assert ApiKeys.load(path).roles == ((RO, "ro"),)
    for bad in ("admin:" + RW, RW, "rw:short"):
        with pytest.raises(KeyConfigError):
            ApiKeys.parse([bad], "test")


def test_keys_and_roles(client: TestClient) -> None:
    image = [upload("image", png(0))]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/").status_code == 200
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789"}, {"Authorization": "Bearer x"}):
        r = client.post("/v1/embed", files=image, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/embed", files=image, headers=READ).status_code == 200
    assert client.get("/v1/identities", headers=READ).status_code == 200
    r = client.post(
        "/v1/enroll", data={"name": "Ada"}, files=[upload("images", png(0))], headers=READ
    )
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    assert client.delete("/v1/identities/Ada", headers=READ).status_code == 403
    # 401 comes before any look at the request itself
    assert client.delete("/v1/identities/%20Ada").status_code == 401


# -- the API ------------------------------------------------------------------------------------


def test_multipart_and_base64_json_agree(client: TestClient, model: FaceModel) -> None:
    data = png(3)
    by_form = client.post("/v1/embed", files=[upload("image", data)], headers=READ).json()
    text = base64.b64encode(data).decode()
    by_json = client.post("/v1/embed", json={"image": text}, headers=READ).json()
    by_url = client.post(
        "/v1/embed", json={"image": "data:image/png;base64," + text}, headers=READ
    ).json()
    expected = find_faces(model, [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])
    for got in (by_form, by_json, by_url):
        assert got["fingerprint"] == model.fingerprint()
        (face,) = got["faces"]
        np.testing.assert_allclose(face["embedding"], expected[0].embedding, atol=1e-5)


def test_gallery_round_trip(client: TestClient, model: FaceModel, tmp_path: Path) -> None:
    assert enroll(client, "Ada Lovelace", 1, 2) == {
        "identity": "Ada Lovelace",
        "faces": 2,
        "images": 2,
        "kept": [],
    }
    enroll(client, "Alan Turing", 3)
    r = client.post(
        "/v1/enroll", data={"name": "Alan Turing"}, files=[upload("images", png(4))], headers=WRITE
    )
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    assert enroll(client, "Alan Turing", 4, append="true")["faces"] == 1
    listed = client.get("/v1/identities", headers=READ).json()["identities"]
    assert [(i["name"], i["images"]) for i in listed] == [("Ada Lovelace", 2), ("Alan Turing", 2)]

    # 1:1, two images: no threshold anywhere -> the score only
    r = client.post(
        "/v1/verify", files=[upload("image_a", png(1)), upload("image_b", png(1))], headers=READ
    ).json()
    assert r["score"] == pytest.approx(1.0, abs=1e-5) and r["decision"] is None
    assert [f["image"] for f in r["faces"]] == ["image_a", "image_b"]
    # 1:1 claims against the gallery
    claim = {"identity": "Ada Lovelace", "threshold": "0.999"}
    r = client.post("/v1/verify", data=claim, files=[upload("image", png(2))], headers=READ).json()
    assert (r["decision"], r["identity"]) == ("accept", "Ada Lovelace")
    r = client.post("/v1/verify", data=claim, files=[upload("image", png(3))], headers=READ).json()
    assert r["decision"] == "reject"
    missing = {"identity": "Nobody", "threshold": "0.5"}
    r = client.post("/v1/verify", data=missing, files=[upload("image", png(3))], headers=READ)
    assert r.status_code == 404
    r = client.post("/v1/verify", files=[upload("image", png(3))], headers=READ)
    assert r.status_code == 422  # an image without a claimed identity

    # 1:N: the server's answer is the gallery's own identify() on the same file
    r = client.post(
        "/v1/identify",
        data={"threshold": "0.99", "k": "2"},
        files=[upload("image", png(3))],
        headers=READ,
    )
    (face,) = r.json()["faces"]
    image = np.asarray(Image.open(io.BytesIO(png(3))).convert("RGB"))
    (direct,) = identify(tmp_path / "gallery.db", model, [image], k=2, threshold=0.99)
    assert face["identity"] == direct.identity == "Alan Turing"
    assert [c["identity"] for c in face["candidates"]] == [m.identity for m in direct.candidates]
    assert face["score"] == pytest.approx(direct.score, abs=1e-5)
    r = client.post("/v1/identify", files=[upload("image", png(9))], headers=READ)
    assert r.status_code == 422 and "no calibrated threshold" in r.json()["detail"]
    r = client.post(
        "/v1/identify", data={"threshold": "1"}, files=[upload("image", png(9))], headers=READ
    )
    assert r.json()["faces"][0]["identity"] == "unknown"

    r = client.delete("/v1/identities/Ada%20Lovelace", headers=WRITE)
    assert r.json() == {"removed": "Ada Lovelace", "images": 2, "files": 0}
    assert client.delete("/v1/identities/Ada%20Lovelace", headers=WRITE).status_code == 404


def test_names_are_validated(client: TestClient) -> None:
    for name in ["../etc", "a/b", " Ada", "Ada ", "", ".", "x" * 101, "a\nb", "unknown"]:
        files = [upload("images", png(0))]
        r = client.post("/v1/enroll", data={"name": name}, files=files, headers=WRITE)
        assert r.status_code == 422, name
        assert set(r.json()) == {"error", "detail"}
        # "unknown" passes the pattern but is the word decisions use: the gallery refuses it
        assert r.json()["error"] == ("refused" if name == "unknown" else "invalid_request")
    assert client.get("/v1/identities", headers=READ).json() == {"identities": []}


def test_limits_and_content(model: FaceModel, tmp_path: Path) -> None:
    config = ServeConfig(
        gallery=tmp_path / "g.db", keys=KEYS, max_upload_bytes=50_000, max_pixels=10_000
    )
    with TestClient(create_app(model, config)) as client:

        def embed(headers: dict[str, str] = READ, **kwargs: object) -> tuple[int, str]:
            r = client.post("/v1/embed", headers=headers, **kwargs)
            assert r.headers["content-type"] == "application/json"
            return r.status_code, r.json()["error"]

        assert embed(files=[upload("image", png(0, size=200))]) == (413, "payload_too_large")

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"image": "'
            for _ in range(100):
                yield b"A" * 1000
            yield b'"}'

        streamed = {"content": chunks(), "headers": READ | {"content-type": "application/json"}}
        r = client.post("/v1/embed", **streamed)
        assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
        assert embed(files=[upload("image", png(0, size=101))]) == (413, "image_too_large")
        assert embed(files=[upload("image", png_header(200_000, 200_000))]) == (
            413,
            "image_too_large",
        )
        assert embed(files=[upload("image", b"hello", "text/plain")]) == (
            415,
            "unsupported_media_type",
        )
        assert embed(content=b"image=1", headers=READ | {"content-type": "text/plain"}) == (
            415,
            "unsupported_media_type",
        )
        assert embed(files=[upload("image", b"GIF89a not really")]) == (422, "invalid_image")
        assert embed(json={"image": "***"}) == (422, "invalid_base64")
        assert embed(json={"image": 5}) == (422, "invalid_request")
        assert embed(json=["image"]) == (422, "invalid_json")
        deep = b"[" * 20_000 + b"]" * 20_000  # nesting too deep for the JSON parser
        assert embed(content=deep, headers=READ | {"content-type": "application/json"}) == (
            422,
            "invalid_json",
        )
        assert embed(json={"image": base64.b64encode(png(0)).decode(), "k": 5}) == (
            422,
            "invalid_request",
        )
        assert embed(files=[upload("image", png(0)), upload("image", png(1))]) == (
            422,
            "invalid_request",
        )
        assert client.get("/v1/nothing").json()["error"] == "not_found"
        assert client.put("/healthz").json()["error"] == "method_not_allowed"


def test_nothing_written_unless_kept(
    model: FaceModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    served = tmp_path / "served"
    config = ServeConfig(gallery=served / "gallery.db", keys=KEYS)
    big = png(5, size=700)  # over 1 MB: form parsers that spool would write it to disk
    assert len(big) > 1024 * 1024
    with TestClient(create_app(model, config)) as client:
        r = client.post(
            "/v1/enroll", data={"name": "Ada"}, files=[upload("images", big)], headers=WRITE
        )
        assert r.status_code == 200
        client.post(
            "/v1/identify", data={"threshold": "0.5"}, files=[upload("image", big)], headers=READ
        )
        assert list(spool.iterdir()) == []
        assert sorted(
            p.name for p in served.iterdir() if not p.name.endswith(("-wal", "-shm"))
        ) == ["gallery.db"]
        kept = enroll(client, "Alan", 1, 1, keep_images="true")["kept"]
        assert len(kept) == 1  # the same photo twice: one content-addressed file
        assert (served / "gallery.db.images" / kept[0]).read_bytes() == png(1)
        with GalleryStore(served / "gallery.db") as store:
            assert store.images("Alan")[0][1].startswith(Path(kept[0]).stem)  # file <-> row
        assert client.delete("/v1/identities/Alan", headers=WRITE).json()["files"] == 1
        assert not (served / "gallery.db.images" / "Alan").exists()


# -- batching -----------------------------------------------------------------------------------


def test_batch_queue_batches_and_isolates_failures() -> None:
    def square(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("bad item")
        return [i * i for i in items]

    queue: BatchQueue[int, int] = BatchQueue(square, max_batch=8, max_wait=0.05)
    results: dict[int, list[int]] = {}
    failures: list[int] = []

    def client(n: int) -> None:
        try:
            results[n] = queue.submit([n, n + 100])
        except ValueError:
            failures.append(n)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    threads.append(threading.Thread(target=lambda: client(-1)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.close()
    assert results == {n: [n * n, (n + 100) ** 2] for n in range(12)}
    assert failures == [-1]
    assert queue.stats.largest > 1 and queue.stats.largest <= 8

    serial: BatchQueue[int, int] = BatchQueue(square, max_batch=1)
    assert serial.submit([1, 2, 3]) == [1, 4, 9]
    assert serial.stats.largest == 1
    serial.close()


def test_batches_wait_only_for_requests_in_progress() -> None:
    """With an `InFlight` count the worker waits (here up to 60 s) only while a request in
    progress has no item in its batch: a lone request runs at once; with two in progress the
    first one's item waits for the second's and both go in one batch."""
    batches: list[list[int]] = []

    def record(items: list[int]) -> list[int]:
        batches.append(items)
        return items

    in_flight = InFlight()
    queue: BatchQueue[int, int] = BatchQueue(record, max_batch=8, max_wait=60, callers=in_flight)
    with in_flight:
        tick = time.monotonic()
        assert queue.submit([1, 2]) == [1, 2]
        assert time.monotonic() - tick < 30  # not the 60 s wait: nobody else to wait for
    results: dict[str, list[int]] = {}

    def first_request() -> None:
        with in_flight:
            results["a"] = queue.submit([3])

    with in_flight:  # a second request, in progress before the first submits
        a = threading.Thread(target=first_request)
        a.start()
        time.sleep(0.2)  # the worker has taken a's item and waits for this request's
        results["b"] = queue.submit([4])
    a.join(timeout=30)
    queue.close()
    assert results == {"a": [3], "b": [4]}
    assert batches == [[1, 2], [3, 4]]


def test_batched_model_embeds_as_the_model(model: FaceModel) -> None:
    batched = BatchedFaceModel(model, max_batch=4, max_wait=0.01)
    x = torch.randn(6, 3, 32, 32)
    np.testing.assert_allclose(
        batched.embed_tensors(x, flip=True), model.embed_tensors(x, flip=True), atol=1e-5
    )
    assert (batched.fingerprint(), batched.embedding_dim) == (model.fingerprint(), 32)
    batched.queue.close()
