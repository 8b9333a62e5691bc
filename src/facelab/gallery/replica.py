"""A server replica's view of a shared gallery: an in-memory search index that a background
thread keeps in step with the store, so requests search without touching the database.

On PostgreSQL the thread LISTENs for the notifications every committed change sends, and on
each one (or every `poll` seconds, to be safe) compares revisions and patches the index with the
identities changed since its own (`GallerySearch.fetch`). LISTEN is issued before the first
catch-up, so no change falls between the two. When the connection drops, the replica keeps
answering from the index it has, says so (`status()`: stale since when, and why), and
reconnects with backoff; on reconnect the revision comparison catches whatever it missed,
loading only the changes when the change log allows. On SQLite (one machine) the thread polls
the revision counter.

With a snapshot folder (PostgreSQL only), the replica saves its index there (`saved_index.py`):
after a full read, every `save_every` seconds while it changes, and when closed. A replica that
starts finds it, checks it is of this gallery and model and that the change log still reaches
its revision, and reads only the changes since; otherwise it reads the whole gallery and says
why. While the database is unreachable, `offline()` gives what the replica holds (model,
thresholds, embeddings at its revision) so that searches go on, marked stale.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.gallery.backends import open_store
from facelab.gallery.postgres import (
    GalleryUnavailable,
    PostgresStore,
    is_postgres_address,
    redact,
)
from facelab.gallery.saved_index import (
    SavedIndex,
    SavedIndexUnusable,
    load_index,
    save_index,
    saved_index_path,
)
from facelab.gallery.search import ExactIndex, FaissIndex, GallerySearch, Match, VectorIndex
from facelab.gallery.store import (
    GalleryError,
    GalleryStore,
    ModelInfo,
    Snapshot,
    Threshold,
)

log = logging.getLogger(__name__)

# Spare rows read after a saved index's vectors, as a fraction of them: what an exact index
# would grow by at its first change anyway.
SAVED_ROOM = 0.5


@dataclass(frozen=True)
class ReplicaStatus:
    """What a replica can say about how current its answers are."""

    backend: str  # "postgresql" or "sqlite"
    revision: int | None  # the gallery revision its index reflects
    stale: bool  # True while it cannot confirm it has every committed change
    stale_since: float | None  # when it lost the database (Unix time)
    reason: str | None  # why, while stale
    updated_at: float | None  # when its index last took in a change (Unix time)
    connected: bool  # whether its follower holds a database connection now
    full_loads: int  # times it read the whole gallery
    rows_read: int  # embeddings read from the database since it started
    snapshot_revision: int | None  # the revision of the saved index it started from, if any
    loaded_in_s: float | None  # how long its first load took (saved index and changes, or all)


class GalleryReplica(GallerySearch):
    """A `GallerySearch` followed by a background thread; `search` never waits on the store.

    Thread-safe: the index is patched under a lock that searches also take (each is short);
    the store is only used from the follower thread."""

    def __init__(
        self,
        address: str | Path,
        method: str = "exact",
        aggregate: str = "max",
        poll: float = 2.0,
        start_timeout: float = 600.0,
        snapshot_dir: str | Path | None = None,
        save_every: float = 300.0,
        **options: int,
    ) -> None:
        super().__init__(None, method, aggregate, **options)  # type: ignore[arg-type]
        self.address = address
        self.path = redact(str(address))  # for messages: without the password
        self.poll = poll
        self.save_every = save_every
        self.snapshot_file: Path | None = None
        if snapshot_dir is not None:
            if not is_postgres_address(address):
                raise GalleryError(
                    f"{self.path}: a snapshot folder is for PostgreSQL galleries (an SQLite "
                    "gallery has no change log to catch up from, and is a local file already)"
                )
            self.snapshot_file = saved_index_path(snapshot_dir, address)
        self._lock = threading.Lock()
        self._passed = threading.Condition(self._lock)  # a catch-up pass finished
        self._passes_started = self._passes_done = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loaded = threading.Event()
        self._stale_since: float | None = time.time()
        self._updated_at: float | None = None
        self._reason: str | None = "starting"
        self._backend = "sqlite"
        self._connected = False
        self._full_loads = self._rows_read = 0
        self._snapshot_revision: int | None = None
        self._loaded_in: float | None = None
        self._facts: tuple[str, ModelInfo | None, list[Threshold]] | None = None
        self._saved_revision: int | None = None
        self._gallery_id: str | None = None
        self._saved_at = 0.0
        self._saver: threading.Thread | None = None
        self._thread = threading.Thread(target=self._follow, name="gallery-replica", daemon=True)
        started = time.perf_counter()
        self._thread.start()
        if not self._loaded.wait(start_timeout):
            self.close()
            raise GalleryError(f"{self.path}: replica could not load the gallery ({self._reason})")
        self._loaded_in = round(time.perf_counter() - started, 3)

    # -- answering --------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Match]]:
        with self._lock:
            return self.query(queries, k)

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self._backend,
            self.revision,
            self._stale_since is not None,
            self._stale_since,
            self._reason,
            self._updated_at,
            self._connected,
            self._full_loads,
            self._rows_read,
            self._snapshot_revision,
            self._loaded_in,
        )

    def offline(self) -> OfflineGallery:
        """The gallery as this replica holds it, for answering searches without the database
        (GalleryUnavailable if it never loaded one)."""
        if self._facts is None:
            raise GalleryUnavailable(f"{self.path}: no database connection and no index yet")
        path, model, thresholds = self._facts
        return OfflineGallery(path, model, thresholds, self)

    def rows_of(self, name: str) -> np.ndarray:
        """The index rows of identity `name` (its embeddings, with aggregate "max")."""
        with self._lock:
            label = self._live.get(name)
            if label is None or self._index is None:
                raise GalleryError(f"{self.path}: {name!r} is not enrolled")
            rows = np.flatnonzero(self._labels == label)
            return index_vectors(self._index, rows)

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Wait until the index reflects every change committed before this call (a server
        calls it after its own enrollment: read-your-writes); False on timeout (stale)."""
        with self._lock:
            target = self._passes_started + 1
        self._wake.set()
        with self._passed:
            return self._passed.wait_for(lambda: self._passes_done >= target, timeout)

    def close(self) -> None:
        """Stop following; with a snapshot folder, save the index if it changed since saved."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._saver is not None:
            self._saver.join()
        if self.snapshot_file is not None and self._facts is not None:
            if self.revision != self._saved_revision:
                self._save(self._saved_state())

    # -- following --------------------------------------------------------------------------

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with open_store(self.address, timeout=10) as store:
                    self._follow_store(store)
            except GalleryError as exc:
                self._connected = False
                if self._stale_since is None:
                    self._stale_since = time.time()
                    log.warning("gallery replica is stale: %s", exc)
                self._reason = str(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1

    def _follow_store(self, store: GalleryStore) -> None:
        self.store = store
        self._connected = True
        if isinstance(store, PostgresStore):
            self._backend = "postgresql"
            store.listen()
            self._gallery_id = store.gallery_id()
            if self.snapshot_file is not None and self._index is None:
                self._start_from_saved(store)
        while not self._stop.is_set():
            self._catch_up(store)
            if self._stale_since is not None:
                log.info("gallery replica current again at revision %s", self.revision)
            self._stale_since, self._reason = None, None
            self._loaded.set()
            self._save_if_due()
            self._wait(store)
            self._wake.clear()

    def _wait(self, store: GalleryStore) -> None:
        """Until a change is announced (PostgreSQL), `catch_up` or `close` is called, or `poll`
        seconds pass; in short slices so that `close` never waits long."""
        deadline = time.monotonic() + self.poll
        while not self._wake.is_set() and (left := deadline - time.monotonic()) > 0:
            if isinstance(store, PostgresStore):
                if store.wait_for_change(min(left, 0.25)):
                    return
            else:
                self._wake.wait(min(left, 0.25))

    def _catch_up(self, store: GalleryStore) -> None:
        with self._lock:
            self._passes_started += 1
            number = self._passes_started
        change = None
        if store.revision() != self.revision or self._facts is None:
            facts = (store.path, store.model(), store.thresholds())
            change = self.fetch()  # from the store, outside the lock: searches go on meanwhile
        with self._passed:
            if change is not None:
                self.apply(change)
                self._facts = facts
                self._count(change)
                self._updated_at = time.time()
            self._passes_done = number
            self._passed.notify_all()

    def _count(self, change: Any) -> None:
        if isinstance(change, Snapshot):
            self._full_loads += 1
            self._rows_read += len(change.labels)
            self._saved_at = 0.0  # a full read: save it as soon as possible
        else:
            self._rows_read += sum(len(e) for e in change.embeddings.values())

    # -- the saved index ----------------------------------------------------------------------

    def _start_from_saved(self, store: PostgresStore) -> None:
        """Load the saved index when it is of this gallery and model and the change log still
        reaches its revision (the first catch-up then reads only the changes since)."""
        path = self.snapshot_file
        assert path is not None
        if not path.exists():
            log.info("no saved index at %s: reading the whole gallery", path)
            return
        try:
            saved = load_index(path, room=SAVED_ROOM)
        except SavedIndexUnusable as exc:
            log.warning("%s; reading the whole gallery", exc)
            return
        model, revision, start = store.model(), store.revision(), store.log_start()
        problem = None
        if saved.gallery_id != self._gallery_id:
            problem = "of another gallery (a re-created or copied database?)"
        elif model is None or saved.fingerprint != model.fingerprint:
            problem = f"made with another model than the gallery's ({saved.fingerprint})"
        elif saved.aggregate != self.aggregate:
            problem = f"of aggregate {saved.aggregate!r}, not {self.aggregate!r}"
        elif len(saved.vectors) and saved.vectors.shape[1] != model.embedding_dim:
            problem = f"{saved.vectors.shape[1]}-d, not {model.embedding_dim}-d"
        elif saved.revision > revision:
            problem = f"ahead of the gallery (revision {revision}; a restored database?)"
        elif saved.revision < start:
            problem = f"older than the change log, which starts at revision {start} (pruned)"
        if problem is not None:
            log.warning(
                "saved index %s (revision %d) is %s; reading the whole gallery",
                path,
                saved.revision,
                problem,
            )
            return
        built = self.prepare(Snapshot(saved.revision, saved.names, saved.labels, saved.vectors))
        if isinstance(built.index, ExactIndex) and self.aggregate == "max":
            # Its rows are the saved vectors: append the changes into the room read after them
            # (growing would copy every row: 512 MiB, and as much again at peak, at 1M).
            index = ExactIndex(saved.vectors.base, rows=len(saved.vectors))
            built = dataclasses.replace(built, index=index)
        with self._lock:
            self.apply(built)
        self._snapshot_revision = self._saved_revision = saved.revision
        self._saved_at = time.monotonic()
        log.info(
            "loaded saved index %s at revision %d (%d rows); reading the %d revisions since",
            path,
            saved.revision,
            len(saved.labels),
            revision - saved.revision,
        )

    def _save_if_due(self) -> None:
        """Save in the background when the index changed and `save_every` seconds passed since
        the last save (at once after a full read)."""
        if self.snapshot_file is None or self.revision == self._saved_revision:
            return
        if time.monotonic() - self._saved_at < self.save_every:
            return
        if self._saver is not None and self._saver.is_alive():
            return
        state = self._saved_state()
        self._saved_at = time.monotonic()
        self._saver = threading.Thread(
            target=self._save, args=(state,), name="gallery-replica-save", daemon=True
        )
        self._saver.start()

    def _saved_state(self) -> tuple[SavedIndex | None, int | None]:
        """What to save: the live rows, compacted and grouped (read under the lock, rows
        gathered outside it for the exact index, whose stored rows never change)."""
        with self._lock:
            revision, facts, index = self.revision, self._facts, self._index
            if facts is None or facts[1] is None or index is None or not self._live:
                return None, revision
            labels, names = self._labels, list(self.names)
            live = np.fromiter(sorted(self._live.values()), np.int64, len(self._live))
            gallery_id = self._gallery_id
            source = index_vectors(index)  # the exact index's rows: a view, no copy
        if gallery_id is None:
            return None, revision
        relabel = np.full(len(names), -1, np.int64)
        relabel[live] = np.arange(len(live))
        new_labels = relabel[labels]
        rows = np.flatnonzero(new_labels >= 0)
        rows = rows[np.argsort(new_labels[rows], kind="stable")]
        saved = SavedIndex(
            revision,  # type: ignore[arg-type]
            gallery_id,
            facts[1].fingerprint,
            self.aggregate,
            [names[label] for label in live],
            new_labels[rows],
            source[rows],
        )
        return saved, revision

    def _save(self, state: tuple[SavedIndex | None, int | None]) -> None:
        saved, revision = state
        if saved is None or self.snapshot_file is None:
            return
        try:
            save_index(self.snapshot_file, saved)
        except OSError as exc:
            log.warning("could not save the index to %s: %s", self.snapshot_file, exc)
            return
        self._saved_revision = revision
        log.info("saved the index at revision %s to %s", revision, self.snapshot_file)


def index_vectors(index: VectorIndex, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of an index (all of them without `rows`), as float32 vectors."""
    if isinstance(index, ExactIndex):
        return index.vectors if rows is None else index.vectors[rows]
    assert isinstance(index, FaissIndex)
    if rows is None:
        return index.index.reconstruct_n(0, index.index.ntotal)
    return np.concatenate([index.index.reconstruct_n(int(r), 1) for r in rows])


class _Offline:
    """The connection of an OfflineGallery: every statement is refused as unavailable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def execute(self, *_: object) -> Any:
        raise GalleryUnavailable(self.reason)

    def close(self) -> None:
        pass


class OfflineGallery(GalleryStore):
    """What a replica holds of its gallery while the database cannot be reached: the model,
    the thresholds and the enrolled embeddings as of its revision, read-only. Anything else
    (enrolling, listing) is GalleryUnavailable."""

    def __init__(
        self,
        path: str,
        model: ModelInfo | None,
        thresholds: list[Threshold],
        replica: GalleryReplica,
    ) -> None:
        self.path = path
        self.read_only = True
        self._model = model
        self._thresholds = thresholds
        self._replica = replica
        self._conn = _Offline(f"{path}: no database connection; only searches are answered")

    def model(self) -> ModelInfo | None:
        return self._model

    def model_source(self) -> str | None:
        return None

    def thresholds(self) -> list[Threshold]:
        return list(self._thresholds)

    def revision(self) -> int:
        return self._replica.revision or 0

    def contains(self, name: str) -> bool:
        return name in self._replica._live

    def is_empty(self) -> bool:
        return not self._replica._live

    def embeddings(self, name: str) -> np.ndarray:
        return self._replica.rows_of(name)
