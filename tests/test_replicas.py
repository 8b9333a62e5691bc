"""Two real `facelab serve` replicas over one PostgreSQL gallery: changes on one are answered by
the other, and faults (a replica killed mid-enrollment, PostgreSQL restarted under load, both
replicas enrolling one name at once, connections closed by the server) lose nothing, leave
nothing half-written, and every client gets an answer saying what happened.

A replica that restarts with a saved index (`--snapshot`) reads only the changes since it; one
whose saved index is missing, damaged, of another gallery or model, or older than the pruned
change log reads the whole gallery and says why. While the database is down, searches are
answered from the replica's index, marked stale; changes are refused.

Latency is measured by benchmarks/pg_replicas.py, not asserted here (beyond "eventually")."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from postgres import Cluster, Replica, postgres_cluster  # noqa: F401 (a fixture)
from serving import png, tiny_model, upload
from test_gallery import store_with_vectors, unit
from test_gallery_postgres import INFO, faces

from facelab.cli import main
from facelab.gallery import replica as replica_module
from facelab.gallery.backends import open_store
from facelab.gallery.replica import GalleryReplica, index_vectors
from facelab.gallery.saved_index import (
    SavedIndexUnusable,
    load_index,
    save_index,
    saved_index_path,
)
from facelab.gallery.search import ExactIndex, GallerySearch, build_index
from facelab.gallery.store import GalleryError
from facelab.models.checkpoint import save_checkpoint

httpx = pytest.importorskip("httpx")
IMAGES_PER_PERSON = 3


class Pair:
    """Replicas a and b over one fresh database; `restart_a` after a kill."""

    def __init__(self, cluster: Cluster, checkpoint: Path, logs: Path) -> None:
        self.cluster = cluster
        self.gallery = cluster.new_database()
        self.checkpoint = str(checkpoint)
        self.logs = logs
        self.a = Replica(self.gallery, self.checkpoint, log=logs / "a.log")
        self.b = Replica(self.gallery, self.checkpoint, log=logs / "b.log")

    def restart_a(self) -> None:
        self.a = Replica(self.gallery, self.checkpoint, log=self.logs / "a2.log")

    def close(self) -> None:
        for replica in (self.a, self.b):
            if replica.proc.poll() is None:
                replica.stop()


@pytest.fixture(scope="module")
def pair(
    postgres_cluster: Cluster,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("replicas")
    checkpoint = save_checkpoint(folder / "tiny.pt", tiny_model())
    pair = Pair(postgres_cluster, checkpoint, folder)
    yield pair
    pair.close()


def enroll(url: str, name: str, seed: int, count: int = IMAGES_PER_PERSON) -> httpx.Response:
    files = [upload("images", png(seed * 100 + i)) for i in range(count)]
    return httpx.post(f"{url}/v1/enroll", data={"name": name}, files=files, timeout=60)


def top_match(url: str, seed: int) -> tuple[str, httpx.Response]:
    """The best candidate for image 0 of person `seed` (threshold -1: always a candidate)."""
    r = httpx.post(
        f"{url}/v1/identify",
        data={"threshold": "-1", "k": "1"},
        files=[upload("image", png(seed * 100))],
        timeout=60,
    )
    return (r.json()["faces"][0]["identity"] if r.status_code == 200 else ""), r


def stored(pair: Pair) -> dict[str, int]:
    with open_store(pair.gallery) as store:
        return {i.name: i.images for i in store.identities()}


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_enrollment_and_removal_on_one_are_answered_by_the_other(pair: Pair) -> None:
    assert enroll(pair.a.url, "sync_0", 1).status_code == 200
    wait_for(lambda: top_match(pair.b.url, 1)[0] == "sync_0")
    name, reply = top_match(pair.b.url, 1)
    assert reply.headers["X-Gallery-Stale"] == "false"
    revision = int(reply.headers["X-Gallery-Revision"])
    info = httpx.get(f"{pair.b.url}/v1/info").json()["gallery"]
    assert info["backend"] == "postgresql" and info["stale"] is False
    assert info["revision"] >= revision
    # The replica that enrolled answers with it at once (read-your-writes).
    assert enroll(pair.b.url, "sync_1", 2).status_code == 200
    assert top_match(pair.b.url, 2)[0] == "sync_1"
    assert httpx.delete(f"{pair.b.url}/v1/identities/sync_0").status_code == 200
    wait_for(lambda: top_match(pair.a.url, 1)[0] != "sync_0")


def gallery_status(replica: Replica) -> dict:
    return httpx.get(f"{replica.url}/v1/info").json()["gallery"]


def test_replica_answers_stale_while_the_database_is_down(pair: Pair) -> None:
    assert enroll(pair.a.url, "before_outage", 3).status_code == 200
    wait_for(lambda: top_match(pair.b.url, 3)[0] == "before_outage")
    revision = gallery_status(pair.b)["revision"]
    pair.cluster.stop()
    try:
        wait_for(lambda: httpx.get(f"{pair.b.url}/healthz").headers["X-Gallery-Stale"] == "true")
        info = gallery_status(pair.b)
        assert info["stale"] is True and info["connected"] is False and info["stale_since"] > 0
        assert pair.gallery.rsplit("/", 1)[0] in info["reason"]
        # Searches are answered from the replica's index, saying so ...
        name, reply = top_match(pair.b.url, 3)
        assert reply.status_code == 200 and name == "before_outage"
        body = reply.json()
        assert body["stale"] is True and body["revision"] == revision
        assert body["stale_for_s"] > 0 and reply.headers["X-Gallery-Stale"] == "true"
        claim = httpx.post(
            f"{pair.b.url}/v1/verify",
            data={"identity": "before_outage", "threshold": "0.5"},
            files=[upload("image", png(300))],
            timeout=60,
        )
        assert claim.status_code == 200 and claim.json()["decision"] == "accept"
        assert claim.json()["stale"] is True and claim.json()["revision"] == revision
        # ... changes are refused, saying why.
        reply = enroll(pair.a.url, "during_outage", 4)
        assert reply.status_code == 503 and "cannot connect" in reply.json()["detail"]
        reply = httpx.delete(f"{pair.b.url}/v1/identities/before_outage")
        assert reply.status_code == 503 and reply.json()["error"] == "gallery_unavailable"
    finally:
        pair.cluster.start()
    wait_for(lambda: httpx.get(f"{pair.b.url}/healthz").headers["X-Gallery-Stale"] == "false")
    name, reply = top_match(pair.b.url, 3)
    assert name == "before_outage" and reply.json()["stale"] is False
    assert reply.json()["stale_for_s"] is None
    assert "during_outage" not in stored(pair) and "before_outage" in stored(pair)


def test_replica_restarted_with_a_saved_index_reads_only_the_changes(
    pair: Pair, tmp_path: Path
) -> None:
    folder = str(tmp_path / "snapshots")
    # A gallery with something in it (an empty one is never saved), whichever tests ran before.
    assert enroll(pair.a.url, "before_c_started", 8).status_code == 200
    c = Replica(pair.gallery, pair.checkpoint, "--snapshot", folder, log=pair.logs / "c.log")
    try:
        first = gallery_status(c)
        assert first["full_loads"] == 1 and first["snapshot_revision"] is None
    finally:
        c.stop()  # saves its index on the way out (and did after its full read)
    assert enroll(pair.a.url, "while_c_was_down", 7).status_code == 200
    c = Replica(pair.gallery, pair.checkpoint, "--snapshot", folder, log=pair.logs / "c2.log")
    try:
        status = gallery_status(c)
        assert status["full_loads"] == 0 and status["snapshot_revision"] == first["revision"]
        assert status["rows_read"] == IMAGES_PER_PERSON  # the one enrollment made meanwhile
        assert top_match(c.url, 7)[0] == "while_c_was_down"
        listed = httpx.get(f"{c.url}/v1/identities").json()["identities"]
        assert {i["name"]: i["images"] for i in listed} == stored(pair)
    finally:
        c.stop()


def race(replicas: list[Replica], name: str, seeds: list[int]) -> list[httpx.Response]:
    """Both replicas asked to enroll `name` at the same moment (different images)."""
    start = threading.Barrier(len(replicas))
    replies: list[httpx.Response] = [None] * len(replicas)  # type: ignore[list-item]

    def post(i: int) -> None:
        files = [upload("images", png(seeds[i]))]
        start.wait()
        replies[i] = httpx.post(
            f"{replicas[i].url}/v1/enroll", data={"name": name}, files=files, timeout=60
        )

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_two_replicas_enrolling_one_name_at_once_exactly_one_wins(pair: Pair) -> None:
    for round_ in range(6):
        name = f"race_{round_}"
        replies = race([pair.a, pair.b], name, [1000 + round_, 2000 + round_])
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 409], [r.text for r in replies]
        loser = next(r for r in replies if r.status_code == 409)
        assert loser.json()["error"] == "conflict" and name in loser.json()["detail"]
        assert stored(pair)[name] == 1


class Load:
    """Clients enrolling on replica a (each name once) and identifying on b until stopped;
    every reply or failure recorded."""

    def __init__(self, pair: Pair, prefix: str, seeds: int) -> None:
        self.pair, self.prefix, self.seeds = pair, prefix, seeds  # images of name i: seeds + i
        self.enrolled: dict[str, int | str] = {}  # name -> status code, or the exception
        self.identified: list[int | str] = []
        self.details: list[str] = []  # what refused enrollments were told
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._enroll, daemon=True),
            threading.Thread(target=self._identify, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _enroll(self) -> None:
        i = 0
        while not self._stop.is_set():
            name = f"{self.prefix}_{i}"
            try:
                reply = enroll(self.pair.a.url, name, self.seeds + i)
                self.enrolled[name] = reply.status_code
                if reply.status_code != 200:
                    self.enrolled[name] = f"{reply.status_code} {reply.json()['error']}"
                    self.details.append(reply.json()["detail"])
            except httpx.TransportError as exc:  # the replica died: no answer, and it says so
                self.enrolled[name] = type(exc).__name__
                time.sleep(0.05)
            i += 1

    def _identify(self) -> None:
        while not self._stop.is_set():
            try:
                reply = top_match(self.pair.b.url, 1)[1]
                ok = reply.status_code == 200
                self.identified.append(
                    200 if ok else f"{reply.status_code} {reply.json()['error']}"
                )
            except httpx.TransportError as exc:
                self.identified.append(type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def check_after_fault(pair: Pair, load: Load) -> None:
    """Nothing lost (every acknowledged enrollment stored, and answered by both replicas),
    nothing half-written (every stored identity complete), every client answered."""
    told = {200, "503 gallery_unavailable", "ConnectError", "RemoteProtocolError", "ReadError"}
    assert set(load.enrolled.values()) <= told, set(load.enrolled.values())
    assert set(load.identified) <= told, set(load.identified)
    gallery = stored(pair)
    for name, outcome in load.enrolled.items():
        if outcome == 200:
            assert gallery.get(name) == IMAGES_PER_PERSON, name
    mine = {n: c for n, c in gallery.items() if n.startswith(load.prefix)}
    assert all(c == IMAGES_PER_PERSON for c in mine.values()), mine
    assert set(mine) <= set(load.enrolled)
    assert load.enrolled, "the load sent nothing"
    for replica in (pair.a, pair.b):
        wait_for(lambda r=replica: not httpx.get(f"{r.url}/v1/info").json()["gallery"]["stale"])
    last = max(mine, key=lambda n: int(n.rsplit("_", 1)[1]))
    seed = load.seeds + int(last.rsplit("_", 1)[1])
    for replica in (pair.a, pair.b):
        wait_for(lambda r=replica: top_match(r.url, seed)[0] == last)
        listed = httpx.get(f"{replica.url}/v1/identities").json()["identities"]
        assert {i["name"]: i["images"] for i in listed} == gallery


def test_postgres_restart_under_load(pair: Pair) -> None:
    load = Load(pair, "restart", seeds=10_000)
    time.sleep(2)
    pair.cluster.restart()
    time.sleep(2)
    load.stop()
    assert 200 in load.enrolled.values()
    check_after_fault(pair, load)


def test_connections_closed_by_the_server_under_load(pair: Pair) -> None:
    load = Load(pair, "terminated", seeds=20_000)
    for _ in range(5):
        time.sleep(0.5)
        pair.cluster.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'facelab'"
        )
    time.sleep(1)
    load.stop()
    check_after_fault(pair, load)


def test_replica_killed_mid_enrollment(pair: Pair) -> None:
    load = Load(pair, "killed", seeds=30_000)
    wait_for(lambda: len(load.enrolled) >= 2)
    time.sleep(np.random.default_rng().uniform(0.0, 0.5))
    pair.a.kill()
    time.sleep(0.5)
    load.stop()
    assert any(isinstance(o, str) for o in load.enrolled.values())  # the client was told
    pair.restart_a()
    check_after_fault(pair, load)


# -- catching up from a saved index, and the pruned change log (the replica in this process) ----


def rng_people(seed: int, count: int, prefix: str = "p") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}{seed}_{i}": unit(rng.normal(size=(2, 16))) for i in range(count)}


def answers(search: GallerySearch, queries: np.ndarray) -> list[list[str]]:
    return [[m.identity for m in r] for r in search.query(queries, k=4)]


def full_answers(address: str, queries: np.ndarray) -> list[list[str]]:
    """What an index read whole from the database answers now."""
    with open_store(address) as store:
        search = GallerySearch(store)
        search.refresh()
        return answers(search, queries)


def change_gallery(address: str, seed: int) -> int:
    """Two people enrolled (2 embeddings each) and one removed; the embeddings added."""
    added = rng_people(seed, 2, "new")
    with open_store(address) as store:
        store.add({name: faces(v, name) for name, v in added.items()}, INFO)
        store.remove("p1_0")
    return sum(len(v) for v in added.values())


@pytest.fixture(params=["exact"])
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def saved(
    postgres_cluster: Cluster,  # noqa: F811
    tmp_path: Path,
    method: str,
) -> tuple[str, Path]:
    """A gallery of 20 people (40 embeddings) and the index a replica saved of it on close."""
    address = postgres_cluster.new_database()
    store_with_vectors(address, rng_people(1, 20)).close()
    replica = GalleryReplica(address, method, snapshot_dir=tmp_path)
    status = replica.status()
    assert (status.full_loads, status.rows_read, status.snapshot_revision) == (1, 40, None)
    replica.close()
    return address, saved_index_path(tmp_path, address)


QUERIES = unit(np.random.default_rng(9).normal(size=(12, 16)))


@pytest.mark.parametrize("method", ["exact", "flat", "hnsw", "ivf"], indirect=True)
def test_restarted_replica_reads_only_the_changes_since_its_saved_index(
    saved: tuple[str, Path], method: str
) -> None:
    address, path = saved
    assert load_index(path).revision == 1 and len(load_index(path).labels) == 40
    added = change_gallery(address, 2)
    replica = GalleryReplica(address, method, snapshot_dir=path.parent)
    try:
        status = replica.status()
        assert status.full_loads == 0 and status.snapshot_revision == 1
        assert status.rows_read == added  # the two new people only, not the 40 + 4 rows
        assert status.revision == 3
        assert answers(replica, QUERIES) == full_answers(address, QUERIES)
        with open_store(address) as store:  # what it answers verify with, without the database
            for name in ("p1_1", "new2_0"):
                np.testing.assert_allclose(
                    replica.offline().embeddings(name), store.embeddings(name), atol=1e-6
                )
    finally:
        replica.close()
    assert load_index(path).revision == 3  # saved again on close, compacted
    assert len(load_index(path).labels) == 40 - 2 + added


def test_a_restarted_exact_replica_appends_the_changes_behind_the_saved_rows(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes since the saved index go into the room read after its vectors: growing the
    index instead copied every saved row (512 MiB at a million) and doubled them at peak."""
    address, path = saved
    loaded = []

    def recording(*args: object, **kwargs: object) -> object:
        loaded.append(load_index(*args, **kwargs))  # type: ignore[arg-type]
        return loaded[-1]

    monkeypatch.setattr(replica_module, "load_index", recording)
    added = change_gallery(address, 2)
    replica = GalleryReplica(address, "exact", snapshot_dir=path.parent)
    try:
        index = replica._index
        assert isinstance(index, ExactIndex) and len(index.vectors) == 40 + added
        assert np.shares_memory(index.vectors, loaded[0].vectors)  # no copy of the 40
        assert answers(replica, QUERIES) == full_answers(address, QUERIES)
    finally:
        replica.close()


def test_an_exact_index_over_leading_rows_appends_into_the_rest() -> None:
    buffer = unit(np.random.default_rng(5).normal(size=(6, 16))).astype(np.float32)
    index = ExactIndex(buffer, rows=4)
    _, rows = index.search(buffer[4:6], 4)
    assert set(rows.ravel()) <= {0, 1, 2, 3}  # rows 4 and 5 are room, not searched
    index.add(-buffer[:2])
    assert np.shares_memory(index.vectors, buffer) and len(index.vectors) == 6
    np.testing.assert_array_equal(buffer[4:], -buffer[:2])
    assert index.search(-buffer[:2], 1)[1].ravel().tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"rows \(7\) must be within the 6 given"):
        ExactIndex(buffer, rows=7)


def _saved_arrays(path: Path, vectors: np.ndarray) -> None:
    header = json.dumps(
        {"format": 1, "revision": 1, "gallery_id": "g", "fingerprint": "f", "aggregate": "max"}
    )
    np.savez(
        path,
        header=np.frombuffer(header.encode(), np.uint8),
        vectors=vectors,
        labels=np.arange(len(vectors), dtype=np.int64),
        names_utf8=np.frombuffer("".join(f"n{i}é" for i in range(len(vectors))).encode(), np.uint8),
        name_ends=np.cumsum([len(f"n{i}é".encode()) for i in range(len(vectors))]),
    )


def test_a_saved_index_is_read_with_room_after_its_vectors(tmp_path: Path) -> None:
    vectors = unit(np.random.default_rng(6).normal(size=(70_000, 16))).astype(np.float32)
    _saved_arrays(tmp_path / "s.npz", vectors)  # more than one piece of the reader
    saved = load_index(tmp_path / "s.npz", room=0.5)
    np.testing.assert_array_equal(saved.vectors, vectors)
    assert saved.vectors.base.shape == (105_000, 16)
    assert saved.names[:2] == ["n0é", "n1é"] and saved.names[-1] == "n69999é"
    assert load_index(tmp_path / "s.npz").vectors.base.shape == (70_000, 16)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.full((3, 4), np.nan, np.float32), "vectors that are not finite"),
        (np.r_[np.zeros((70_000, 4)), [[0, np.inf, 0, 0]]].astype(np.float32), "not finite"),
        (np.zeros((3, 4)), "vectors are float64 (3, 4), not float32 rows"),
        (np.zeros(3, np.float32), "not float32 rows"),
    ],
)
def test_a_saved_index_with_bad_vectors_is_refused_naming_the_file(
    tmp_path: Path, vectors: np.ndarray, message: str
) -> None:
    _saved_arrays(tmp_path / "bad.npz", vectors)
    expected = f"bad.npz: damaged saved index.*{re.escape(message)}"
    with pytest.raises(SavedIndexUnusable, match=expected):
        load_index(tmp_path / "bad.npz", room=0.5)


@pytest.mark.parametrize(
    ("promised", "message"),
    [
        (10, "damaged.*vectors claim 10x4 values, the file has 48 bytes"),
        (2**40, "damaged.*vectors claim 1099511627776x4 values"),
        (2, "damaged.*bytes after the vectors"),
    ],
)
def test_a_saved_index_whose_vectors_header_lies_is_refused(
    tmp_path: Path, promised: int, message: str
) -> None:
    """A header promising more rows than follow must not leave uninitialised rows (nor make
    the reader allocate what it claims), nor one promising fewer leave the rest unread (and
    unchecked)."""
    path = tmp_path / "lies.npz"
    _saved_arrays(path, np.zeros((min(promised, 10), 4), np.float32))
    npy = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (promised, 4)}
    np.lib.format.write_array_header_1_0(npy, header)
    with zipfile.ZipFile(path) as old:
        members = {name: old.read(name) for name in old.namelist()}
    members["vectors.npy"] = npy.getvalue() + bytes(3 * 4 * 4)  # 3 rows follow
    with zipfile.ZipFile(path, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)
    with pytest.raises(SavedIndexUnusable, match=f"lies.npz: {message}"):
        load_index(path)


@pytest.mark.parametrize("method", ["exact", "flat", "hnsw", "ivf", "ivfpq"])
def test_a_saved_index_holds_the_exact_vectors_of_every_index_method(method: str) -> None:
    """What a replica saves is read back from its index: ivfpq's compressed codes must not
    leak into the saved file (it keeps the full vectors for re-ranking)."""
    vectors = unit(np.random.default_rng(4).normal(size=(1000, 16))).astype(np.float32)
    index = build_index(vectors, method)
    np.testing.assert_array_equal(index_vectors(index), vectors)
    np.testing.assert_array_equal(index_vectors(index, np.array([7, 3])), vectors[[7, 3]])


def _damage(path: Path) -> None:
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes(64) + data[middle + 64 :])


def _other_gallery(path: Path, cluster: Cluster, _: str) -> None:
    other = cluster.new_database()
    store_with_vectors(other, rng_people(1, 20)).close()  # same people, another database
    GalleryReplica(other, snapshot_dir=path.parent).close()
    saved_index_path(path.parent, other).replace(path)


def _other_model(path: Path, *_: object) -> None:
    save_index(path, dataclasses.replace(load_index(path), fingerprint="0" * 16))


def _pruned(_: Path, __: Cluster, address: str) -> None:
    with open_store(address) as store:
        store.prune_log(0)


UNUSABLE = {
    "missing": (lambda path, *_: path.unlink(), "no saved index at"),
    "damaged": (lambda path, *_: _damage(path), "unreadable saved index"),
    "truncated": (lambda path, *_: path.write_bytes(path.read_bytes()[:300]), "saved index"),
    "not_npz": (lambda path, *_: path.write_text("not an index"), "unreadable saved index"),
    "other_gallery": (_other_gallery, "of another gallery"),
    "other_model": (_other_model, "made with another model"),
    "pruned_log": (_pruned, "older than the change log, which starts at revision 3"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_unusable_saved_index_means_a_full_read_saying_why(
    saved: tuple[str, Path],
    postgres_cluster: Cluster,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    address, path = saved
    change_gallery(address, 3)  # revision 3
    spoil, message = UNUSABLE[case]
    spoil(path, postgres_cluster, address)
    with caplog.at_level(logging.INFO, logger="facelab.gallery.replica"):
        replica = GalleryReplica(address, snapshot_dir=path.parent)
    try:
        status = replica.status()
        assert status.full_loads == 1 and status.snapshot_revision is None
        assert status.rows_read == 40 - 2 + 4
        assert answers(replica, QUERIES) == full_answers(address, QUERIES)
        said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
        assert any(message in m for m in said), said
        level = logging.INFO if case == "missing" else logging.WARNING
        assert any(r.levelno == level and str(path) in r.getMessage() for r in caplog.records)
    finally:
        replica.close()


def test_writers_prune_the_change_log_and_a_search_behind_it_reads_everything(
    postgres_cluster: Cluster,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = postgres_cluster.new_database()
    store_with_vectors(address, rng_people(4, 5)).close()
    with open_store(address) as store, open_store(address) as reader:
        assert store.prune_log(2) == 0  # revision 1: nothing before the last 2 revisions
        search = GallerySearch(reader)
        search.refresh()  # at revision 1
        for step in range(4):
            store.add({f"later{step}": faces(unit(np.ones((1, 16))), "x")}, INFO)
        assert store.revision() == 5 and store.log_start() == 3
        logged = postgres_cluster.sql(
            "SELECT min(revision) FROM changes", address.rsplit("/", 1)[1]
        )
        assert int(logged) == 4  # every writer pruned: revisions 4 and 5 are left
        with caplog.at_level(logging.WARNING, logger="facelab.gallery.search"):
            search.refresh()  # its revision 1 is behind the log's start: a full read
        assert "change log starts at revision 3" in caplog.text
        assert answers(search, QUERIES) == full_answers(address, QUERIES)
        assert {"later0", "later3"} <= set(search._live)


def test_prune_log_command(
    postgres_cluster: Cluster,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = postgres_cluster.new_database()
    store_with_vectors(address, rng_people(5, 3)).close()
    assert main(["gallery", "prune-log", "--gallery", address, "--keep", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["log_start"] == 1
    with open_store(address) as store:
        store.add({"later": faces(unit(np.ones((1, 16))), "later")}, INFO)
        assert store.log_start() == 2  # the kept length holds for every later writer
    sqlite = tmp_path / "g.db"
    store_with_vectors(sqlite, rng_people(5, 1)).close()
    assert main(["gallery", "prune-log", "--gallery", str(sqlite), "--keep", "5"]) == 2
    assert "g.db: an SQLite gallery keeps no change log" in caplog.text
    assert main(["gallery", "prune-log", "--gallery", address, "--keep", "-1"]) == 2
    assert "revisions to keep must be an integer >= 0" in caplog.text


def test_a_saved_index_is_refused_for_an_sqlite_gallery(tmp_path: Path) -> None:
    gallery = tmp_path / "g.db"
    store_with_vectors(gallery, rng_people(6, 1)).close()
    with pytest.raises(GalleryError, match="g.db: a snapshot folder is for PostgreSQL"):
        GalleryReplica(gallery, snapshot_dir=tmp_path)


def test_an_sqlite_file_whose_name_starts_with_postgres_is_no_postgresql_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store_with_vectors("postgres.db", rng_people(6, 1)).close()
    with pytest.raises(GalleryError, match="postgres.db: a snapshot folder is for PostgreSQL"):
        GalleryReplica("postgres.db", snapshot_dir=tmp_path)
