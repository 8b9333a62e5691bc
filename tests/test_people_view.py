"""The People routes of `facelab serve --library` on a library of real LFW faces: every route,
the keys each needs, 404 for unknown people and faces, 422 for bad bodies, and the library's
state checked through the Python API after each curation."""

from __future__ import annotations

import base64
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from people_library import GROUP, build_library, copy_library, person_of
from PIL import Image
from serving import KEYS, READ, RO, WRITE, tiny_model, upload

from facelab.collections import people
from facelab.collections.library import Library, LibraryError
from facelab.gallery import GalleryStore
from facelab.serve import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("single_torch_thread")

READ_ROUTES = [
    ("get", "/v1/people"),
    ("get", "/v1/people/{person}/faces"),
    ("get", "/v1/people/{person}/photos"),
    ("get", "/v1/faces/{face}/thumbnail"),
]
WRITE_ROUTES = [
    ("post", "/v1/people/{person}/name", {"name": "Ada"}),
    ("post", "/v1/people/{person}/merge", {"other": 2}),
    ("post", "/v1/faces/{face}/move", {"person": None}),
    ("post", "/v1/faces/{face}/ignore", None),
    ("post", "/v1/people/undo", None),
]


@pytest.fixture(scope="module")
def model():
    from facelab import api

    return api.load_model("dlib_resnet")


@pytest.fixture(scope="module")
def built(lfw: Path, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_library(lfw, tmp_path_factory.mktemp("people-library"), model)


@pytest.fixture()
def library(built: Path, tmp_path: Path) -> Path:
    return copy_library(built, tmp_path / "served")


@pytest.fixture()
def client(library: Path, model) -> Iterator[TestClient]:
    app = create_app(model, ServeConfig(gallery=library, library=True, keys=KEYS))
    with TestClient(app) as c:
        yield c


def ids(library: Path) -> dict[str, int]:
    with Library(library) as lib:
        return {name: person_of(lib, name) for name in ("Colin_Powell", "Tony_Blair")}


def test_people_faces_photos_and_thumbnails(client: TestClient, library: Path) -> None:
    r = client.get("/v1/people", headers=READ)
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [p["faces"] for p in listed["people"]] == [4, 3, 3]  # largest first
    assert listed["library"]["faces"] == 10 and listed["library"]["clusters"] == 3
    assert client.get("/v1/info", headers=READ).json()["library"] == listed["library"]
    powell = ids(library)["Colin_Powell"]
    assert listed["people"][0]["id"] == powell

    r = client.get(f"/v1/people/{powell}/faces", headers=READ)
    faces = r.json()
    assert (faces["person"], faces["total"], len(faces["faces"])) == (powell, 4, 4)
    assert listed["people"][0]["representative"] in {f["id"] for f in faces["faces"]}
    with Library(library) as lib:
        for face in faces["faces"]:
            jpeg = base64.b64decode(face["thumbnail"])
            assert jpeg == lib.thumbnail(face["id"])
            assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
            assert face["person_id"] == powell and len(face["box"]) == 4
            assert 0 < face["quality"]["score"] <= 1 and face["source"] == "detected"
    paths = sorted(Path(f["path"]).name for f in faces["faces"])
    assert paths == [
        "Colin_Powell_0001.jpg",
        "Colin_Powell_0002.jpg",
        "Colin_Powell_0003.jpg",
        GROUP,
    ]
    few = client.get(f"/v1/people/{powell}/faces?limit=2", headers=READ).json()
    assert (few["total"], len(few["faces"])) == (4, 2)

    photos = client.get(f"/v1/people/{powell}/photos", headers=READ).json()["photos"]
    assert sorted(Path(p["path"]).name for p in photos) == paths
    assert [p["score"] for p in photos] == sorted((p["score"] for p in photos), reverse=True)
    group = next(p for p in photos if p["path"].endswith(GROUP))
    (hit,) = group["faces"]  # only Powell's face of the group picture, with its box
    x1, y1, x2, y2 = hit["box"]
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
    assert (
        len(client.get(f"/v1/people/{powell}/photos?limit=1", headers=READ).json()["photos"]) == 1
    )

    r = client.get(f"/v1/faces/{hit['face_id']}/thumbnail", headers=READ)
    assert r.headers["content-type"] == "image/jpeg"
    with Library(library) as lib:
        assert r.content == lib.thumbnail(hit["face_id"])


def test_curation_changes_the_library_and_undo_restores_it(
    client: TestClient, library: Path, lfw: Path
) -> None:
    who = ids(library)
    powell, blair = who["Colin_Powell"], who["Tony_Blair"]
    with Library(library) as lib:
        start = people.list_people(lib)
        blair_faces = [int(i) for i in people.person_faces(lib, blair).ids]

    def post(path: str, body: dict | None = None) -> str:
        r = client.post(path, json=body, headers=WRITE)
        assert r.status_code == 200, r.text
        return r.json()["done"]

    post(f"/v1/people/{powell}/name", {"name": "Colin Powell"})
    with Library(library) as lib:
        assert people.person_id(lib, "Colin Powell") == powell
        assert [i.name for i in lib.gallery.identities()] == ["Colin Powell"]
    # the served gallery knows the new name at once: identify finds him in another photo
    probe = lfw / "images" / "Colin_Powell" / "Colin_Powell_0006.jpg"
    r = client.post(
        "/v1/identify",
        files=[upload("image", probe.read_bytes(), "image/jpeg")],
        data={"threshold": "0.93"},
        headers=READ,
    )
    assert r.status_code == 200, r.text
    assert r.json()["faces"][0]["identity"] == "Colin Powell", r.text

    post(f"/v1/people/{powell}/merge", {"other": blair})
    with Library(library) as lib:
        assert len(people.person_faces(lib, "Colin Powell").ids) == 7
        with pytest.raises(LibraryError):
            people.person_id(lib, blair)

    out, back = blair_faces[:2]
    post(f"/v1/faces/{out}/move", {"person": None})
    ignored = post(f"/v1/faces/{back}/ignore")
    assert ignored == f"ignored face {back}"
    with Library(library) as lib:
        assert lib.face_details(out)["person_id"] is None and lib.face_details(out)["pinned"]
        assert lib.face_details(back)["ignored"]
        assert len(people.person_faces(lib, powell).ids) == 5
    serena = next(p.id for p in start if p.id not in (powell, blair))
    post(f"/v1/faces/{out}/move", {"person": serena})
    with Library(library) as lib:
        assert lib.face_details(out)["person_id"] == serena

    for action in ("move", "ignore", "move", "merge", "name"):
        assert action in post("/v1/people/undo")
    with Library(library) as lib:
        assert people.list_people(lib) == start
        assert lib.gallery.identities() == []
    assert client.get("/v1/identities", headers=READ).json()["identities"] == []


def test_reads_need_a_key_and_writes_the_read_write_key(
    client: TestClient, library: Path, subtests: pytest.Subtests
) -> None:
    powell = ids(library)["Colin_Powell"]
    params = {"person": powell, "face": 1}
    for method, path in READ_ROUTES:
        url = path.format(**params)
        with subtests.test(msg=f"{method} {path}"):
            assert client.request(method, url).status_code == 401
            assert client.request(method, url, headers={"X-API-Key": RO}).status_code == 200
    for method, path, body in WRITE_ROUTES:
        url = path.format(**params)
        with subtests.test(msg=f"{method} {path}"):
            assert client.request(method, url, json=body).status_code == 401
            r = client.request(method, url, json=body, headers=READ)
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    with Library(library) as lib:  # nothing was done by the refused requests
        assert lib.query("SELECT count(*) FROM lib_actions")[0][0] == 1  # the clustering


def test_unknown_people_and_faces_are_404(client: TestClient, library: Path) -> None:
    powell = ids(library)["Colin_Powell"]
    cases = [
        ("get", "/v1/people/999/faces", None, "no person '999'"),
        ("get", "/v1/people/Nobody/photos", None, "no person 'Nobody'"),
        ("get", "/v1/faces/999/thumbnail", None, "no face 999"),
        ("post", "/v1/people/999/name", {"name": "Ada"}, "no person '999'"),
        ("post", f"/v1/people/{powell}/merge", {"other": 999}, "no person 999"),
        ("post", "/v1/faces/999/move", {"person": None}, "no face 999"),
        ("post", "/v1/faces/1/move", {"person": "Nobody"}, "no person 'Nobody'"),
        ("post", "/v1/faces/999/ignore", None, "no face 999"),
    ]
    for method, url, body, detail in cases:
        r = client.request(method, url, json=body, headers=WRITE)
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), (url, r.text)
        assert r.json()["detail"] == f"lib.db: {detail}"  # the server's path is not shown
    with Library(library) as lib:
        assert lib.query("SELECT count(*) FROM lib_actions")[0][0] == 1


def test_bad_bodies_and_refused_actions_are_422(client: TestClient, library: Path) -> None:
    powell = ids(library)["Colin_Powell"]
    bad = [
        (f"/v1/people/{powell}/name", {"name": "../etc"}, "invalid_request"),
        (f"/v1/people/{powell}/name", {"name": ""}, "invalid_request"),
        (f"/v1/people/{powell}/name", {"name": "Ada", "extra": 1}, "invalid_request"),
        (f"/v1/people/{powell}/name", None, "invalid_request"),
        (f"/v1/people/{powell}/name", {"name": "1234"}, "refused"),  # ids are digits
        (f"/v1/people/{powell}/merge", {"other": powell}, "refused"),  # with itself
        (f"/v1/people/{powell}/merge", {"other": [1]}, "invalid_request"),
        ("/v1/faces/abc/move", {"person": None}, "invalid_request"),
        ("/v1/faces/1/move", {}, "invalid_request"),
        ("/v1/faces/1/move", {"person": True}, "invalid_request"),
        ("/v1/faces/1/move", {"person": ""}, "invalid_request"),
    ]
    for url, body, code in bad:
        r = client.post(url, json=body, headers=WRITE)
        assert (r.status_code, r.json()["error"]) == (422, code), (url, body, r.text)
        assert "Traceback" not in r.text
    r = client.post(
        f"/v1/people/{powell}/name",
        content=b"{not json",
        headers={**WRITE, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    r = client.get(f"/v1/people/{powell}/faces?limit=0", headers=READ)
    assert r.status_code == 422
    other = next(
        p for p in client.get("/v1/people", headers=READ).json()["people"] if p["id"] != powell
    )
    assert (
        client.post(f"/v1/people/{powell}/name", json={"name": "Ada"}, headers=WRITE).status_code
        == 200
    )
    r = client.post(f"/v1/people/{other['id']}/name", json={"name": "Ada"}, headers=WRITE)
    assert r.status_code == 422 and "already person" in r.json()["detail"]
    for _ in range(2):  # the name, then the clustering
        assert client.post("/v1/people/undo", headers=WRITE).status_code == 200
    r = client.post("/v1/people/undo", headers=WRITE)
    assert (r.status_code, r.json()["detail"]) == (422, "lib.db: nothing to undo")


def test_a_server_without_a_library_says_so(tmp_path: Path) -> None:
    app = create_app(tiny_model(), ServeConfig(gallery=tmp_path / "gallery.db", keys=KEYS))
    with TestClient(app) as client:
        assert client.get("/v1/info", headers=READ).json()["library"] is None
        r = client.get("/v1/people", headers=READ)
        assert (r.status_code, r.json()["error"]) == (404, "no_library")
        assert "facelab serve --library" in r.json()["detail"]
        r = client.post("/v1/people/undo", headers=WRITE)
        assert (r.status_code, r.json()["error"]) == (404, "no_library")


def test_serving_refuses_what_is_not_this_models_library(tmp_path: Path, library: Path) -> None:
    gallery = tmp_path / "gallery.db"
    GalleryStore(gallery, create=True).close()
    with pytest.raises(LibraryError, match="a gallery, not a library"):
        create_app(tiny_model(), ServeConfig(gallery=gallery, library=True, keys=KEYS))
    # opening it as a library (without create) added nothing to the gallery
    tables = sqlite3.connect(gallery).execute("SELECT name FROM sqlite_master").fetchall()
    assert not any(name.startswith("lib_") for (name,) in tables)
    with pytest.raises(LibraryError, match="no library file|no gallery file"):
        create_app(
            tiny_model(), ServeConfig(gallery=tmp_path / "absent.db", library=True, keys=KEYS)
        )
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(LibraryError, match="indexed with dlib_resnet"):
        create_app(tiny_model(), ServeConfig(gallery=library, library=True, keys=KEYS))


def test_cli_serve_library_refuses_a_missing_file(tmp_path: Path) -> None:
    from facelab.cli import main

    with pytest.raises(SystemExit, match="absent.db: no library"):
        main(["serve", "--library", str(tmp_path / "absent.db"), "--insecure-local"])
