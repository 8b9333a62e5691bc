"""What only the PostgreSQL backend has: refusals of a database that is no gallery, writers
queueing on the revision lock, the change log that patches search indexes, replicas following
changes (LISTEN/NOTIFY) and saying when they are stale, and copying between the backends.
The behaviour both backends share is tested on both in test_gallery.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from postgres import Cluster, _free_port, postgres_cluster  # noqa: F401 (a fixture)
from test_gallery import person_images, store_with_vectors, tiny_model, unit

from facelab.cli import main
from facelab.gallery import GalleryError, GallerySearch, ModelInfo, Threshold, enroll, identify
from facelab.gallery.backends import copy_gallery, open_store
from facelab.gallery.postgres import Delta, GalleryUnavailable, PostgresStore, redact
from facelab.gallery.replica import GalleryReplica
from facelab.gallery.store import EnrolledFace

INFO = ModelInfo("synthetic", "f" * 16, 16, {})


def faces(vectors: np.ndarray, name: str = "x") -> list[EnrolledFace]:
    return [EnrolledFace(f"{name}_{i}", "", 0, v) for i, v in enumerate(vectors)]


def test_refusals_name_the_database(postgres_cluster: Cluster) -> None:  # noqa: F811
    address = postgres_cluster.new_database()
    with pytest.raises(GalleryError, match=rf"{address}: no gallery in this database"):
        open_store(address)
    postgres_cluster.sql("CREATE TABLE other (x int)", address.rsplit("/", 1)[1])
    with pytest.raises(GalleryError, match="a database with tables, but not a facelab gallery"):
        open_store(address, create=True)
    closed = f"postgresql://postgres:secret@127.0.0.1:{_free_port()}/db"
    with pytest.raises(GalleryUnavailable, match="cannot connect") as caught:
        open_store(closed, create=True, timeout=2)
    assert "secret" not in str(caught.value)
    assert redact(closed) == closed.replace(":secret", "")


def test_second_writer_waits_for_the_first_then_is_refused(
    postgres_cluster: Cluster,  # noqa: F811
) -> None:
    address = postgres_cluster.new_database()
    vectors = unit(np.random.default_rng(0).normal(size=(2, 16)))
    with open_store(address, create=True) as first, open_store(address) as second:
        outcome: list[BaseException | None] = []
        with first._write() as db:  # the first writer holds the lock, mid-transaction
            db.execute(
                "INSERT INTO identities (name, created) VALUES (?, ?)", ("alice", time.time())
            )
            racer = threading.Thread(target=lambda: outcome.append(_try_add(second, vectors)))
            racer.start()
            time.sleep(0.5)
            assert racer.is_alive() and not outcome, "the second writer did not wait"
            first._bump(db)
        racer.join(timeout=10)
        assert isinstance(outcome[0], GalleryError)
        assert "'alice' is already enrolled" in str(outcome[0])
        assert [(i.name, i.images) for i in second.identities()] == [("alice", 0)]
        assert second.revision() == 1  # only the winner's change was committed


def _try_add(store: PostgresStore, vectors: np.ndarray) -> BaseException | None:
    try:
        store.add({"alice": faces(vectors, "alice")}, INFO)
    except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
        return exc
    return None


@pytest.mark.parametrize(("method", "aggregate"), [("exact", "max"), ("flat", "mean")])
def test_patched_index_answers_as_a_rebuilt_one(
    postgres_cluster: Cluster,  # noqa: F811
    method: str,
    aggregate: str,
) -> None:
    rng = np.random.default_rng(4)
    groups = {f"id{i}": unit(rng.normal(size=(1 + i % 3, 16))) for i in range(20)}
    queries = unit(rng.normal(size=(15, 16)))
    with store_with_vectors(postgres_cluster.new_database(), groups) as store:
        patched = GallerySearch(store, method, aggregate)
        patched.search(queries)
        patches = 0
        for step in range(30):
            names = [i.name for i in store.identities()]
            op = step % 4
            if op == 0:
                store.add({f"new{step}": faces(unit(rng.normal(size=(2, 16))))}, INFO)
            elif op == 1:
                store.remove(names[step % len(names)])
            elif op == 2:
                store.rename(names[step % len(names)], f"renamed{step}")
            else:
                vectors = unit(rng.normal(size=(1, 16)))
                store.add({names[0]: faces(vectors)}, INFO, append=True)
            change = patched.fetch()
            patches += isinstance(change, Delta)
            patched.apply(change)
            rebuilt = GallerySearch(store, method, aggregate).search(queries, k=4)
            got = patched.query(queries, k=4)
            assert [[m.identity for m in r] for r in got] == [
                [m.identity for m in r] for r in rebuilt
            ]
            np.testing.assert_allclose(
                [[m.score for m in r] for r in got], [[m.score for m in r] for r in rebuilt], 1e-5
            )
        assert patches >= 20  # most steps patched; a few rebuilt when tombstones piled up


def wait_until(condition, timeout: float = 10.0) -> float:  # noqa: ANN001
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < timeout, "timed out"
        time.sleep(0.005)
    return time.perf_counter() - start


def test_replica_follows_changes_and_says_when_stale(postgres_cluster: Cluster) -> None:  # noqa: F811
    address = postgres_cluster.new_database()
    rng = np.random.default_rng(5)
    # a: enough rows that one tombstone stays below a quarter (a patch, not a rebuild)
    groups = {"a": unit(rng.normal(size=(6, 16))), "b": unit(rng.normal(size=(1, 16)))}
    with store_with_vectors(address, groups) as writer:
        replica = GalleryReplica(address, poll=30.0)  # notifications only, no polling
        try:
            assert replica.status().stale is False and replica.status().revision == 1
            assert replica.search(groups["b"], k=1)[0][0].identity == "b"
            writer.rename("b", "c")
            wait_until(lambda: replica.revision == 2, timeout=2.0)
            assert replica.search(groups["b"], k=1)[0][0].identity == "c"
            assert replica._dead_rows == 1  # patched in, not rebuilt
            # The server closes the replica's connection: it says it is stale, reconnects, and
            # catches up a change made meanwhile from the change log.
            pids = postgres_cluster.sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'facelab' "
                f"AND pid <> {writer._conn.raw.info.backend_pid}"
            ).split()
            assert len(pids) == 1
            postgres_cluster.sql(f"SELECT pg_terminate_backend({pids[0]})")
            writer.add({"d": faces(groups["b"])}, INFO)
            wait_until(lambda: replica.revision == 3)
            status = replica.status()
            assert status.stale is False and status.revision == 3
            assert {m.identity for m in replica.search(groups["b"], k=2)[0]} == {"c", "d"}
            assert replica._dead_rows == 1  # the missed change came as a patch too
        finally:
            replica.close()


def test_replica_serves_stale_data_while_the_database_is_down(
    postgres_cluster: Cluster,  # noqa: F811
) -> None:
    address = postgres_cluster.new_database()
    groups = {"a": unit(np.random.default_rng(6).normal(size=(2, 16)))}
    store_with_vectors(address, groups).close()
    replica = GalleryReplica(address, poll=0.2)
    try:
        postgres_cluster.stop()
        wait_until(lambda: replica.status().stale)
        assert "cannot connect" in replica.status().reason or "lost" in replica.status().reason
        assert replica.search(groups["a"], k=1)[0][0].identity == "a"  # still answers
        assert replica.catch_up(timeout=0.5) is False
    finally:
        postgres_cluster.start()
    try:
        wait_until(lambda: not replica.status().stale, timeout=20)
        with open_store(address) as store:
            store.add({"b": faces(groups["a"])}, INFO)
        assert replica.catch_up(timeout=5)
        assert replica.revision == 2
    finally:
        replica.close()


def test_copy_between_backends_keeps_identify_answers(
    tmp_path: Path,
    postgres_cluster: Cluster,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tiny_model()
    people = {f"p{i}": person_images(i, 3) for i in range(6)}
    sqlite = tmp_path / "g.db"
    for name, images in people.items():
        enroll(sqlite, model, name, images[:2], progress=False)
    info = ModelInfo.of(model)
    with open_store(sqlite) as store:
        for far, value in ((0.1, 0.2), (0.01, 0.4)):  # the later one is the default
            store.set_threshold(Threshold(value, "test", far, far, 0.1, 6, 30), info)
        store.set_model_source("tiny.pt")
    postgres = postgres_cluster.new_database()
    back = tmp_path / "back.db"
    assert main(["gallery", "copy", str(sqlite), postgres]) == 0
    assert '"identities": 6' in capsys.readouterr().out
    assert main(["gallery", "copy", postgres, str(back)]) == 0
    probes = [images[2] for images in people.values()]
    answers = []
    for gallery in (sqlite, postgres, back):
        results = identify(gallery, model, probes, k=3)
        answers.append(
            [(r.identity, [(m.identity, m.score) for m in r.candidates]) for r in results]
        )
        with open_store(gallery) as store:
            assert [t.value for t in store.thresholds()] == [0.4, 0.2]
            assert store.model() == info and store.model_source() == "tiny.pt"
            assert [i.images for i in store.identities()] == [2] * 6
    assert answers[0] == answers[1] == answers[2]
    assert [candidates[0][0] for _, candidates in answers[0]] == sorted(people)
    with pytest.raises(GalleryError, match="not empty"):
        copy_gallery(sqlite, postgres)


def test_requests_never_list_the_whole_gallery(
    postgres_cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listing every identity took 1.3 s per request at 100k people: enroll, identify, claims
    and removal look names up one by one instead."""
    from fastapi.testclient import TestClient
    from serving import KEYS, READ, WRITE, png, upload
    from serving import tiny_model as serving_model

    from facelab.gallery.store import GalleryStore
    from facelab.serve.app import ServeConfig, create_app

    address = postgres_cluster.new_database()
    app = create_app(serving_model(), ServeConfig(gallery=address, keys=KEYS))

    def listed(_: GalleryStore) -> None:
        raise AssertionError("a request listed the whole gallery")

    monkeypatch.setattr(GalleryStore, "identities", listed)
    with TestClient(app) as client:
        enroll = {"data": {"name": "Ada"}, "files": [upload("images", png(1))], "headers": WRITE}
        assert client.post("/v1/enroll", **enroll).status_code == 200
        assert client.post("/v1/enroll", **enroll).status_code == 409
        files = [upload("image", png(1))]
        reply = client.post("/v1/identify", data={"threshold": "0.5"}, files=files, headers=READ)
        assert reply.status_code == 200 and reply.json()["faces"][0]["identity"] == "Ada"
        claim = {"identity": "Bob", "threshold": "0.5"}
        assert client.post("/v1/verify", data=claim, files=files, headers=READ).status_code == 404
        assert client.delete("/v1/identities/Ada", headers=WRITE).status_code == 200
        assert client.delete("/v1/identities/Ada", headers=WRITE).status_code == 404
        reply = client.post("/v1/identify", data={"threshold": "0.5"}, files=files, headers=READ)
        assert reply.json()["error"] == "empty_gallery"


def test_replica_and_enrollment_messages_never_show_the_password(
    postgres_cluster: Cluster,  # noqa: F811
) -> None:
    """A replica's refusals reach API clients (404, 503) and an enrollment's report is printed:
    they name the gallery as its stores do, without the password in its address."""
    address = postgres_cluster.new_database()
    with_password = address.replace("postgres@", "postgres:secret@")
    report = enroll(with_password, tiny_model(), "ada", person_images(1, 2), progress=False)
    assert report.gallery == address
    replica = GalleryReplica(with_password)
    try:
        with pytest.raises(GalleryError, match="'nobody' is not enrolled") as caught:
            replica.offline().embeddings("nobody")
        assert "secret" not in str(caught.value) and address in str(caught.value)
    finally:
        replica.close()
    closed = f"postgresql://postgres:secret@127.0.0.1:{_free_port()}/db"
    with pytest.raises(GalleryError, match="replica could not load the gallery") as caught:
        GalleryReplica(closed, start_timeout=1)
    assert "secret" not in str(caught.value)
