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
from facelab.serve.security import FailureLimiter

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
    ("post", "/v1/people/{person}/split", {"faces": [1]}),
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
    # every route gets a wrong key here; throttling those is test_hostile's subject
    unthrottled = FailureLimiter(limit=1_000)
    config = ServeConfig(gallery=library, library=True, keys=KEYS, key_failures=unthrottled)
    app = create_app(model, config)
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


def faces_of(library: Path, person: int) -> list[int]:
    with Library(library) as lib:
        return [int(i) for i in people.person_faces(lib, person).ids]


def actions(library: Path) -> int:
    with Library(library) as lib:
        return lib.query("SELECT count(*) FROM lib_actions")[0][0]


def test_split_makes_a_new_person_and_undo_restores_it(client: TestClient, library: Path) -> None:
    powell = ids(library)["Colin_Powell"]
    with Library(library) as lib:
        start = people.list_people(lib)
    ok = client.post(f"/v1/people/{powell}/name", json={"name": "Colin Powell"}, headers=WRITE)
    assert ok.status_code == 200, ok.text
    named = client.get("/v1/identities", headers=READ).json()["identities"]
    assert [(i["name"], i["images"]) for i in named] == [("Colin Powell", 4)]
    moved = faces_of(library, powell)[:2]

    r = client.post("/v1/people/Colin Powell/split", json={"faces": moved}, headers=WRITE)
    assert r.status_code == 200, r.text
    new = r.json()["person"]
    assert r.json() == {"done": f"split 2 faces of Colin Powell into person {new}", "person": new}
    assert new not in {p.id for p in start}
    assert faces_of(library, new) == sorted(moved)
    left = faces_of(library, powell)
    assert len(left) == 2 and set(left).isdisjoint(moved)
    with Library(library) as lib:
        assert all(lib.face_details(f)["pinned"] for f in moved)
    listed = client.get("/v1/people", headers=READ).json()["people"]
    assert {p["id"]: p["faces"] for p in listed}[new] == 2
    shown = client.get(f"/v1/people/{new}/faces", headers=READ).json()
    assert sorted(f["id"] for f in shown["faces"]) == sorted(moved)
    # the served gallery caught up: the named person keeps only the faces left to him
    people_list = client.get("/v1/identities", headers=READ).json()["identities"]
    assert [(i["name"], i["images"]) for i in people_list] == [("Colin Powell", 2)]

    r = client.post("/v1/people/undo", headers=WRITE)
    assert r.json()["done"] == f"undone: split 2 faces into person {new}", r.text
    with Library(library) as lib:
        assert [(p.id, p.faces) for p in people.list_people(lib)] == [
            (p.id, p.faces) for p in start
        ]
        assert not any(lib.face_details(f)["pinned"] for f in moved)
    r = client.get(f"/v1/people/{new}/faces", headers=READ)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    people_list = client.get("/v1/identities", headers=READ).json()["identities"]
    assert [(i["name"], i["images"]) for i in people_list] == [("Colin Powell", 4)]


def test_split_refuses_faces_that_are_not_the_persons(client: TestClient, library: Path) -> None:
    who = ids(library)
    powell, blair = who["Colin_Powell"], who["Tony_Blair"]
    own, others = faces_of(library, powell), faces_of(library, blair)
    with Library(library) as lib:
        start = people.list_people(lib)
    body = {"faces": [own[0], others[1], others[0]]}
    r = client.post(f"/v1/people/{powell}/split", json=body, headers=WRITE)
    assert (r.status_code, r.json()["error"]) == (422, "refused"), r.text
    stray = sorted(others[:2])
    assert r.json()["detail"] == f"lib.db: faces {stray} are not person {powell}'s"
    # an ignored face is no longer the person's either
    assert client.post(f"/v1/faces/{own[1]}/ignore", headers=WRITE).status_code == 200
    r = client.post(f"/v1/people/{powell}/split", json={"faces": own[:2]}, headers=WRITE)
    assert (r.status_code, r.json()["detail"]) == (
        422,
        f"lib.db: faces [{own[1]}] are not person {powell}'s",
    )
    assert actions(library) == 2  # the clustering and the ignore: the refusals did nothing
    assert client.post("/v1/people/undo", headers=WRITE).status_code == 200
    with Library(library) as lib:
        assert people.list_people(lib) == start


def test_split_keeps_the_cross_origin_and_host_rules(library: Path, model) -> None:
    powell = ids(library)["Colin_Powell"]
    face = faces_of(library, powell)[0]
    url, body = f"/v1/people/{powell}/split", {"faces": [face]}
    config = ServeConfig(gallery=library, library=True, keys=KEYS, allowed_hosts=("faces.lan",))
    own = {**WRITE, "Host": "faces.lan"}
    with TestClient(create_app(model, config)) as client:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Referer": "http://evil.example/page.html"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            r = client.post(url, json=body, headers={**own, **headers})
            assert (r.status_code, r.json()["error"]) == (403, "cross_origin"), headers
        r = client.post(url, json=body, headers={**own, "Host": "evil.example"})
        assert (r.status_code, r.json()["error"]) == (421, "wrong_host")
        assert actions(library) == 1
        same = {**own, "Origin": "http://faces.lan", "Sec-Fetch-Site": "same-origin"}
        r = client.post(url, json=body, headers=same)
        assert r.status_code == 200, r.text
        assert faces_of(library, r.json()["person"]) == [face]


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
        ("post", "/v1/people/999/split", {"faces": [1]}, "no person '999'"),
        ("post", "/v1/people/Nobody/split", {"faces": [1]}, "no person 'Nobody'"),
        ("post", f"/v1/people/{powell}/split", {"faces": [999]}, "no face 999"),
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
        (f"/v1/people/{powell}/split", {"faces": []}, "invalid_request"),
        (f"/v1/people/{powell}/split", {}, "invalid_request"),
        (f"/v1/people/{powell}/split", {"faces": 1}, "invalid_request"),
        (f"/v1/people/{powell}/split", {"faces": [0]}, "invalid_request"),
        (f"/v1/people/{powell}/split", {"faces": ["1"]}, "invalid_request"),
        (f"/v1/people/{powell}/split", {"faces": [True]}, "invalid_request"),
        (f"/v1/people/{powell}/split", {"faces": [1], "extra": 1}, "invalid_request"),
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
