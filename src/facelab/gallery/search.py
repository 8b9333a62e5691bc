"""Top-k identity search over a gallery's embeddings.

Embeddings are L2-normalised, so inner product = cosine similarity. Methods:

- ``exact`` (default): one batched matrix product against every stored vector; exact, no
  build cost, and fast enough up to a few hundred thousand vectors;
- ``flat``: FAISS ``IndexFlatIP``, the same exact answer with FAISS's BLAS kernels;
- ``hnsw``: FAISS HNSW graph (approximate; sub-linear queries, slow to build);
- ``ivf``: FAISS inverted file over k-means cells (approximate; fast to build);
- ``ivfpq``: inverted file whose cells hold 4-bit product-quantised codes scanned with SIMD
  ("fast scan", 64 bytes a 128-d vector instead of 512), the best `rerank` candidates then
  re-scored exactly against the full vectors: the scan reads 1/8 of IVF's bytes per vector,
  so recall 0.99 at a million identities costs about a millisecond (docs/postgres.md);
- ``auto``: ``exact`` up to `AUTO_EXACT_MAX` rows, ``ivfpq`` above (what a serving replica
  uses by default).

An identity may have several enrolled images. Its score for a query is, by default, the
**max** over its images (``aggregate="max"``: robust when the enrolled photos differ in pose or
age, and the convention of `facelab.eval.identification`); ``aggregate="mean"`` instead scores
one template per identity, the L2-normalised mean of its embeddings (smaller index, one vector
per person). Either way the index holds rows that map to identities, and the k best identities
are read off the best-scoring rows.

`GallerySearch` follows the gallery's revision counter, so a search always reflects every
committed enrollment, removal and rename. On a store that logs its changes (PostgreSQL), it
reads only the identities changed since its revision and patches the index: their new rows are
added, their old rows become tombstones that searches skip, and the index is rebuilt from a
full snapshot only once tombstones pass a quarter of its rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from facelab.gallery.postgres import Delta, LogPruned, PostgresStore
from facelab.gallery.store import GalleryError, GalleryStore, Snapshot

log = logging.getLogger(__name__)

METHODS = ("exact", "flat", "hnsw", "ivf", "ivfpq", "auto")
AGGREGATES = ("max", "mean")
# The options each method accepts (positive integers), checked before anything is built.
OPTIONS = {
    "exact": (),
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe", "seed"),
    "ivfpq": ("nlist", "nprobe", "rerank", "pq_m", "seed"),
    "auto": ("nlist", "nprobe", "rerank", "pq_m", "seed"),
}
# `auto` searches exactly up to this many rows: there an exact query costs <= ~10 ms, and it
# needs no build; above, it builds `ivfpq`.
AUTO_EXACT_MAX = 100_000
# Fewer rows than this give the 16 codes of each 4-bit sub-quantiser too few training points
# (FAISS asks for 39 per code); `ivfpq` then searches them exactly (FAISS flat).
IVFPQ_MIN_ROWS = 16 * 39


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first."""
        ...

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (numbered after the existing ones)."""
        ...


class ExactIndex:
    """Brute force: queries x all vectors, in batches so the score matrix stays small."""

    def __init__(
        self, vectors: np.ndarray, batch_rows: int = 1 << 24, rows: int | None = None
    ) -> None:
        """rows: index only the first `rows` of `vectors` and append into the rest (a buffer
        read with room, `saved_index.load_index`: no copy of the rows before it is full)."""
        self._buffer = np.ascontiguousarray(vectors, dtype=np.float32)
        if rows is not None and not 0 <= rows <= len(self._buffer):
            raise ValueError(f"rows ({rows}) must be within the {len(self._buffer)} given")
        self._batch_rows = batch_rows
        self._use(len(self._buffer) if rows is None else rows)

    def _use(self, rows: int) -> None:
        self.vectors = self._buffer[:rows]
        # Queries per batch so that one (batch, N) score block holds about batch_rows floats.
        self._batch = max(1, self._batch_rows // max(1, rows))

    def add(self, vectors: np.ndarray) -> None:
        """Append in place, the buffer growing by half when full (no copy per enrollment)."""
        n, extra = len(self.vectors), len(vectors)
        if n + extra > len(self._buffer):
            grown = np.empty((max(n + extra, n + n // 2), self._buffer.shape[1]), np.float32)
            grown[:n] = self.vectors
            self._buffer = grown
        self._buffer[n : n + extra] = vectors
        self._use(n + extra)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.vectors))
        scores, rows = [], []
        for start in range(0, len(queries), self._batch):
            sims = queries[start : start + self._batch] @ self.vectors.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            rows.append(np.take_along_axis(top, order, axis=1))
            scores.append(np.take_along_axis(top_scores, order, axis=1))
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(rows)


class FaissIndex:
    """A FAISS inner-product index: ``flat`` (exact), ``hnsw``, ``ivf`` or ``ivfpq``
    (approximate).

    hnsw_m / ef_search trade HNSW memory and latency for recall; nlist (default sqrt N) and
    nprobe (cells scanned per query; for ivfpq 1/6 of them) do the same for IVF; for ivfpq,
    pq_m sub-quantisers of 4 bits each code a vector (default one per dimension) and the best
    `rerank` candidates of the code scan (at least k) are re-scored exactly.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int | None = None,
        rerank: int = 512,
        pq_m: int | None = None,
        seed: int = 0,
    ) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise ImportError(
                "FAISS search needs faiss-cpu: pip install 'facelab[search]'"
            ) from exc
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(vectors)
        self.kind = kind
        self.ef_search = ef_search
        self.rerank: int | None = None  # set for an ivfpq index with re-ranking
        if kind == "ivfpq" and n >= IVFPQ_MIN_ROWS:
            self.rerank = rerank
        elif kind == "ivfpq":
            log.info("ivfpq over %d rows (< %d) searches them exactly", n, IVFPQ_MIN_ROWS)
        # ivfpq builds on one OpenMP thread: its many short parallel regions stall whenever a
        # second thread is descheduled; on the shared 2-core machine a 1M build took 12-17 s
        # on one thread and 51-66 s on two.
        with _openmp_threads(faiss, 1 if kind == "ivfpq" else None):
            self.index = _new_index(
                faiss, vectors, kind, hnsw_m, ef_construction, nlist, nprobe, pq_m, seed
            )
            self.index.add(vectors)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        k = min(k, self.index.ntotal)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = None
        if self.rerank is not None:  # FAISS re-scores k x k_factor candidates
            params = faiss.IndexRefineSearchParameters(k_factor=max(1.0, self.rerank / k))
        # One query gains nothing from OpenMP threads, which only wait for each other: on a
        # busy machine 2 threads took an ivfpq query at 1M from 1.1 to 20 ms (p50).
        with _openmp_threads(faiss, 1 if len(queries) == 1 else None):
            scores, rows = self.index.search(queries, k, params=params)
        return scores, rows.astype(np.int64)


@contextmanager
def _openmp_threads(faiss: Any, threads: int | None) -> Iterator[None]:
    """FAISS on `threads` OpenMP threads (None: unchanged) within the block. The setting is
    the calling thread's own (OpenMP keeps it per thread), so a replica's follower building
    an index does not change what request threads search with; restored after."""
    before = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _new_index(
    faiss: Any,
    vectors: np.ndarray,
    kind: str,
    hnsw_m: int,
    ef_construction: int,
    nlist: int | None,
    nprobe: int | None,
    pq_m: int | None,
    seed: int,
) -> Any:
    """An empty FAISS index of `kind`, trained on `vectors` where it needs training."""
    n, dim = vectors.shape
    if kind == "flat" or (kind == "ivfpq" and n < IVFPQ_MIN_ROWS):
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    if kind == "ivf":
        cells = _cells(n, nlist or int(math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        return _trained(index, vectors, cells, 64, nprobe or 32, seed)
    if kind == "ivfpq":  # IVF over 4-bit PQ fast-scan codes, re-scored on the full vectors
        pq_m = pq_m or dim
        if dim % pq_m:
            raise ValueError(f"pq_m ({pq_m}) must divide the embedding dimension ({dim})")
        cells = _cells(n, nlist or int(math.sqrt(n)))
        codes = faiss.IndexIVFPQFastScan(
            faiss.IndexFlatIP(dim), dim, cells, pq_m, 4, faiss.METRIC_INNER_PRODUCT
        )
        codes = _trained(codes, vectors, cells, 40, nprobe or max(1, cells // 6), seed)
        return faiss.IndexRefineFlat(codes)
    raise ValueError(f"unknown FAISS index kind {kind!r}; known: flat, hnsw, ivf, ivfpq")


def _cells(rows: int, wanted: int) -> int:
    """IVF cells for `rows` vectors: k-means wants >= 39 training points per cell, so small
    galleries get fewer cells than asked for."""
    return max(1, min(wanted, rows // 39))


def _trained(
    index: Any, vectors: np.ndarray, cells: int, per_cell: int, nprobe: int, seed: int
) -> Any:
    """An IVF index with its k-means trained on `per_cell` points per cell (a sample) and
    `nprobe` of its cells scanned per query."""
    index.cp.seed = seed
    index.train(_training_sample(vectors, per_cell * cells, seed))
    index.nprobe = min(nprobe, cells)
    return index


def _training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most `size` of the vectors: more training points barely move k-means' centroids,
    only its cost."""
    if len(vectors) <= size:
        return vectors
    return vectors[np.random.default_rng(seed).choice(len(vectors), size, replace=False)]


def check_options(method: str, options: dict[str, int]) -> None:
    """Refuse an unknown method, an option it does not take, or a value that is not an
    integer >= 1, naming it (a replica's configuration fails at start, not at its first build).
    """
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
    for name, value in options.items():
        if name not in OPTIONS[method]:
            known = ", ".join(OPTIONS[method]) or "none"
            raise ValueError(f"search method {method!r} has no option {name!r}; known: {known}")
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"search option {name} must be an integer >= 1, not {value!r}")


def auto_method(rows: int) -> str:
    """The method `auto` builds for an index of `rows` vectors."""
    return "exact" if rows <= AUTO_EXACT_MAX else "ivfpq"


def build_index(vectors: np.ndarray, method: str = "exact", **options: int) -> VectorIndex:
    """An index of `method` (one of METHODS) over unit vectors."""
    check_options(method, options)
    if method == "auto":
        method = auto_method(len(vectors))
    if method == "exact":
        return ExactIndex(vectors)
    return FaissIndex(vectors, kind=method, **options)


def identity_rows(
    embeddings: np.ndarray, labels: np.ndarray, aggregate: str = "max"
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) an index is built over: every image for ``max``, one normalised mean
    template per identity for ``mean``. `labels` must be grouped (as `Snapshot` gives them)."""
    if aggregate == "max":
        return embeddings, labels
    if aggregate != "mean":
        raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
    if len(labels) == 0:
        return embeddings, labels
    starts = np.flatnonzero(np.r_[True, np.diff(labels) != 0])
    sums = np.add.reduceat(embeddings.astype(np.float64), starts, axis=0)
    templates = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(min=1e-12)
    return templates.astype(np.float32), labels[starts]


@dataclass(frozen=True)
class Built(Snapshot):
    """A snapshot with the index over it built, and its row and name maps, for
    `GallerySearch.apply` to swap in (all the per-row work done before, none under a replica's
    lock). Still a `Snapshot`: code that tells full loads from deltas keeps working."""

    index: VectorIndex | None  # None for an empty gallery
    method: str  # the method built (what ``auto`` chose)
    row_labels: np.ndarray  # the identity label of each index row
    live: dict[str, int]  # name -> label
    rows: list[int]  # label -> its rows in the index


@dataclass(frozen=True)
class Match:
    identity: str
    score: float


def check_k(k: int) -> None:
    """Refuse a candidate count below 1 (k=0 had no best match; a negative k sliced all)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k (candidates per face) must be an integer >= 1, not {k!r}")


class GallerySearch:
    """Top-k identities of query embeddings in a gallery, kept consistent with the store."""

    def __init__(
        self, store: GalleryStore, method: str = "exact", aggregate: str = "max", **options: int
    ) -> None:
        check_options(method, options)
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
        self.store = store
        self.method = method
        self.aggregate = aggregate
        self.options = options
        self.revision: int | None = None
        self.names: list[str] = []  # label -> identity name (labels of tombstones included)
        self._live: dict[str, int] = {}  # name -> its label in the index
        self._index: VectorIndex | None = None
        self.built = method  # the method of the index built (for "auto": the one it chose)

    def refresh(self) -> None:
        """Bring the index to the gallery's current revision."""
        if self.revision != self.store.revision():
            self.apply(self.fetch())

    def fetch(self) -> Built | Delta:
        """What the index needs from the store: the changes since its revision where the store
        logs them and a patch is worth it, else a full snapshot with its new index built here
        (a replica calls this outside its lock, so searches go on during a slow FAISS build).
        Also a rebuild when the changes take an ``auto`` index across `AUTO_EXACT_MAX`: the
        rebuild switches method."""
        patchable = (
            isinstance(self.store, PostgresStore)
            and self._index is not None
            and self._dead_rows * 4 < len(self._labels)
        )
        if patchable and self.revision is not None:
            try:
                delta = self.store.changes_since(self.revision)
            except LogPruned as exc:
                log.warning("%s; reading the whole gallery", exc)
            else:
                if self._method_for(self._live_rows_after(delta)) == self.built:
                    return delta
        return self.prepare(self.store.snapshot())

    def _live_rows_after(self, delta: Delta) -> int:
        """How many live rows the index would hold once `delta` is patched in."""
        rows = len(self._labels) - self._dead_rows
        for name in delta.changed:
            label = self._live.get(name)
            rows -= 0 if label is None else self._rows[label]
        for embeddings in delta.embeddings.values():
            rows += 1 if self.aggregate == "mean" else len(embeddings)
        return rows

    def apply(self, change: Built | Snapshot | Delta) -> None:
        """Swap in a built index, or patch the index with a delta (memory only, no I/O; a bare
        snapshot is built first)."""
        if isinstance(change, Snapshot) and not isinstance(change, Built):
            change = self.prepare(change)
        if isinstance(change, Built):
            self._install(change)
        else:
            self._patch(change)
        self.revision = change.revision

    def _method_for(self, rows: int) -> str:
        return auto_method(rows) if self.method == "auto" else self.method

    def prepare(self, snap: Snapshot) -> Built:
        """The index over a snapshot (the slow part of a rebuild; touches no state)."""
        vectors, labels = identity_rows(snap.embeddings, snap.labels, self.aggregate)
        index = build_index(vectors, self.method, **self.options) if len(vectors) else None
        method = self._method_for(len(vectors))
        log.debug("built %s index of %d rows at revision %d", method, len(vectors), snap.revision)
        names = list(snap.names)
        return Built(
            snap.revision,
            names,
            snap.labels,
            snap.embeddings,
            index,
            method,
            labels,
            {name: label for label, name in enumerate(names)},
            np.bincount(labels, minlength=len(names)).tolist(),
        )

    def _install(self, built: Built) -> None:
        self._index, self._labels, self.built = built.index, built.row_labels, built.method
        self.names, self._live, self._rows = built.names, built.live, built.rows
        self._dead_rows = 0
        self._per_identity = max(self._rows, default=0)

    def _patch(self, delta: Delta) -> None:
        for name in delta.changed:
            label = self._live.pop(name, None)
            if label is not None:
                self._dead_rows += self._rows[label]
        new_vectors, new_labels = [], []
        for name, embeddings in delta.embeddings.items():
            label = len(self.names)
            vectors, _ = identity_rows(
                embeddings, np.zeros(len(embeddings), np.int64), self.aggregate
            )
            self.names.append(name)
            self._live[name] = label
            self._rows.append(len(vectors))
            self._per_identity = max(self._per_identity, len(vectors))
            new_vectors.append(vectors)
            new_labels.append(np.full(len(vectors), label, np.int64))
        if new_vectors:
            assert self._index is not None  # fetch() patches only a built index
            self._index.add(np.concatenate(new_vectors))
            self._labels = np.concatenate([self._labels, *new_labels])
        log.debug("patched %d identities in at revision %d", len(delta.changed), delta.revision)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Match]]:
        """The k best identities (fewer if fewer are enrolled) for each query, best first."""
        check_k(k)
        self.refresh()
        return self.query(queries, k)

    def query(self, queries: np.ndarray, k: int = 5) -> list[list[Match]]:
        """`search` on the index as it is, without asking the store about changes."""
        check_k(k)
        if self._index is None or not self._live:
            raise GalleryError(f"{self.store.path}: gallery is empty; enroll someone first")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self._live))
        # The k best identities' best rows are among the top k * (most rows of one identity)
        # live rows; tombstones may push some further down, hence the widening retry.
        rows_wanted = k * self._per_identity + min(self._dead_rows, 64)
        while True:
            scores, rows = self._index.search(queries, rows_wanted)
            results = [self._best_identities(s, r, k) for s, r in zip(scores, rows, strict=True)]
            exhausted = rows_wanted >= len(self._labels)
            if exhausted or all(len(m) == k for m in results) or self._dead_rows == 0:
                return results
            rows_wanted = min(len(self._labels), rows_wanted * 4)

    def _best_identities(self, scores: np.ndarray, rows: np.ndarray, k: int) -> list[Match]:
        matches: list[Match] = []
        seen: set[int] = set()
        for score, row in zip(scores, rows, strict=True):
            if row < 0:  # FAISS pads with -1 when an approximate search finds too few
                break
            label = int(self._labels[row])
            if label not in seen and self._live.get(self.names[label]) == label:
                seen.add(label)
                matches.append(Match(self.names[label], float(score)))
                if len(matches) == k:
                    break
        return matches
