"""Group face embeddings into people without labels.

Algorithm: average-linkage agglomeration on a k-nearest-neighbour graph, merged in rounds of
reciprocal best pairs (RAC, Sumengen et al. 2023: for a reducible linkage such as the average,
merging every pair of clusters that are each other's best partner in one round gives the same
result as merging one pair at a time), with a merge threshold that depends on the evidence:

- candidates: two clusters are compared only if some face of one is among the `k` nearest
  neighbours of some face of the other (FAISS or exact search from `gallery.search`);
- linkage: the mean cosine over all pairs of their faces, exactly, from the clusters' embedding
  sums (mean_ij a_i . b_j = (sum a) . (sum b) / (|A| |B|));
- threshold: two single faces merge at `threshold` (the model's 1:1 operating point, e.g.
  the cosine at a target false-accept rate); a mean over many pairs is less noisy, so clusters
  with m = min(|A|, |B|) faces merge at `floor + (threshold - floor) / sqrt(m)` — the same
  false-accept rate for a mean of m independent impostor scores when `floor` is the impostor
  mean. `floor` defaults to a fixed margin below `threshold` (`ClusterConfig`).
- faces with quality below `min_quality` are not clustered (label -1): a blurred or turned face
  glued into the wrong person costs more than a face left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from facelab.gallery.search import build_index

log = logging.getLogger(__name__)

UNCLUSTERED = -1


@dataclass(frozen=True)
class ClusterConfig:
    """threshold: cosine at which two single faces are the same person (an operating point);
    floor: where the threshold tends for large clusters (None: `threshold - margin`);
    k: neighbours per face in the candidate graph; index: `gallery.search` method
    ("exact", "flat", "hnsw", "ivf"); min_quality: faces below it stay unclustered."""

    threshold: float
    floor: float | None = None
    margin: float = 0.05
    k: int = 20
    index: str = "flat"
    min_quality: float = 0.0
    max_rounds: int = 200

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @property
    def lowest(self) -> float:
        return self.threshold - self.margin if self.floor is None else self.floor


def knn_pairs(embeddings: np.ndarray, k: int, method: str = "flat") -> tuple[np.ndarray, ...]:
    """(i, j, cosine) of each face i and its k nearest other faces j (i < j, unique)."""
    n = len(embeddings)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    index = build_index(embeddings, method)
    scores, rows = index.search(np.ascontiguousarray(embeddings, np.float32), min(k + 1, n))
    i = np.repeat(np.arange(n), rows.shape[1])
    j = rows.ravel()
    s = scores.ravel()
    keep = (j >= 0) & (j != i)
    i, j, s = i[keep], j[keep], s[keep]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[first]


def _relabel(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_inverse=True)[1]


def merge_rounds(
    embeddings: np.ndarray, i: np.ndarray, j: np.ndarray, config: ClusterConfig
) -> np.ndarray:
    """Average-linkage agglomeration over candidate face pairs (i, j), in reciprocal-best
    rounds, with the size-dependent threshold of the module docstring. Returns a cluster label
    per face (0..C-1)."""
    n = len(embeddings)
    labels = np.arange(n)
    sums = embeddings.astype(np.float64)
    sizes = np.ones(n, np.int64)
    for _ in range(config.max_rounds):
        a, b = labels[i], labels[j]
        keep = a != b
        a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        if len(a) == 0:
            break
        c = len(sums)
        pair = np.unique(a * c + b)
        a, b = pair // c, pair % c
        link = np.einsum("ij,ij->i", sums[a], sums[b]) / (sizes[a] * sizes[b])
        needed = threshold_for_mean(config.threshold, config.lowest, np.minimum(sizes[a], sizes[b]))
        ok = link >= needed
        a, b, link = a[ok], b[ok], link[ok]
        if len(a) == 0:
            break
        # each cluster's best partner; merge pairs that are each other's best
        best = np.full(c, -np.inf)
        np.maximum.at(best, a, link)
        np.maximum.at(best, b, link)
        mutual = (link == best[a]) & (link == best[b])
        a, b = a[mutual], b[mutual]
        # a cluster tied with two partners at exactly the same score: merge it once
        _, once = np.unique(np.concatenate([a, b]), return_index=True)
        used = np.zeros(2 * len(a), bool)
        used[once] = True
        single = used[: len(a)] & used[len(a) :]
        a, b = a[single], b[single]
        if len(a) == 0:
            break
        target = np.arange(c)
        target[b] = a
        labels = target[labels]
        np.add.at(sums, a, sums[b])
        np.add.at(sizes, a, sizes[b])
        # compact: drop merged-away clusters
        live, labels = np.unique(labels, return_inverse=True)
        sums, sizes = sums[live], sizes[live]
    else:
        log.warning("clustering stopped after %d merge rounds", config.max_rounds)
    return _relabel(labels)


def cluster_embeddings(
    embeddings: np.ndarray, config: ClusterConfig, quality: np.ndarray | None = None
) -> np.ndarray:
    """A cluster label per face (0..C-1; a face alone is its own cluster), UNCLUSTERED (-1)
    for faces below `config.min_quality`."""
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    labels = np.full(len(emb), UNCLUSTERED, np.int64)
    usable = np.ones(len(emb), bool)
    if quality is not None:
        usable = np.asarray(quality) >= config.min_quality
    rows = np.flatnonzero(usable)
    if len(rows) == 0:
        return labels
    i, j, _ = knn_pairs(emb[rows], config.k, config.index)
    labels[rows] = merge_rounds(emb[rows], i, j, config)
    return labels


def threshold_for_mean(threshold: float, floor: float, m: np.ndarray) -> np.ndarray:
    """The merge threshold for clusters whose smaller one has m faces (module docstring)."""
    return floor + (threshold - floor) / np.sqrt(m)
