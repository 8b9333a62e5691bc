"""Top-k identity search over a gallery's embeddings.

Embeddings are L2-normalised, so inner product = cosine similarity. Methods:

- ``exact`` (default): one batched matrix product against every stored vector; exact, no
  build cost, and fast enough up to a few hundred thousand vectors;
- ``flat``: FAISS ``IndexFlatIP``, the same exact answer with FAISS's BLAS kernels;
- ``hnsw``: FAISS HNSW graph (approximate; sub-linear queries, slow to build);
- ``ivf``: FAISS inverted file over k-means cells (approximate; fast to build).

An identity may have several enrolled images. Its score for a query is, by default, the
**max** over its images (``aggregate="max"``: robust when the enrolled photos differ in pose or
age, and the convention of `facelab.eval.identification`); ``aggregate="mean"`` instead scores
one template per identity, the L2-normalised mean of its embeddings (smaller index, one vector
per person). Either way the index holds rows that map to identities, and the k best identities
are read off the best-scoring rows.

`GallerySearch` rebuilds its index whenever the gallery's revision counter has moved, so a
search always reflects every committed enrollment, removal and rename.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facelab.gallery.store import GalleryError, GalleryStore, Snapshot

log = logging.getLogger(__name__)

METHODS = ("exact", "flat", "hnsw", "ivf")
AGGREGATES = ("max", "mean")


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first."""
        ...


class ExactIndex:
    """Brute force: queries x all vectors, in batches so the score matrix stays small."""

    def __init__(self, vectors: np.ndarray, batch_rows: int = 1 << 24) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        # Queries per batch so that one (batch, N) score block holds about batch_rows floats.
        self._batch = max(1, batch_rows // max(1, len(self.vectors)))

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
    """A FAISS inner-product index: ``flat`` (exact), ``hnsw`` or ``ivf`` (approximate).

    hnsw_m / ef_search trade HNSW memory and latency for recall; nlist (default sqrt N) and
    nprobe (cells scanned per query) do the same for IVF.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int = 32,
        seed: int = 0,
    ) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise ImportError(
                "FAISS search needs faiss-cpu: pip install 'facelab[search]'"
            ) from exc
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        self.kind = kind
        self.ef_search = ef_search
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
        elif kind == "ivf":
            # k-means wants >= 39 training points per cell; small galleries get fewer cells.
            cells = max(1, min(nlist or int(math.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
            sample = vectors
            if n > 64 * cells:  # more training points barely move the centroids, only the cost
                sample = vectors[np.random.default_rng(seed).choice(n, 64 * cells, replace=False)]
            self.index.cp.seed = seed
            self.index.train(sample)
            self.index.nprobe = min(nprobe, cells)
        else:
            raise ValueError(f"unknown FAISS index kind {kind!r}; known: flat, hnsw, ivf")
        self.index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows.astype(np.int64)


def build_index(vectors: np.ndarray, method: str = "exact", **options: int) -> VectorIndex:
    """An index of `method` (one of METHODS) over unit vectors."""
    if method == "exact":
        return ExactIndex(vectors)
    if method in METHODS:
        return FaissIndex(vectors, kind=method, **options)
    raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")


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
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
        self.store = store
        self.method = method
        self.aggregate = aggregate
        self.options = options
        self.revision: int | None = None
        self.names: list[str] = []

    def refresh(self) -> None:
        """Rebuild the index if the gallery changed since it was built."""
        if self.revision == self.store.revision():
            return
        snap: Snapshot = self.store.snapshot()
        vectors, self._labels = identity_rows(snap.embeddings, snap.labels, self.aggregate)
        self.names = snap.names
        self._per_identity = int(np.bincount(self._labels).max()) if len(self._labels) else 0
        self._index = build_index(vectors, self.method, **self.options) if len(vectors) else None
        self.revision = snap.revision
        log.debug(
            "built %s index of %d rows at revision %d", self.method, len(vectors), self.revision
        )

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Match]]:
        """The k best identities (fewer if fewer are enrolled) for each query, best first."""
        check_k(k)
        self.refresh()
        if self._index is None:
            raise GalleryError(f"{self.store.path}: gallery is empty; enroll someone first")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self.names))
        # The k best identities' best rows are among the top k * (most rows of one identity).
        scores, rows = self._index.search(queries, k * self._per_identity)
        results = []
        for row_scores, row_ids in zip(scores, rows, strict=True):
            matches: list[Match] = []
            seen: set[int] = set()
            for score, row in zip(row_scores, row_ids, strict=True):
                if row < 0:  # FAISS pads with -1 when an approximate search finds too few
                    break
                label = int(self._labels[row])
                if label not in seen:
                    seen.add(label)
                    matches.append(Match(self.names[label], float(score)))
                    if len(matches) == k:
                        break
            results.append(matches)
        return results
