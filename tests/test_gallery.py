"""Galleries: the store (each behavioural test on both backends, SQLite and PostgreSQL), search,
decisions, mapping, calibration, crash and concurrency safety (with real processes and SIGKILL),
and the CLI on a tiny randomly initialised model."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from postgres import postgres_cluster  # noqa: F401 (a fixture)

from facelab.cli import main
from facelab.gallery import (
    UNKNOWN,
    GalleryError,
    GallerySearch,
    GalleryStore,
    LfwSplit,
    ModelInfo,
    Threshold,
    build_index,
    calibrate,
    enroll,
    enroll_people,
    eval_identification,
    find_faces,
    identify,
    map_unknown,
    verify_claim,
)
from facelab.gallery.backends import gallery_exists, open_store
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from facelab.models.detectors.mtcnn import Detections
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model(seed: int = 0, preprocess: Preprocess | None = None) -> FaceModel:
    torch.manual_seed(seed)
    return FaceModel.create(
        "mobilefacenet", preprocess=preprocess, embedding_dim=32, input_size=32
    ).eval()


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: FaceModel) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


def person_images(seed: int, n: int = 3, size: int = 36) -> list[np.ndarray]:
    """n noisy variants of one random pattern: one synthetic 'person'."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3))
    return [
        np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(n)
    ]


def write_people(
    root: Path, people: int, per_person: int, offset: int = 0
) -> dict[str, list[Path]]:
    out = {}
    for p in range(people):
        folder = root / f"person_{p}"
        folder.mkdir(parents=True, exist_ok=True)
        out[folder.name] = []
        for i, img in enumerate(person_images(p, per_person + offset)[offset:]):
            path = folder / f"{folder.name}_{i + offset:04d}.png"
            Image.fromarray(img).save(path)
            out[folder.name].append(path)
    return out


@pytest.fixture()
def people(tmp_path: Path) -> dict[str, list[Path]]:
    return write_people(tmp_path / "known", people=4, per_person=3)


@pytest.fixture(params=["sqlite", "postgres"])
def gallery(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's gallery lives: an SQLite file, or a fresh database of the test cluster."""
    if request.param == "sqlite":
        return tmp_path / "g.db"
    return request.getfixturevalue("postgres_cluster").new_database()


# -- store ----------------------------------------------------------------------------------


def test_store_round_trip(
    gallery: Path | str, model: FaceModel, people: dict[str, list[Path]]
) -> None:
    report = enroll_people(gallery, model, people, progress=False)
    assert report.enrolled == {name: 3 for name in people}
    faces = find_faces(model, people["person_1"])
    with open_store(gallery) as store:
        assert [i.name for i in store.identities()] == sorted(people)
        assert store.model() == ModelInfo.of(model)
        assert Preprocess.from_dict(store.model().preprocess) == model.preprocess
        stored = store.images("person_1")
        assert [p for p, _, _ in stored] == [str(p) for p in people["person_1"]]
        assert (
            stored[0][1]
            == __import__("hashlib").sha256(people["person_1"][0].read_bytes()).hexdigest()
        )
        np.testing.assert_allclose(
            store.embeddings("person_1"), np.stack([f.embedding for f in faces]), atol=1e-6
        )
        assert store.embeddings("person_1").dtype == np.float32
        snap = store.snapshot()
        assert snap.names == sorted(people) and len(snap.labels) == 12
        stats = store.stats()
        assert stats["identities"] == 4 and stats["images"] == 12 and stats["schema_version"] == 1
        assert store.path == str(gallery)
        if isinstance(gallery, Path):
            assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_schema_version_newer_or_older_is_refused_naming_the_file(gallery: Path | str) -> None:
    with open_store(gallery, create=True) as store:
        for version, word in (("2", "newer"), ("0", "older")):
            store._conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,)
            )
            with pytest.raises(GalleryError, match=rf"{re.escape(str(gallery))}.*{word}"):
                open_store(gallery)


def test_not_a_gallery_and_missing_gallery_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="no gallery file"):
        GalleryStore(tmp_path / "absent.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(GalleryError, match="garbage.db: not a readable facelab gallery"):
        GalleryStore(garbage)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(GalleryError, match="not a facelab gallery"):
        GalleryStore(other)


def test_other_model_is_refused_and_nothing_changes(
    gallery: Path | str, model: FaceModel, people: dict[str, list[Path]]
) -> None:
    enroll(gallery, model, "person_0", people["person_0"], progress=False)
    with open_store(gallery) as store:
        before = store.revision()
        built_with = rf"{re.escape(str(gallery))}: gallery was built with mobilefacenet"
        with pytest.raises(GalleryError, match=built_with):
            enroll(store, tiny_model(seed=1), "person_1", people["person_1"], progress=False)
        with pytest.raises(GalleryError, match="fingerprint"):
            identify(store, tiny_model(seed=1), people["person_0"][:1], threshold=0.5)
        assert store.revision() == before
        assert [i.name for i in store.identities()] == ["person_0"]


def test_enrolled_name_is_refused_unless_append(
    gallery: Path | str, model: FaceModel, people: dict[str, list[Path]]
) -> None:
    enroll(gallery, model, "person_0", people["person_0"][:1], progress=False)
    with pytest.raises(GalleryError, match="already enrolled: 'person_0'"):
        enroll_people(
            gallery, model, {"person_1": people["person_1"], "person_0": people["person_0"]}
        )
    with open_store(gallery) as store:
        assert [(i.name, i.images) for i in store.identities()] == [("person_0", 1)]
        enroll(store, model, "person_0", people["person_0"][1:], append=True, progress=False)
        assert [(i.name, i.images) for i in store.identities()] == [("person_0", 3)]
    with pytest.raises(GalleryError, match="cannot be an identity name"):
        enroll(gallery, model, "Unknown", people["person_1"])


def test_bad_image_names_the_file_and_stores_nothing(
    tmp_path: Path, gallery: Path | str, model: FaceModel, people: dict[str, list[Path]]
) -> None:
    enroll(gallery, model, "person_0", people["person_0"], progress=False)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    for bad in (corrupt, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=bad.name):
            enroll(gallery, model, "person_1", [people["person_1"][0], bad], progress=False)
    with open_store(gallery) as store:
        assert [(i.name, i.images) for i in store.identities()] == [("person_0", 3)]


def test_remove_and_rename(
    gallery: Path | str, model: FaceModel, people: dict[str, list[Path]]
) -> None:
    with open_store(gallery, create=True) as store:
        enroll_people(store, model, people, progress=False)
        assert store.remove("person_0") == 3
        store.rename("person_1", "Alice")
        assert [i.name for i in store.identities()] == ["Alice", "person_2", "person_3"]
        assert store.snapshot().embeddings.shape == (9, 32)
        assert store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 9
        with pytest.raises(GalleryError, match="'person_0' is not enrolled"):
            store.remove("person_0")
        with pytest.raises(GalleryError, match="'person_2' already exists"):
            store.rename("Alice", "person_2")


# -- search ---------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_same_as_exact(
    vectors: np.ndarray, queries: np.ndarray, method: str, k: int
) -> np.ndarray:
    """`method` finds exactly exact search's rows and scores; the exact scores."""
    exact_scores, exact_rows = build_index(vectors, "exact").search(queries, k)
    scores, rows = build_index(vectors, method).search(queries, k)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    return exact_scores


def test_exact_and_faiss_flat_agree() -> None:
    rng = np.random.default_rng(0)
    vectors, queries = unit(rng.normal(size=(3000, 64))), unit(rng.normal(size=(70, 64)))
    exact_scores = assert_same_as_exact(vectors, queries, "flat", 10)
    brute = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(exact_scores, brute, atol=1e-6)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_recall_is_reasonable(method: str) -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(5000, 64)))
    mates = rng.choice(len(vectors), 200, replace=False)
    queries = unit(vectors[mates] + 0.08 * rng.normal(size=(200, 64)))
    _, exact = build_index(vectors, "exact").search(queries, 1)
    _, approx = build_index(vectors, method).search(queries, 1)
    assert np.mean(exact[:, 0] == approx[:, 0]) >= 0.9


def test_ivfpq_gives_exact_top1_and_scores_on_easy_data() -> None:
    """Above IVFPQ_MIN_ROWS the index is a real IVF-PQ one; on well-separated mates its
    re-ranked answer is exact search's, scores included (they come from the full vectors)."""
    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(3000, 64)))
    mates = rng.choice(len(vectors), 100, replace=False)
    queries = unit(vectors[mates] + 0.02 * rng.normal(size=(100, 64)))
    index = build_index(vectors, "ivfpq", nprobe=16)
    assert type(index.index).__name__ == "IndexRefineFlat"
    exact_scores, exact_rows = build_index(vectors, "exact").search(queries, 3)
    scores, rows = index.search(queries, 3)
    np.testing.assert_array_equal(rows[:, 0], exact_rows[:, 0])
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], atol=1e-5)
    # Rows added after the build (a replica's patch) are found as well.
    extra = unit(rng.normal(size=(5, 64)))
    index.add(extra)
    np.testing.assert_array_equal(index.search(extra, 1)[1][:, 0], np.arange(3000, 3005))


def test_one_query_searches_on_one_openmp_thread() -> None:
    """A single query gains nothing from OpenMP threads, which wait for each other (20x slower
    on a busy machine); batches keep the caller's thread count, restored after either."""
    import faiss

    rng = np.random.default_rng(11)
    vectors, queries = unit(rng.normal(size=(1000, 16))), unit(rng.normal(size=(4, 16)))
    index = build_index(vectors, "ivfpq", nlist=8)
    inner, seen = index.index, []

    class Recording:
        ntotal = inner.ntotal

        def search(self, q: np.ndarray, k: int, params: object = None) -> tuple:
            seen.append((len(q), faiss.omp_get_max_threads()))
            return inner.search(q, k, params=params)

    index.index = Recording()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        index.search(queries[:1], 3)
        index.search(queries, 3)
        assert seen == [(1, 1), (4, 2)]
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_ivfpq_builds_on_one_openmp_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads made a 1M build 4x slower on a busy machine; the caller's count is back
    after the build."""
    import faiss

    from facelab.gallery import search as search_module

    seen = []

    def recording(*args: object) -> object:
        seen.append(faiss.omp_get_max_threads())
        return new_index(*args)

    new_index = search_module._new_index
    monkeypatch.setattr(search_module, "_new_index", recording)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        build_index(unit(np.random.default_rng(12).normal(size=(1000, 16))), "ivfpq")
        assert seen == [1]
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_ivfpq_below_its_minimum_searches_exactly() -> None:
    rng = np.random.default_rng(6)
    vectors, queries = unit(rng.normal(size=(300, 32))), unit(rng.normal(size=(20, 32)))
    assert_same_as_exact(vectors, queries, "ivfpq", 5)


def test_auto_is_exact_for_small_galleries_and_ivfpq_above(
    monkeypatch: pytest.MonkeyPatch, gallery: Path | str
) -> None:
    """`auto` picks by size at each build, and a replica whose gallery crosses the bound
    rebuilds with the other method."""
    from facelab.gallery import search as search_module

    monkeypatch.setattr(search_module, "AUTO_EXACT_MAX", 700)
    rng = np.random.default_rng(7)
    assert type(build_index(unit(rng.normal(size=(700, 16))), "auto")).__name__ == "ExactIndex"
    assert type(build_index(unit(rng.normal(size=(701, 16))), "auto")).__name__ == "FaissIndex"
    groups = {f"id{i:03d}": unit(rng.normal(size=(1, 16))) for i in range(690)}
    with store_with_vectors(gallery, groups) as store:
        search = GallerySearch(store, "auto", nprobe=8)
        assert search.search(groups["id007"], k=1)[0][0].identity == "id007"
        assert search.built == "exact"
        more = {f"new{i:02d}": unit(rng.normal(size=(1, 16))) for i in range(20)}
        add_vectors(store, more)
        assert search.search(more["new03"], k=1)[0][0].identity == "new03"
        assert search.built == "ivfpq"


def test_a_rebuild_is_built_by_fetch_and_only_swapped_in_by_apply(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A replica fetches outside its lock and applies under it: a slow FAISS build must
    happen in fetch, or every search waits for it."""
    from facelab.gallery import search as search_module
    from facelab.gallery.store import Snapshot

    rng = np.random.default_rng(10)
    groups = {"a": unit(rng.normal(size=(2, 16))), "b": unit(rng.normal(size=(1, 16)))}
    with store_with_vectors(tmp_path / "g.db", groups) as store:
        search = GallerySearch(store, "flat")
        assert search.search(groups["b"], k=1)[0][0].identity == "b"
        store.rename("b", "c")
        change = search.fetch()
        assert isinstance(change, Snapshot)  # a full load still reads as one (replica counts)
        assert search.query(groups["b"], k=1)[0][0].identity == "b"  # not yet applied

        def no_build(*args: object, **kwargs: object) -> None:
            raise AssertionError("apply built an index")

        monkeypatch.setattr(search_module, "build_index", no_build)
        search.apply(change)
        assert search.query(groups["b"], k=1)[0][0].identity == "c"
        assert search.revision == store.revision()


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ivfpq", {"nprobe": 0}, "search option nprobe must be an integer >= 1, not 0"),
        ("ivfpq", {"rerank": True}, "search option rerank must be an integer >= 1"),
        ("ivfpq", {"nlist": 2.5}, "search option nlist must be an integer >= 1, not 2.5"),
        ("ivfpq", {"ef_search": 64}, "'ivfpq' has no option 'ef_search'; known: nlist, nprobe"),
        ("exact", {"nprobe": 8}, "'exact' has no option 'nprobe'; known: none"),
        ("ivfp", {}, "unknown search method 'ivfp'"),
    ],
)
def test_search_options_are_checked_before_any_build(
    method: str, options: dict, message: str
) -> None:
    vectors = unit(np.random.default_rng(8).normal(size=(1000, 16)))
    with pytest.raises(ValueError, match=re.escape(message)):
        build_index(vectors, method, **options)
    with store_with_vectors(":memory:", {"a": vectors[:1]}) as store:
        with pytest.raises(ValueError, match=re.escape(message)):
            GallerySearch(store, method, **options)


def test_ivfpq_sub_quantisers_must_divide_the_dimension() -> None:
    vectors = unit(np.random.default_rng(9).normal(size=(1000, 16)))
    with pytest.raises(ValueError, match=r"pq_m \(5\) must divide the embedding dimension \(16\)"):
        build_index(vectors, "ivfpq", pq_m=5)


def store_with_vectors(path: Path | str, groups: dict[str, np.ndarray]) -> GalleryStore:
    """A gallery holding given embeddings (no model needed: a made-up ModelInfo)."""
    store = open_store(path, create=True)
    add_vectors(store, groups)
    return store


def add_vectors(store: GalleryStore, groups: dict[str, np.ndarray]) -> None:
    """Enroll each name with its given embeddings."""
    from facelab.gallery.store import EnrolledFace

    dim = next(iter(groups.values())).shape[1]
    store.add(
        {
            n: [EnrolledFace(f"{n}_{i}", "", 0, v) for i, v in enumerate(vs)]
            for n, vs in groups.items()
        },
        ModelInfo("synthetic", "f" * 16, dim, {}),
    )


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_identity_search_matches_brute_force(aggregate: str) -> None:
    rng = np.random.default_rng(2)
    groups = {f"id{i:02d}": unit(rng.normal(size=(1 + i % 4, 16))) for i in range(30)}
    queries = unit(rng.normal(size=(20, 16)))
    with store_with_vectors(":memory:", groups) as store:
        names = sorted(groups)
        if aggregate == "max":
            expected = np.stack([(queries @ groups[n].T).max(axis=1) for n in names], axis=1)
        else:
            expected = np.stack(
                [queries @ unit(groups[n].mean(0, keepdims=True))[0] for n in names], 1
            )
        for method in ("exact", "flat"):
            results = GallerySearch(store, method, aggregate).search(queries, k=5)
            for q, matches in enumerate(results):
                best = np.argsort(-expected[q])[:5]
                assert [m.identity for m in matches] == [names[i] for i in best]
                np.testing.assert_allclose([m.score for m in matches], expected[q, best], atol=1e-5)


def test_search_index_follows_store_changes(gallery: Path | str) -> None:
    rng = np.random.default_rng(3)
    groups = {"a": unit(rng.normal(size=(2, 16))), "b": unit(rng.normal(size=(1, 16)))}
    with store_with_vectors(gallery, groups) as store:
        search = GallerySearch(store, "hnsw")
        assert search.search(groups["b"], k=1)[0][0].identity == "b"
        # A change committed by another connection (another process) is seen too.
        with open_store(gallery) as other:
            other.rename("b", "c")
        assert search.search(groups["b"], k=1)[0][0].identity == "c"
        store.remove("c")
        assert search.search(groups["b"], k=5)[0][0].identity == "a"
        store.remove("a")
        with pytest.raises(GalleryError, match="gallery is empty"):
            search.search(groups["b"])


# -- decisions ------------------------------------------------------------------------------


def test_identify_and_unknown_decisions(
    tmp_path: Path, gallery: Path | str, model: FaceModel
) -> None:
    people = {f"p{i}": person_images(i, 3) for i in range(5)}
    enroll_people(gallery, model, {n: imgs[:2] for n, imgs in people.items()}, progress=False)
    probes = [people[n][2] for n in sorted(people)]
    scores = [r.score for r in identify(gallery, model, probes, k=3, threshold=-1.0)]
    results = identify(gallery, model, probes, k=3, threshold=-1.0)
    assert [r.identity for r in results] == sorted(people)
    assert all(len(r.candidates) == 3 and r.candidates[0].score == r.score for r in results)
    assert all(r.threshold.source == "given by the caller" for r in results)
    strict = identify(gallery, model, probes, threshold=max(scores) + 1e-3)
    assert [r.identity for r in strict] == [UNKNOWN] * 5
    assert strict[0].candidates[0].identity == "p0"  # candidates are still reported
    with pytest.raises(GalleryError, match="no calibrated threshold"):
        identify(gallery, model, probes)
    claim = verify_claim(gallery, model, "p1", people["p1"][2], threshold=scores[1] - 1e-4)
    assert claim.accepted and claim.score == pytest.approx(scores[1], abs=1e-5)
    assert not verify_claim(
        gallery, model, "p1", people["p1"][2], threshold=scores[1] + 1e-4
    ).accepted
    with pytest.raises(GalleryError, match="'nobody' is not enrolled"):
        verify_claim(gallery, model, "nobody", people["p1"][2], threshold=0.5)
    with GalleryStore(tmp_path / "empty.db", create=True) as empty:
        with pytest.raises(GalleryError, match="empty.db: gallery is empty"):
            identify(empty, model, probes, threshold=0.5)


def test_calibrate_stores_threshold_and_decisions_name_it(
    tmp_path: Path, gallery: Path | str, model: FaceModel
) -> None:
    root = tmp_path / "people"
    files = write_people(root, people=6, per_person=3)
    names = sorted(files)
    rows = [(files[n][0], files[n][j], 1) for n in names for j in (1, 2)]
    rows += [(files[a][0], files[b][1], 0) for a in names for b in names if a != b]
    trials = tmp_path / "trials.csv"
    trials.write_text(
        "".join(f"{a.relative_to(root)},{b.relative_to(root)},{y}\n" for a, b, y in rows)
    )
    chosen = calibrate(gallery, model, trials, target_far=0.1, images_root=root, progress=False)
    assert chosen.target_far == 0.1 and chosen.measured_far <= 0.1
    assert chosen.n_genuine == 12 and chosen.n_impostor == 30
    assert 0.0 <= chosen.measured_frr <= 1.0
    calibrate(gallery, model, trials, target_far=0.5, images_root=root, progress=False)
    with open_store(gallery) as store:
        assert store.threshold(0.1) == chosen
        assert store.threshold().target_far == 0.5  # the most recent is the default
        with pytest.raises(
            GalleryError, match=r"no threshold calibrated for FAR 0.01 \(calibrated: 0.5, 0.1\)"
        ):
            store.threshold(0.01)
    enroll(gallery, model, "person_0", files["person_0"][:1], progress=False)
    result = identify(gallery, model, files["person_0"][1:2], far=0.1)[0]
    assert result.threshold == chosen
    assert "target FAR 0.1" in result.threshold.describe()


def test_resolving_a_calibrated_threshold_reads_the_gallery_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identify and verify resolve the threshold per request: one read of the stored ones
    (the FAR was matched on a first read, then the threshold taken from a second)."""
    from facelab.gallery.service import resolve_threshold

    info = ModelInfo("synthetic", "f" * 16, 16, {})
    with GalleryStore(tmp_path / "g.db", create=True) as store:
        for far in (0.1, 0.01):
            store.set_threshold(Threshold(0.3 + far, "made up", far, far, 0.1, 10, 10), info)
        reads = []
        real = GalleryStore.thresholds
        monkeypatch.setattr(GalleryStore, "thresholds", lambda self: reads.append(1) or real(self))
        assert resolve_threshold(store, far=0.1).value == pytest.approx(0.4)
        assert resolve_threshold(store).target_far == 0.01  # the most recent
        assert len(reads) == 2


# -- face policy ----------------------------------------------------------------------------


class FakeDetector:
    """Faces by image: the red channel's first pixel says how many (0, 1 or 2); none in the
    enlarged or padded views the pipeline retries on (larger than the 36-px test images)."""

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        out = []
        for img in images:
            n = int(img[0, 0, 0]) % 3 if max(img.shape[:2]) <= 36 else 0
            boxes = np.array([[2, 2, 12, 12], [10, 10, 34, 34]], np.float32)[:n]  # 2nd is larger
            marks = (
                np.stack(
                    [
                        np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
                        * (b[2] - b[0])
                        + b[:2]
                        for b in boxes
                    ]
                )
                if n
                else np.zeros((0, 5, 2))
            )
            out.append(Detections(boxes, np.ones(n, np.float32), marks.astype(np.float32)))
        return out


def test_face_policies_with_a_detector(tmp_path: Path, gallery: Path | str) -> None:
    template = tuple(
        (x * 32, y * 32) for x, y in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
    )
    aligned = tiny_model(preprocess=Preprocess(size=32, alignment="five_point", template=template))
    images = []
    for faces in (0, 1, 2):
        img = person_images(faces, 1)[0]
        img[0, 0, 0] = faces
        path = tmp_path / f"faces{faces}.png"
        Image.fromarray(img).save(path)
        images.append(path)
    found = find_faces(aligned, images[1:], detector=FakeDetector())
    assert [(f.item, f.face, f.box) for f in found] == [
        (0, 0, (2, 2, 12, 12)),
        (1, 0, (10, 10, 34, 34)),
    ]
    every = find_faces(aligned, images[2:], all_faces=True, detector=FakeDetector())
    assert [(f.face, f.box[2]) for f in every] == [(0, 34), (1, 12)]  # largest first
    with pytest.raises(GalleryError, match="faces0.png: no face found"):
        enroll(gallery, aligned, "x", images, detector=FakeDetector(), progress=False)
    assert not gallery_exists(gallery) or open_store(gallery).identities() == []
    report = enroll(
        gallery,
        aligned,
        "x",
        images,
        no_face="skip",
        all_faces=True,
        detector=FakeDetector(),
        progress=False,
    )
    assert report.enrolled == {"x": 3} and report.skipped == [str(images[0])]
    centred = find_faces(aligned, images[:1], no_face="centre", detector=FakeDetector())
    assert len(centred) == 1 and centred[0].box is None


# -- mapping --------------------------------------------------------------------------------


def test_map_unknown_writes_csv_and_accuracy(tmp_path: Path, model: FaceModel) -> None:
    write_people(tmp_path / "known", people=5, per_person=2)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    truth = {}
    for p in range(5):
        for i, img in enumerate(person_images(p, 4)[2:]):
            name = f"img_{p}{i}.png"
            Image.fromarray(img).save(unknown / name)
            truth[name] = f"person_{p}"
    labels = tmp_path / "labels.csv"
    labels.write_text("image,identity\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    out = tmp_path / "out" / "submission.csv"
    result = map_unknown(model, tmp_path / "known", unknown, labels=labels, out=out, progress=False)
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["image", "identity"] and len(rows) == 11
    predicted = dict(rows[1:])
    assert set(predicted) == set(truth)
    expected = np.mean([predicted[k] == v for k, v in truth.items()])
    assert result.accuracy == pytest.approx(expected) and result.labelled == 10
    assert result.accuracy >= 0.8  # near-copies of the known images, even for a random network


def test_lfw_splits_are_deterministic_and_disjoint(lfw: Path) -> None:
    split = LfwSplit.from_root(lfw)
    assert len(split.gallery) == 1680 and len(split.impostors) == 5749 - 1680
    assert len(split.gallery) + len(split.probes) + len(split.impostors) == 13233
    gallery = {p for _, p in split.gallery}
    assert gallery.isdisjoint(p for _, p in split.probes)
    assert {n for n, _ in split.gallery} == {n for n, _ in split.known}
    assert {p for _, p in split.known}.isdisjoint(p for _, p in split.unknown)
    assert LfwSplit.from_root(lfw).unknown[:50] == split.unknown[:50]


@pytest.mark.slow
def test_eval_identification_on_lfw(lfw: Path, tmp_path: Path) -> None:
    model = FaceModel.create("dlib_resnet", pretrained=True).eval()
    report = eval_identification(model, lfw, out_dir=tmp_path, progress=False)
    assert report["rank1"] > 0.9 and report["mapping_accuracy"] > 0.9
    assert (tmp_path / "dir_far.png").stat().st_size > 0


# -- crashes and concurrency, with real processes ---------------------------------------------

CHILD = r"""
import os, signal, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from facelab.gallery import GalleryStore, enroll
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint

gallery, ckpt, prefix, count, per_person, kill_on = sys.argv[1:7]
model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
rng = np.random.default_rng(sum(map(ord, prefix)))
images = [rng.integers(0, 255, (36, 36, 3), dtype=np.uint8) for _ in range(int(per_person))]
if os.environ.get("GALLERY_GO"):  # start line: wait until every racer is loaded
    print("ready", flush=True)
    while not os.path.exists(os.environ["GALLERY_GO"]):
        time.sleep(0.01)
with GalleryStore(gallery, create=True) as store:
    if kill_on != "-":
        # Crash injection: SIGKILL ourselves when the 2nd identity's write reaches `kill_on`
        # (the 3rd image insert, or the COMMIT statement before it runs).
        seen = []
        def trace(sql):
            if sql.startswith(kill_on) and "1" in "".join(seen[-1:]):
                seen.append(sql)
                if kill_on != "INSERT INTO images" or len(seen) >= 4:
                    os.kill(os.getpid(), signal.SIGKILL)
        store._conn.set_trace_callback(trace)
    for i in range(int(count)):
        if kill_on != "-" and i == 1:
            seen.append("1")
        enroll(store, model, f"{prefix}{i}", images, progress=False)
        print(i, flush=True)
        peer = os.environ.get("GALLERY_PEER")
        deadline = time.monotonic() + 120
        while peer and f"{peer}{i}" not in {x.name for x in store.identities()}:
            if time.monotonic() > deadline:  # lockstep: the peer's identity i before our next
                sys.exit(f"{peer}{i} never appeared")
            time.sleep(0.005)
"""


def child(
    gallery: Path,
    ckpt: Path,
    prefix: str,
    count: int,
    per_person: int,
    kill_on: str = "-",
    go: Path | None = None,
    peer: str = "",
) -> subprocess.Popen:
    args = [str(gallery), str(ckpt), prefix, str(count), str(per_person), kill_on]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GALLERY_GO": str(go or ""), "GALLERY_PEER": peer}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def assert_consistent(gallery: Path, per_person: int) -> dict[str, int]:
    """The file opens, passes SQLite's integrity check, and every identity is complete."""
    with sqlite3.connect(gallery) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with GalleryStore(gallery) as store:
        counts = {i.name: i.images for i in store.identities()}
        assert all(n == per_person for n in counts.values()), counts
        assert len(store.snapshot().labels) == per_person * len(counts)
    return counts


@pytest.mark.parametrize("kill_on", ["INSERT INTO images", "COMMIT"])
def test_sigkill_mid_enrollment_leaves_gallery_as_before(
    tmp_path: Path, checkpoint: Path, kill_on: str
) -> None:
    gallery = tmp_path / "g.db"
    proc = child(gallery, checkpoint, "p", count=3, per_person=6, kill_on=kill_on)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert out.split() == ["0"]  # identity 0 committed, killed inside identity 1's transaction
    assert assert_consistent(gallery, per_person=6) == {"p0": 6}
    # The gallery is still writable after the crash (no stale lock, WAL recovered).
    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    enroll(gallery, model, "q0", person_images(0, 6), progress=False)
    assert assert_consistent(gallery, per_person=6) == {"p0": 6, "q0": 6}


def test_sigkill_at_a_random_moment_of_an_enrollment_loop(tmp_path: Path, checkpoint: Path) -> None:
    gallery = tmp_path / "g.db"
    proc = child(gallery, checkpoint, "p", count=10_000, per_person=40)
    assert proc.stdout.readline().strip() == "0"
    delay = np.random.default_rng(5).uniform(0.0, 0.3)  # scheduling adds its own randomness
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    printed = len(proc.stdout.read().split()) + 1
    counts = assert_consistent(gallery, per_person=40)
    assert printed <= len(counts) <= printed + 1, delay  # the last commit may precede its print
    assert set(counts) == {f"p{i}" for i in range(len(counts))}


def test_two_processes_enrolling_at_once_lose_nothing(tmp_path: Path, checkpoint: Path) -> None:
    gallery = tmp_path / "g.db"  # created by whichever process gets there first
    go = tmp_path / "go"
    # in lockstep (each waits for the other's identity i before its i + 1): on a loaded machine
    # one racer could otherwise finish before the other starts
    procs = [
        child(gallery, checkpoint, p, count=8, per_person=5, go=go, peer=peer)
        for p, peer in (("a", "b"), ("b", "a"))
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    counts = assert_consistent(gallery, per_person=5)
    assert sorted(counts) == sorted(f"{p}{i}" for p in "ab" for i in range(8))
    with GalleryStore(gallery) as store:
        assert store.revision() == 16
        created = {i.name: i.created for i in store.identities()}
    a = [t for n, t in created.items() if n[0] == "a"]
    b = [t for n, t in created.items() if n[0] == "b"]
    assert min(a) < max(b) and min(b) < max(a), "the two enrollments did not overlap in time"


# -- command line ---------------------------------------------------------------------------


def test_cli_enroll_identify_gallery(
    tmp_path: Path, gallery: Path | str, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_people(tmp_path / "people", people=3, per_person=2)
    g = ["--gallery", str(gallery)]
    assert main(["enroll", *g, "--model", str(checkpoint), "--tree", str(tmp_path / "people")]) == 0
    assert json.loads(capsys.readouterr().out)["enrolled"] == {n: 2 for n in files}
    assert main(["enroll", *g, "--name", "person_0", str(files["person_1"][0])]) == 2
    assert main(["identify", *g, str(files["person_1"][1])]) == 2  # no threshold anywhere
    capsys.readouterr()
    assert (
        main(["identify", *g, "--threshold", "-1", "-k", "2", "--csv", str(files["person_1"][1])])
        == 0
    )
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert rows[0]["identity"] == "person_1" and rows[0]["top_k"].startswith("person_1:")
    assert (
        main(["verify", *g, "--claim", "person_2", str(files["person_2"][0]), "--threshold", "0.5"])
        == 0
    )
    claim = json.loads(capsys.readouterr().out)
    assert claim["decision"] == "accept" and "given by the caller" in claim["reason"]
    assert main(["gallery", "rename", *g, "person_2", "Bob"]) == 0
    assert main(["gallery", "remove", *g, "person_0"]) == 0
    capsys.readouterr()
    assert main(["gallery", "list", *g]) == 0
    assert capsys.readouterr().out.split() == ["Bob", "2", "person_1", "2"]
    assert main(["gallery", "remove", *g, "nobody"]) == 2
