"""Photo collections: face quality parts, the library file, curation with undo, names that
survive re-clustering, search, and real multi-face indexing on composed LFW group pictures."""

from __future__ import annotations

import copy
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelab.collections import people
from facelab.collections.cluster import FALSE_MATCHES_PER_FACE, ClusterConfig
from facelab.collections.library import FileState, IndexedFace, IndexedFile, Library, LibraryError
from facelab.collections.quality import (
    BLUR_HALF,
    blur_part,
    exposure_part,
    face_quality,
    laplacian_variance,
    pose_part,
    size_part,
)
from facelab.collections.search import search_face, search_person
from facelab.collections.service import clustering_threshold
from facelab.gallery.store import GalleryError, ModelInfo, Threshold
from facelab.models.operating_points import OperatingPoint, threshold_for_far

FRONTAL = np.array([[40.0, 50], [80, 50], [60, 70], [45, 90], [75, 90]])


# -- quality ---------------------------------------------------------------------------------------


def test_size_part_follows_eye_distance():
    assert size_part(FRONTAL) == 1.0  # 40 px between the eyes
    assert size_part(FRONTAL * 0.25) == pytest.approx(10 / 30)


def test_laplacian_variance_matches_scipy():
    from scipy.ndimage import laplace

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (30, 40)).astype(np.float64)
    assert laplacian_variance(img) == pytest.approx(laplace(img)[1:-1, 1:-1].var())


def test_blur_part_drops_with_blur():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, (120, 120, 3)).astype(np.uint8)
    soft = gaussian_filter(sharp.astype(float), sigma=(3, 3, 0))
    flat = np.full((120, 120, 3), 128, np.uint8)
    assert blur_part(sharp) > 0.99
    assert blur_part(soft) < blur_part(sharp)
    assert blur_part(flat) == 0.0
    # BLUR_HALF is where the part is one half
    assert laplacian_variance(soft) / (laplacian_variance(soft) + BLUR_HALF) == blur_part(soft)


def test_pose_part_measures_nose_offset_not_roll():
    assert pose_part(FRONTAL) == 1.0
    turned = FRONTAL.copy()
    turned[2, 0] += 10  # nose a quarter of the eye distance off the midpoint
    assert pose_part(turned) == pytest.approx(0.5)
    profile = FRONTAL.copy()
    profile[2, 0] = 80  # nose under an eye
    assert pose_part(profile) == 0.0
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert pose_part(FRONTAL @ rot.T) == pytest.approx(1.0)


def test_exposure_part():
    assert exposure_part(np.full((50, 50, 3), 128, np.uint8)) == 1.0
    assert exposure_part(np.full((50, 50, 3), 30, np.uint8)) == pytest.approx(0.5)
    assert exposure_part(np.full((50, 50, 3), 0, np.uint8)) == 0.0
    half_clipped = np.full((50, 50, 3), 128, np.uint8)
    half_clipped[:25] = 255
    # mean 191.5: (255 - 191.5) / (255 - 190) of the level, and half the pixels clipped
    assert exposure_part(half_clipped) == pytest.approx(63.5 / 65 * 0.5)
    quarter = np.full((40, 40, 3), 100, np.uint8)
    quarter[:10] = 255
    assert exposure_part(quarter) == pytest.approx(0.75)


def test_face_quality_is_its_weakest_part():
    rng = np.random.default_rng(0)
    face = rng.integers(60, 190, (150, 150, 3)).astype(np.uint8)
    q = face_quality(face, FRONTAL * 0.25)
    assert q.score == min(q.size, q.blur, q.pose, q.exposure) == q.size
    assert q.as_dict()["score"] == q.score


# -- a library of synthetic faces ----------------------------------------------------------------

DIM = 8
MODEL = ModelInfo("toy", "f" * 16, DIM, {})
THRESHOLD = Threshold(0.9, source="test")


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _face(number: int, embedding: np.ndarray, quality: float = 1.0) -> IndexedFace:
    return IndexedFace(
        face=number,
        box=(10.0 * number, 0.0, 10.0 * number + 9, 9.0),
        landmarks=FRONTAL,
        det_score=0.99,
        source="test",
        quality={"score": quality},
        embedding=embedding,
        thumbnail=b"\xff\xd8jpeg",
    )


@pytest.fixture()
def people_axes():
    """Three people, each a direction in 8-d; faces are small perturbations of it."""
    return _unit(np.eye(DIM)[:3])


def _photo(path: str, vectors: list[np.ndarray], rng: np.random.Generator) -> IndexedFile:
    faces = [_face(i, _unit(v + 0.05 * rng.standard_normal(DIM))) for i, v in enumerate(vectors)]
    return IndexedFile(path, FileState(f"sha-{path}", 1, 1), faces)


@pytest.fixture()
def library(tmp_path, people_axes):
    rng = np.random.default_rng(0)
    a, b, c = people_axes
    lib = Library(tmp_path / "lib.db", create=True)
    lib.bind_model(MODEL, None)
    lib.store_files(
        [
            _photo("/p/1.jpg", [a, b], rng),
            _photo("/p/2.jpg", [a], rng),
            _photo("/p/3.jpg", [a, c], rng),
            _photo("/p/4.jpg", [b], rng),
            _photo("/p/5.jpg", [c], rng),
        ]
    )
    yield lib
    lib.close()


def _groups(lib: Library) -> set[frozenset[str]]:
    """Each person's faces as (photo, face number) strings."""
    table = lib.faces("f.person_id IS NOT NULL")
    out: dict[int, set[str]] = {}
    for pid, path, face in zip(table.person, table.file_paths, table.faces, strict=True):
        out.setdefault(int(pid), set()).add(f"{path}#{face}")
    return {frozenset(v) for v in out.values()}


A_FACES = frozenset({"/p/1.jpg#0", "/p/2.jpg#0", "/p/3.jpg#0"})
B_FACES = frozenset({"/p/1.jpg#1", "/p/4.jpg#0"})
C_FACES = frozenset({"/p/3.jpg#1", "/p/5.jpg#0"})


def _cluster(lib: Library) -> people.ClusterReport:
    return people.cluster_library(lib, THRESHOLD, ClusterConfig(threshold=0.9, k=5))


def _pid(lib: Library, faces: frozenset[str]) -> int:
    path, number = next(iter(faces)).split("#")
    table = lib.faces("lib_files.path = ? AND f.face = ?", (path, int(number)))
    return int(table.person[0])


def test_cluster_groups_people(library):
    report = _cluster(library)
    assert _groups(library) == {A_FACES, B_FACES, C_FACES}
    assert (report.clusters, report.clustered_faces, report.unassigned) == (3, 7, 0)
    listed = people.list_people(library)
    assert [p.faces for p in listed] == [3, 2, 2]
    table = library.faces()
    assert all(p.representative in table.ids for p in listed)


def test_low_quality_faces_stay_unclustered(tmp_path, people_axes):
    rng = np.random.default_rng(1)
    a = people_axes[0]
    with Library(tmp_path / "q.db", create=True) as lib:
        lib.bind_model(MODEL, None)
        faces = [_face(0, _unit(a + 0.05 * rng.standard_normal(DIM)), q) for q in (1, 1, 0.1)]
        lib.store_files(
            [IndexedFile(f"/q/{i}.jpg", FileState(str(i), 1, 1), [f]) for i, f in enumerate(faces)]
        )
        config = ClusterConfig(threshold=0.9, k=5, min_quality=0.5)
        report = people.cluster_library(lib, THRESHOLD, config)
        assert (report.clustered_faces, report.unassigned) == (2, 1)
        assert lib.faces("lib_files.path = '/q/2.jpg'").person[0] == -1


def test_names_survive_reclustering_and_new_faces_join_them(library, people_axes):
    _cluster(library)
    people.name_person(library, _pid(library, A_FACES), "Alice")
    assert library.gallery.identities()[0].name == "Alice"
    assert library.gallery.identities()[0].images == 3
    rng = np.random.default_rng(5)
    library.store_files([_photo("/p/6.jpg", [people_axes[0]], rng)])  # a new photo of Alice
    report = _cluster(library)
    assert report.joined_named == 1
    alice = people.person_faces(library, "Alice")
    assert sorted(alice.file_paths) == ["/p/1.jpg", "/p/2.jpg", "/p/3.jpg", "/p/6.jpg"]
    assert library.gallery.identities()[0].images == 4
    # re-indexing an unchanged library and clustering again changes nothing
    before = _groups(library)
    _cluster(library)
    assert _groups(library) == before


def test_curation_and_undo(library):
    _cluster(library)
    start = _groups(library)
    a, b = _pid(library, A_FACES), _pid(library, B_FACES)
    people.name_person(library, b, "Bob")
    people.merge_people(library, a, "Bob")  # a takes Bob's faces and name
    assert A_FACES | B_FACES in _groups(library)
    assert people.person_id(library, "Bob") == a
    assert [i.name for i in library.gallery.identities()] == ["Bob"]
    moved = int(people.person_faces(library, "Bob").ids[0])
    people.move_face(library, moved, None)
    assert people.person_faces(library, "Bob").ids.size == 4
    new = people.split_person(library, [int(people.person_faces(library, "Bob").ids[0])])
    assert people.person_faces(library, new).ids.size == 1
    people.ignore_face(library, moved)
    assert moved not in library.faces().ids
    for expected in ("ignore", "split", "move", "merge", "name"):
        assert expected in people.undo(library)
    assert _groups(library) == start
    assert library.gallery.identities() == []
    assert "cluster" in people.undo(library)
    assert _groups(library) == set()
    with pytest.raises(LibraryError, match="nothing to undo"):
        people.undo(library)


def test_pinned_faces_stay_put(library):
    _cluster(library)
    face = int(people.person_faces(library, _pid(library, A_FACES)).ids[0])
    target = _pid(library, C_FACES)
    people.move_face(library, face, target)
    _cluster(library)
    assert int(library.faces("f.id = ?", (face,)).person[0]) == target


def test_curation_refuses_bad_references(library):
    _cluster(library)
    with pytest.raises(LibraryError, match="no person 'Nobody'"):
        people.name_person(library, "Nobody", "X")
    with pytest.raises(LibraryError, match="no face 999"):
        people.move_face(library, 999, None)
    people.name_person(library, _pid(library, A_FACES), "Alice")
    with pytest.raises(LibraryError, match="already person"):
        people.name_person(library, _pid(library, B_FACES), "Alice")
    with pytest.raises(LibraryError, match="itself"):
        people.merge_people(library, "Alice", "Alice")


def test_search_by_face_and_person(library, people_axes):
    _cluster(library)
    hits = search_face(library, people_axes[2], THRESHOLD)
    assert [h.path for h in hits] == sorted([h.path for h in hits], key=lambda p: p) or hits
    assert {h.path for h in hits} == {"/p/3.jpg", "/p/5.jpg"}
    assert all(h.faces[0].score >= 0.9 for h in hits)
    assert hits[0].score >= hits[1].score
    assert hits[0].faces[0].box[2] > hits[0].faces[0].box[0]
    people.name_person(library, _pid(library, A_FACES), "Alice")
    photos = search_person(library, "Alice")
    assert {p.path for p in photos} == {"/p/1.jpg", "/p/2.jpg", "/p/3.jpg"}
    assert [p.score for p in photos] == sorted((p.score for p in photos), reverse=True)


def test_library_refuses_other_models_and_files(tmp_path, library):
    with pytest.raises(LibraryError, match="indexed with toy"):
        library.bind_model(ModelInfo("other", "0" * 16, DIM, {}), None)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(LibraryError, match="not a facelab gallery"):
        Library(other)
    with pytest.raises(LibraryError, match="no gallery file|no library file"):
        Library(tmp_path / "absent.db")


def test_a_failed_batch_leaves_the_library_as_it_was(library):
    before = library.stats()
    bad = IndexedFile("/p/9.jpg", FileState("x", 1, 1), [_face(0, np.zeros(DIM, np.float32))] * 2)
    broken = IndexedFile("/p/10.jpg", FileState("y", 1, 1), [_face(0, np.zeros(DIM, np.float32))])
    object.__setattr__(broken, "faces", [None])  # fails mid-transaction
    with pytest.raises(AttributeError):
        library.store_files([bad, broken])
    assert library.stats() == before


# -- real photos ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from facelab import api

    return api.load_model("dlib_resnet")


def test_index_finds_every_face_of_group_pictures(tmp_path, lfw, model, single_torch_thread):
    from facelab.collections.indexer import IndexConfig, index_folder
    from facelab.data.groups import compose_group

    rng = np.random.default_rng(3)
    names = ["Colin_Powell", "Serena_Williams", "Tony_Blair"]
    photos = tmp_path / "photos"
    photos.mkdir()
    truth = {}
    for n in range(2):
        group = compose_group([lfw / "images" / p / f"{p}_{n + 1:04d}.jpg" for p in names], rng)
        path = photos / f"group{n}.jpg"
        Image.fromarray(group.image).save(path, quality=95)
        truth[os.path.abspath(path)] = group.faces
    (photos / "broken.jpg").write_bytes(b"not an image")
    with Library(tmp_path / "lib.db", create=True) as lib:
        report = index_folder(lib, model, photos, IndexConfig(batch_size=1), progress=False)
        assert (report.indexed, report.faces) == (3, 6)
        assert report.unreadable == [os.path.abspath(photos / "broken.jpg")]
        table = lib.faces()
        for path, pasted in truth.items():
            boxes = table.boxes[[p == path for p in table.file_paths]]
            for face in pasted:  # each pasted face has a detected box centred inside it
                x1, y1, x2, y2 = face.box
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                assert ((cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)).sum() == 1
        # who each detected face is (the pasted face its box centre falls in)
        who = []
        for row, path in enumerate(table.file_paths):
            cx, cy = (
                (table.boxes[row, 0] + table.boxes[row, 2]) / 2,
                (table.boxes[row, 1] + table.boxes[row, 3]) / 2,
            )
            hit = [f for f in truth[path] if f.box[0] < cx < f.box[2] and f.box[1] < cy < f.box[3]]
            who.append(hit[0].source.split("/")[-2])
        who = np.array(who)
        sims = table.embeddings @ table.embeddings.T
        same = (who[:, None] == who[None]) & ~np.eye(6, dtype=bool)
        assert sims[same].min() > sims[who[:, None] != who[None]].max()
        details = [lib.face_details(int(i)) for i in table.ids]
        assert all(0 < d["quality"]["score"] <= 1 and d["source"] == "detected" for d in details)
        assert lib.thumbnail(int(table.ids[0]))[:2] == b"\xff\xd8"

        # incremental: nothing new -> nothing processed; a changed and a deleted file
        again = index_folder(lib, model, photos, progress=False)
        assert (again.indexed, again.unchanged, again.removed) == (0, 3, 0)
        (photos / "group1.jpg").unlink()
        single = lfw / "images" / "Tony_Blair" / "Tony_Blair_0010.jpg"
        (photos / "group0.jpg").write_bytes(single.read_bytes())
        again = index_folder(lib, model, photos, progress=False)
        assert (again.indexed, again.removed, again.faces) == (1, 1, 1)
        assert lib.stats()["faces"] == 1


def test_index_is_resumable_after_a_kill(tmp_path, lfw, model, single_torch_thread):
    """Batches committed before a crash stay; the next run does only the rest."""
    from facelab.collections import indexer

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(1, 4):
        src = lfw / "images" / "Colin_Powell" / f"Colin_Powell_{n:04d}.jpg"
        (photos / src.name).symlink_to(src)  # linked photos: a removed link drops its faces
    calls = []
    real = indexer._FaceFinder.run

    def dying(self, loaded):
        calls.append(len(loaded))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies during the second batch
        return real(self, loaded)

    config = indexer.IndexConfig(batch_size=1)
    with Library(tmp_path / "lib.db", create=True) as lib:
        indexer._FaceFinder.run = dying
        try:
            with pytest.raises(KeyboardInterrupt):
                indexer.index_folder(lib, model, photos, config, progress=False)
        finally:
            indexer._FaceFinder.run = real
        assert lib.stats()["files"] == 1
        report = indexer.index_folder(lib, model, photos, config, progress=False)
        assert (report.indexed, report.unchanged) == (2, 1)
        assert lib.stats() == {**lib.stats(), "files": 3, "faces": 3}
        (photos / "Colin_Powell_0002.jpg").unlink()
        report = indexer.index_folder(lib, model, photos, config, progress=False)
        assert (report.removed, lib.stats()["faces"]) == (1, 2)


def test_cli_index_cluster_name_search(tmp_path, lfw, single_torch_thread, capsys, caplog):
    """The commands end to end on 5 LFW photos of two people, with a given threshold."""
    import json

    from facelab.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, numbers in (("Colin_Powell", (1, 2, 3)), ("Serena_Williams", (1, 2))):
        for n in numbers:
            src = lfw / "images" / name / f"{name}_{n:04d}.jpg"
            (photos / src.name).write_bytes(src.read_bytes())
    lib = str(tmp_path / "lib.db")

    def run(*argv: str):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    assert run("index", str(photos), "--library", lib)["faces"] == 5
    assert main(["cluster", "--library", lib, "--far", "1e-3"]) == 2  # none calibrated
    assert "no calibrated threshold" in caplog.text
    report = run("cluster", "--library", lib)  # the model's operating point for 5 faces
    assert report["target_far"] == pytest.approx(0.14)
    assert "dlib_resnet at FAR 0.14" in report["threshold_source"]
    assert (report["clusters"], report["clustered_faces"]) == (2, 5)
    report = run("cluster", "--library", lib, "--threshold", "0.93")
    assert (report["clusters"], report["clustered_faces"], report["target_far"]) == (2, 5, None)
    listed = run("people", "--library", lib, "list", "--thumbnails", str(tmp_path / "thumbs"))
    sizes = {p["id"]: p["faces"] for p in listed["people"]}
    assert sorted(sizes.values()) == [2, 3]
    powell = max(sizes, key=sizes.get)
    assert (tmp_path / "thumbs" / f"{powell}.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert main(["people", "--library", lib, "name", str(powell), "Colin Powell"]) == 0
    capsys.readouterr()
    hits = run("search", "--library", lib, "--person", "Colin Powell")
    assert sorted(Path(h["path"]).name for h in hits) == [
        f"Colin_Powell_{n:04d}.jpg" for n in (1, 2, 3)
    ]
    probe = lfw / "images" / "Colin_Powell" / "Colin_Powell_0004.jpg"
    hits = run("search", "--library", lib, "--face", str(probe), "--threshold", "0.93")
    assert {Path(h["path"]).name for h in hits} == {f"Colin_Powell_{n:04d}.jpg" for n in (1, 2, 3)}
    assert all(len(h["faces"][0]["box"]) == 4 for h in hits)
    assert run("people", "--library", lib, "undo")["undone"].startswith("name person")
    assert main(["people", "--library", lib, "name", "999", "X"]) == 2
    assert "no person '999'" in caplog.text


def test_cluster_warns_when_the_stored_threshold_is_too_loose(library, caplog):
    from facelab import api

    loose = Threshold(0.9, "test", target_far=0.5, measured_far=0.5, measured_frr=0.0)
    library.gallery.set_threshold(loose, MODEL)
    report = api.cluster_people(library.path, far=0.5)
    assert report.threshold == 0.9
    assert "expects about 4 false matches per face among 7 faces" in caplog.text


def _points(*pairs: tuple[float, float], n_impostor: int = 6_000_000) -> list[OperatingPoint]:
    return [
        OperatingPoint(far, threshold, far, 0.1, 1000, n_impostor, "test pairs")
        for far, threshold in pairs
    ]


SHIPPED = _points((1e-2, 0.90), (1e-3, 0.92), (1e-4, 0.94), (1e-5, 0.95), (1e-6, 0.96))


def test_threshold_for_far_interpolates_in_log_far():
    assert threshold_for_far(SHIPPED, 1e-5)[0] == 0.95
    value, how = threshold_for_far(SHIPPED, 10**-4.5)  # half way between 1e-4 and 1e-5
    assert value == pytest.approx(0.945)
    assert "between the model's operating points FAR 1e-05 (0.9500) and FAR 0.0001 (0.9400)" in how
    assert threshold_for_far(SHIPPED, 3e-3)[0] == pytest.approx(0.92 - 0.02 * np.log10(3))
    strict, how = threshold_for_far(SHIPPED, 1e-7)  # a million faces: beyond what was measured
    assert strict == 0.96 and "below the strictest measured point" in how
    assert threshold_for_far(SHIPPED, 0.1) == (0.90, threshold_for_far(SHIPPED, 0.1)[1])
    assert "above the loosest point" in threshold_for_far(SHIPPED, 0.1)[1]
    # 1e-6 of 100,000 impostor pairs is not measured: 1e-7 falls back on 1e-5, not on it
    few = _points((1e-4, 0.94), (1e-5, 0.95), n_impostor=100_000) + _points(
        (1e-6, 0.99), n_impostor=100_000
    )
    assert threshold_for_far(few, 1e-7)[0] == 0.95
    with pytest.raises(ValueError, match="target FAR"):
        threshold_for_far(SHIPPED, 0.0)


def test_clustering_threshold_is_the_models_point_at_false_matches_per_face():
    chosen = clustering_threshold(SHIPPED, 30_000, "toy", per_face=0.3)  # FAR 1e-5
    assert chosen.value == 0.95 and chosen.target_far == pytest.approx(1e-5)
    assert chosen.source.startswith("toy at FAR 1e-05 (0.3 / 30,000 faces)")
    bigger = clustering_threshold(SHIPPED, 300_000, "toy", 0.3)  # stricter for more faces
    assert bigger.value == 0.96 and "threshold 0.9600 for target FAR 1e-06" in bigger.describe()
    with pytest.raises(GalleryError, match="toy carries no operating points.*--threshold"):
        clustering_threshold((), 1000, "toy")


def test_cluster_people_without_a_threshold_uses_the_models_points(library, model):
    """No --threshold, no --far: the model's operating point for the library's 7 faces (FAR
    0.7 / 7, above its loosest point: that point); a model without points is refused."""
    from facelab import api

    report = api.cluster_people(library.path, model=model)
    loosest = max(model.operating_points, key=lambda p: p.target_far)
    assert report.threshold == loosest.threshold
    assert report.target_far == pytest.approx(FALSE_MATCHES_PER_FACE / 7)
    assert "dlib_resnet at FAR 0.1 (0.7 / 7 faces)" in report.threshold_source
    bare = copy.copy(model)
    bare.operating_points = ()
    with pytest.raises(GalleryError, match="dlib_resnet carries no operating points"):
        api.cluster_people(library.path, model=bare)
    given = api.cluster_people(library.path, threshold=0.9, model=bare)
    assert (given.threshold, given.target_far, given.clusters) == (0.9, None, 3)


def test_index_skips_a_fifo_instead_of_hanging(tmp_path, model):
    """A FIFO named like a photo is reported unreadable; read as a file it would block forever
    (the run goes in a daemon thread given 60 s, so a regression fails instead of hanging)."""
    import threading

    from facelab.collections.indexer import index_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    os.mkfifo(photos / "stuck.jpg")
    reports = []

    def run() -> None:  # the library's connection belongs to the thread that opens it
        with Library(tmp_path / "lib.db", create=True) as lib:
            reports.append(index_folder(lib, model, photos, progress=False))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "indexing blocked on the FIFO"
    (report,) = reports
    assert report.unreadable == [os.path.abspath(photos / "stuck.jpg")] and report.faces == 0


# -- faces as users bring them: the pipeline's routes, detector, aligned input, modes -----------


def _routes(lib: Library) -> dict[str, list[str]]:
    """Each photo's file name -> the routes of its faces, main face first ([] for none)."""
    rows = lib.query(
        "SELECT lib_files.path, f.source FROM lib_files LEFT JOIN lib_faces f "
        "ON f.file_id = lib_files.id ORDER BY lib_files.path, f.face"
    )
    out: dict[str, list[str]] = {}
    for path, source in rows:
        out.setdefault(Path(path).name, []).extend([source] if source else [])
    return out


def _main_embeddings(lib: Library) -> dict[str, np.ndarray]:
    table = lib.faces("f.face = 0")
    return {Path(p).name: e for p, e in zip(table.file_paths, table.embeddings, strict=True)}


@pytest.fixture(scope="module")
def blair(lfw) -> np.ndarray:
    from test_inputs import face_path

    from facelab.data.images import read_image

    return read_image(face_path(lfw, "Tony_Blair"))


def test_index_finds_faces_the_way_embed_does(tmp_path, model, blair, single_torch_thread):
    """A thumbnail, a crop the frame cuts and a dark side-lit close crop: before, the indexer
    dropped the first and the third (`--no-face skip`) and aligned the second on the
    detector's points; now each takes embed's route and gets embed's embedding."""
    from test_inputs import tight_crops

    from facelab.collections.indexer import index_folder
    from facelab.models.registry import DETECTORS
    from facelab.pipeline import embed_images

    close = tight_crops([blair], 112, side=0.85)[0]
    # grey, gamma 2, lit from one side (docs/inputs.md's harsh variant)
    dark = np.round(255 * (close.mean(-1) / 255) ** 2 * np.linspace(0.03, 1, 112)).astype(np.uint8)
    assert len(DETECTORS.create("mtcnn").detect([np.stack([dark] * 3, -1)])[0]) == 0
    images = {
        "photo.png": blair,
        "thumb.png": tight_crops([blair], 32)[0],
        "close.png": close,
        "dark.png": dark,
        "wall.png": np.full((200, 300, 3), (120, 160, 200), np.uint8),
    }
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in images.items():
        Image.fromarray(image).save(photos / name)
    with Library(tmp_path / "lib.db", create=True) as lib:
        report = index_folder(lib, model, photos, progress=False)
        routes = _routes(lib)
        embedded = _main_embeddings(lib)
        details = lib.face_details(int(lib.faces("f.face = 0").ids[0]))
    assert routes == {
        "photo.png": ["detected"],
        "thumb.png": ["upsampled"],
        "close.png": ["whole_frame"],
        "dark.png": ["whole_frame"],  # found in the padded view; the face fills the frame
        "wall.png": [],
    }
    assert report.routes == {"whole_frame": 2, "detected": 1, "upsampled": 1}
    assert report.detector == "mtcnn" and 0 < details["quality"]["score"] <= 1
    names = sorted(embedded)
    embed = embed_images(model, [photos / n for n in names], progress=False)
    assert embed.routes.tolist() == [routes[n][0] for n in names]
    for name, row in zip(names, embed.embeddings, strict=True):
        assert float(row @ embedded[name]) > 0.9999, name
    photo = embedded["photo.png"]
    assert min(float(photo @ embedded[n]) for n in ("thumb.png", "close.png", "dark.png")) > 0.9


@pytest.mark.parametrize(
    ("no_face", "route"), [("whole_frame", "whole_frame"), ("centre", "centre_fallback")]
)
def test_no_face_fallbacks_name_their_route(tmp_path, model, no_face, route, single_torch_thread):
    from facelab.collections.indexer import IndexConfig, index_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 200), (120, 160, 200)).save(photos / "wall.png")
    with Library(tmp_path / "lib.db", create=True) as lib:
        index_folder(lib, model, photos, IndexConfig(no_face=no_face), progress=False)
        assert _routes(lib) == {"wall.png": [route]}
        box = lib.faces().boxes[0]
    assert box.tolist() == ([0, 0, 300, 200] if no_face == "whole_frame" else [90, 40, 210, 160])


def test_library_records_its_detector_and_refuses_another(
    tmp_path, lfw, model, caplog, single_torch_thread
):
    from facelab import api
    from facelab.cli import main
    from facelab.data.images import read_image
    from facelab.models.detectors.mtcnn import main_face
    from facelab.models.registry import DETECTORS

    photos = tmp_path / "photos"
    photos.mkdir()
    people = ("Tony_Blair", "Colin_Powell", "Serena_Williams")
    for name in people[:2]:
        (photos / f"{name}.jpg").symlink_to(lfw / "images" / name / f"{name}_0001.jpg")
    lib = tmp_path / "lib.db"
    report = api.index_photos(lib, photos, model, detector="blazeface", progress=False)
    assert (report.faces, report.detector, report.routes) == (2, "blazeface", {"detected": 2})

    def main_boxes(library: Path) -> dict[str, np.ndarray]:
        with Library(library) as opened:
            table = opened.faces("f.face = 0")
        return dict(zip(table.file_paths, table.boxes, strict=True))

    def blazeface_boxes(paths: list[str]) -> np.ndarray:
        images = [read_image(p) for p in paths]
        found = DETECTORS.create("blazeface").detect(images)
        return [d.boxes[main_face(d, im.shape)] for d, im in zip(found, images, strict=True)]

    with Library(lib) as opened:
        assert opened.detector() == "blazeface"
    boxes = main_boxes(lib)  # blazeface's, not MTCNN's
    np.testing.assert_allclose(list(boxes.values()), blazeface_boxes(list(boxes)), atol=1e-3)

    name = people[2]
    (photos / f"{name}.jpg").symlink_to(lfw / "images" / name / f"{name}_0001.jpg")
    with pytest.raises(LibraryError, match="built with the blazeface detector, not mtcnn"):
        api.index_photos(lib, photos, model, detector="mtcnn", progress=False)
    assert main(["index", str(photos), "--library", str(lib), "--detector", "mtcnn"]) == 2
    assert "--detector blazeface" in caplog.text
    with Library(lib) as opened:
        assert opened.stats()["files"] == 2  # nothing mixed in
    again = api.index_photos(lib, photos, model, progress=False)  # the library's detector
    assert (again.indexed, again.faces, again.detector) == (1, 1, "blazeface")

    # no --detector on a new library: the model's preprocessing detector, as embed uses
    own = api.with_detector(model, "blazeface")
    fresh = api.index_photos(tmp_path / "own.db", photos, own, progress=False)
    assert (fresh.faces, fresh.detector) == (3, "blazeface")
    boxes = main_boxes(tmp_path / "own.db")
    np.testing.assert_allclose(list(boxes.values()), blazeface_boxes(list(boxes)), atol=1e-3)


def test_index_takes_aligned_crops(tmp_path, model, blair, single_torch_thread):
    from facelab.collections.indexer import IndexConfig, index_folder
    from facelab.data.align import ARCFACE_TEMPLATE_112, warp_to_template
    from facelab.models.detectors.mtcnn import main_face
    from facelab.models.registry import DETECTORS
    from facelab.pipeline import embed_images

    det = DETECTORS.create("mtcnn").detect([blair])[0]
    marks = det.landmarks[main_face(det, blair.shape)]
    photos = tmp_path / "photos"
    photos.mkdir()
    crop = warp_to_template(blair, marks, np.asarray(ARCFACE_TEMPLATE_112), 112)
    Image.fromarray(crop).save(photos / "aligned.png")
    with Library(tmp_path / "lib.db", create=True) as lib:
        report = index_folder(lib, model, photos, IndexConfig(input="aligned"), progress=False)
        assert report.routes == {"aligned": 1}
        table = lib.faces()
    assert table.boxes.tolist() == [[0, 0, 112, 112]]
    photo = embed_images(model, [blair], progress=False).embeddings[0]
    assert float(photo @ table.embeddings[0]) > 0.95


def test_index_decodes_every_photo_mode(tmp_path, model, blair, single_torch_thread):
    """A phone photo stored sideways, 16-bit grey, CMYK, transparency, a palette: each decoded
    upright RGB, its face detected and embedded like the original."""
    from test_inputs import encoded

    from facelab.collections.indexer import index_folder

    upright = Image.fromarray(blair)
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    rgba = np.dstack([blair, np.full(blair.shape[:2], 255, np.uint8)])
    rgba[:20, :, 3] = 0  # a transparent band at the top
    grey16 = (np.asarray(upright.convert("L"), np.uint16) * 257).astype("<u2")
    files = {
        "photo.png": encoded(upright),
        "phone.jpg": encoded(upright.rotate(90, expand=True), "JPEG", quality=95, exif=exif),
        "grey16.png": encoded(Image.frombytes("I;16", upright.size, grey16.tobytes())),
        "cmyk.jpg": encoded(upright.convert("CMYK"), "JPEG", quality=95),
        "alpha.png": encoded(Image.fromarray(rgba, "RGBA")),
        "palette.png": encoded(upright.convert("P", palette=Image.ADAPTIVE)),
    }
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, data in files.items():
        (photos / name).write_bytes(data)
    with Library(tmp_path / "lib.db", create=True) as lib:
        report = index_folder(lib, model, photos, progress=False)
        routes = _routes(lib)
        embedded = _main_embeddings(lib)
    assert report.unreadable == []
    assert routes == {name: ["detected"] for name in files}
    cosines = {n: round(float(embedded[n] @ embedded["photo.png"]), 3) for n in files}
    assert min(cosines.values()) > 0.98, cosines


def test_a_version_1_library_is_migrated_to_route_names(tmp_path):
    """Version 1 stored the detector's name or "centre-crop" in `source`."""
    path = tmp_path / "lib.db"
    with Library(path, create=True) as lib:
        lib.bind_model(ModelInfo("toy", "f" * 16, DIM, {"alignment": "five_point"}), None)
        faces = [_face(0, _unit(np.ones(DIM))), _face(1, _unit(np.ones(DIM)))]
        lib.store_files([IndexedFile("/p/1.jpg", FileState("sha", 1, 1), faces)])
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE lib_faces SET source = CASE face WHEN 0 THEN 'mtcnn' ELSE 'centre-crop' END"
        )
        db.execute("UPDATE lib_meta SET value = '1' WHERE key = 'schema_version'")
    with Library(path) as lib:
        assert lib.meta("schema_version") == "2"
        assert [lib.face_details(int(i))["source"] for i in lib.faces().ids] == [
            "detected",
            "centre_fallback",
        ]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE lib_meta SET value = '3' WHERE key = 'schema_version'")
    with pytest.raises(LibraryError, match="schema version 3"):
        Library(path)


def test_a_version_1_library_retries_its_photos_without_faces(
    tmp_path, model, blair, single_torch_thread
):
    """Version 1 had no retries: a thumbnail it indexed has no face. After the migration the
    next run reads it again and finds it; the photo whose face it had keeps that face."""
    from test_inputs import tight_crops

    from facelab.collections.indexer import index_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(blair).save(photos / "photo.png")
    Image.fromarray(tight_crops([blair], 32)[0]).save(photos / "thumb.png")
    path = tmp_path / "lib.db"
    with Library(path, create=True) as lib:
        index_folder(lib, model, photos, progress=False)
        kept = int(lib.faces().ids[0])
    with sqlite3.connect(path) as db:  # what version 1 left: no face in the thumbnail
        db.execute("DELETE FROM lib_faces WHERE source = 'upsampled'")
        db.execute("UPDATE lib_files SET faces = 0 WHERE path LIKE '%thumb.png'")
        db.execute("UPDATE lib_faces SET source = 'mtcnn'")
        db.execute("UPDATE lib_meta SET value = '1' WHERE key = 'schema_version'")
    with Library(path) as lib:
        report = index_folder(lib, model, photos, progress=False)
        assert (report.indexed, report.routes) == (1, {"upsampled": 1})
        assert _routes(lib) == {"photo.png": ["detected"], "thumb.png": ["upsampled"]}
        assert int(lib.faces("lib_files.path LIKE '%photo.png'").ids[0]) == kept
