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
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.gallery.backends import open_store
from facelab.gallery.postgres import PostgresStore
from facelab.gallery.search import GallerySearch, Match
from facelab.gallery.store import GalleryError, GalleryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaStatus:
    """What a replica can say about how current its answers are."""

    backend: str  # "postgresql" or "sqlite"
    revision: int | None  # the gallery revision its index reflects
    stale: bool  # True while it cannot confirm it has every committed change
    stale_since: float | None  # when it lost the database (Unix time)
    reason: str | None  # why, while stale
    updated_at: float | None  # when its index last took in a change (Unix time)


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
        **options: int,
    ) -> None:
        super().__init__(None, method, aggregate, **options)  # type: ignore[arg-type]
        self.address = address
        self.poll = poll
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
        self._thread = threading.Thread(target=self._follow, name="gallery-replica", daemon=True)
        self._thread.start()
        if not self._loaded.wait(start_timeout):
            self.close()
            raise GalleryError(f"{address}: replica could not load the gallery ({self._reason})")

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
        )

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Wait until the index reflects every change committed before this call (a server
        calls it after its own enrollment: read-your-writes); False on timeout (stale)."""
        with self._lock:
            target = self._passes_started + 1
        self._wake.set()
        with self._passed:
            return self._passed.wait_for(lambda: self._passes_done >= target, timeout)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- following --------------------------------------------------------------------------

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with open_store(self.address, timeout=10) as store:
                    self._follow_store(store)
            except GalleryError as exc:
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
        if isinstance(store, PostgresStore):
            self._backend = "postgresql"
            store.listen()
        while not self._stop.is_set():
            self._catch_up(store)
            if self._stale_since is not None:
                log.info("gallery replica current again at revision %s", self.revision)
            self._stale_since, self._reason = None, None
            self._loaded.set()
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
        if store.revision() != self.revision:
            change = self.fetch()  # from the store, outside the lock: searches go on meanwhile
        with self._passed:
            if change is not None:
                self.apply(change)
                self._updated_at = time.time()
            self._passes_done = number
            self._passed.notify_all()
