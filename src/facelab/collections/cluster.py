"""Group face embeddings into people without labels.

Algorithm: average-linkage agglomeration on a k-nearest-neighbour graph, merged in rounds
(after RAC, Sumengen et al. 2023: for a reducible linkage such as the average, merging every
pair of clusters that are each other's best partner in one round gives the same result as
merging one pair at a time; here each such pair also takes in the clusters whose best partner
it is, checked one at a time, `_stars`), with a merge threshold that depends on the evidence:

- candidates: two clusters are compared only if some face of one is among the `k` nearest
  neighbours of some face of the other (FAISS or exact search from `gallery.search`);
- linkage: the mean score over all pairs of their faces, exactly, from the clusters' embedding
  sums (mean_ij a_i . b_j = (sum a) . (sum b) / (|A| |B|); with score offsets, sums of
  augmented rows, `_augmented`);
- two passes, the second on normalised scores: some faces (blurred, turned, "average"
  looking) score high with everyone, so one threshold accepts their impostors and cuts other
  faces' genuine pairs. The first pass clusters raw cosines; then each face's level r is its
  mean cosine to its `cohort` nearest neighbours outside its first-pass cluster (its nearest
  impostors; after local scaling, CSLS, Conneau et al. 2018), and the second pass clusters
  again from single faces on a.b - ((r_a + r_b) / 2 - median r) (`impostor_offsets`). A
  random cohort or the plain k-NN ranks instead hurt on LFW (docs/collections.md);
- threshold: two single faces merge at `threshold` (the model's 1:1 operating point: for N
  faces, `facelab cluster` takes the cosine at FAR = `FALSE_MATCHES_PER_FACE` / N from the
  model's shipped points, `collections.service.clustering_threshold`); a mean over more
  faces is less noisy, so a pair with evidence m = 2 |A| |B| / (|A| + |B|) (the harmonic
  mean of the sizes; the variance of a difference of two means goes with 1/m; a face against
  a large cluster counts as 2) merges at `floor + (threshold - floor) / m ** power`,
  floor = threshold - margin. The power (3) and margin (0.015) were chosen on LFW's
  development people (docs/collections.md): in effect one strict threshold between two single
  faces, and one a margin lower once either side has more than one face.
- faces with quality below `min_quality` are not clustered (label -1): a blurred or turned face
  glued into the wrong person costs more than a face left out.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import numpy as np

from facelab.gallery.search import build_index

log = logging.getLogger(__name__)

UNCLUSTERED = -1
# The clustering threshold's false-accept rate for N faces is this / N: each face expects this
# many false matches among the others (chosen on LFW's development people, docs/collections.md).
FALSE_MATCHES_PER_FACE = 0.7


@dataclass(frozen=True)
class ClusterConfig:
    """threshold: cosine at which two single faces are the same person (an operating point);
    floor: where the threshold tends for large clusters (None: `threshold - margin`);
    k: neighbours per face in the candidate graph; index: `gallery.search` method
    ("exact", "flat", "hnsw", "ivf") or "auto" (flat up to `exact_max` faces, IVF above);
    min_quality: faces below it stay unclustered; stars: let a reciprocal pair take in the
    clusters pointing at it in the same round (`_stars`; False: RAC's reciprocal pairs only,
    exactly average linkage, many more rounds when clusters are large); normalise: the second
    pass on normalised scores, each face's level taken from its `cohort` nearest faces outside
    its cluster among its `depth` nearest (module docstring)."""

    threshold: float
    floor: float | None = None
    margin: float = 0.015
    power: float = 3.0
    k: int = 20
    index: str = "auto"
    exact_max: int = 200_000
    min_quality: float = 0.0
    stars: bool = True
    max_rounds: int = 1000
    normalise: bool = True
    cohort: int = 20
    depth: int = 80

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @property
    def lowest(self) -> float:
        return self.threshold - self.margin if self.floor is None else self.floor

    @property
    def search_depth(self) -> int:
        """Nearest faces to search per face (`knn`): `k`, and `depth` when normalising."""
        return max(self.k, self.depth if self.normalise else 0)


def knn(
    embeddings: np.ndarray, k: int, method: str = "auto", exact_max: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows) of the k nearest other faces of each face, best first (rows -1 where
    fewer were found).

    method "auto": FAISS flat (exact; numpy's exact search without FAISS) up to `exact_max`
    faces; above, IVF with 4 sqrt(N) cells of which 8 are scanned per face (approximate,
    about 1/500 of the exact cost at 1M faces)."""
    n = len(embeddings)
    if n < 2:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    options = {}
    if method == "auto":
        small = "flat" if importlib.util.find_spec("faiss") else "exact"
        method = small if n <= exact_max else "ivf"
        if method == "ivf":
            options = {"nlist": int(4 * np.sqrt(n)), "nprobe": 8}
    index = build_index(embeddings, method, **options)
    scores, rows = index.search(np.ascontiguousarray(embeddings, np.float32), min(k + 1, n))
    # drop each face itself (usually first; a duplicate face may come before it)
    own = rows == np.arange(n)[:, None]
    own[:, -1] |= ~own.any(1)  # not found itself: drop the last instead
    keep = ~own
    return scores[keep].reshape(n, -1), rows[keep].reshape(n, -1)


def knn_pairs(
    embeddings: np.ndarray, k: int, method: str = "auto", exact_max: int = 200_000
) -> tuple[np.ndarray, ...]:
    """(i, j, cosine) of each face i and its k nearest other faces j (i < j, unique)."""
    return pairs_of(*knn(embeddings, k, method, exact_max))


def pairs_of(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The k-NN lists `knn` as unique (i, j, cosine) pairs, i < j."""
    n = len(rows)
    i = np.repeat(np.arange(n), rows.shape[1])
    j = rows.ravel()
    s = scores.ravel()
    keep = (j >= 0) & (j != i)
    i, j, s = i[keep], j[keep], s[keep]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[first]


def _augmented(embeddings: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Face rows [e, 1, -o] (o: the face's score offset, `local_offsets`): sums of them over
    two clusters give, through `_dot`, the sum over their face pairs of a.b - o_a - o_b."""
    n, d = embeddings.shape
    rows = np.empty((n, d + 2), np.float32)
    rows[:, :d] = embeddings
    rows[:, d] = 1.0
    rows[:, d + 1] = 0.0 if offsets is None else -offsets
    return rows


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise x . y of augmented sums, the last two entries crossed (n_x (-O_y) + (-O_x) n_y)."""
    return np.einsum("ij,ij->i", x[:, :-2], y[:, :-2]) + x[:, -2] * y[:, -1] + x[:, -1] * y[:, -2]


def _links(
    sums: np.ndarray, sizes: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18
) -> np.ndarray:
    """Average linkage of cluster pairs (a, b) from their augmented sums, in chunks of pairs so
    the gathered rows stay small."""
    out = np.empty(len(a), np.float64)
    for s in range(0, len(a), chunk):
        x, y = a[s : s + chunk], b[s : s + chunk]
        out[s : s + chunk] = _dot(sums[x], sums[y]) / (sizes[x] * sizes[y])
    return out


def _relabel(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_inverse=True)[1]


def _stars(
    a: np.ndarray,
    b: np.ndarray,
    link: np.ndarray,
    sums: np.ndarray,
    sizes: np.ndarray,
    config: ClusterConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """One round's merges, as (child, root) cluster pairs.

    Every cluster points at its best partner. Of two clusters that point at each other (RAC's
    reciprocal pair) the larger is a root; the clusters pointing at a root join it in
    decreasing order of linkage, each checked against the root grown by those before it (so
    the star is what one-at-a-time average linkage would build), up to the first that fails.
    A large cluster thus takes all its single-face neighbours in one round instead of one per
    round. Clusters pointing at a non-root wait for the next round.
    """
    c = len(sizes)
    src, dst, val = np.r_[a, b], np.r_[b, a], np.r_[link, link]
    order = np.lexsort((dst, -val, src))  # per source: best link first, ties to lower id
    src, dst, val = src[order], dst[order], val[order]
    first = np.r_[True, src[1:] != src[:-1]]
    best = np.full(c, -1)
    best[src[first]] = dst[first]
    best_link = np.full(c, -np.inf)
    best_link[src[first]] = val[first]
    has = best >= 0
    reciprocal = has & (best[np.maximum(best, 0)] == np.arange(c))
    partner = np.maximum(best, 0)
    larger = (sizes > sizes[partner]) | ((sizes == sizes[partner]) & (np.arange(c) < partner))
    is_root = reciprocal & larger
    child = np.flatnonzero(has & ~is_root & is_root[partner])
    if not config.stars:
        child = child[best[best[child]] == child]
    if len(child) == 0:
        return child, child
    root = best[child]
    order = np.lexsort((child, -best_link[child], root))
    child, root = child[order], root[order]
    start = np.r_[True, root[1:] != root[:-1]]
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(child)), 0))
    cum = np.cumsum(sums[child], axis=0, dtype=np.float64)
    cum_n = np.cumsum(sizes[child])
    offset = np.where(group_start > 0, group_start - 1, 0)
    before = cum - sums[child] - np.where((group_start > 0)[:, None], cum[offset], 0.0)
    before_n = cum_n - sizes[child] - np.where(group_start > 0, cum_n[offset], 0)
    grown = sums[root] + before
    grown_n = sizes[root] + before_n
    grown_link = _dot(grown, sums[child]) / (grown_n * sizes[child])
    needed = threshold_for_mean(
        config.threshold, config.lowest, _evidence(grown_n, sizes[child]), config.power
    )
    failed = (grown_link < needed).astype(np.int64)
    failed_cum = np.cumsum(failed)
    failed_before = failed_cum - failed - np.where(group_start > 0, failed_cum[offset], 0)
    ok = (failed == 0) & (failed_before == 0)
    return child[ok], root[ok]


def merge_rounds(
    embeddings: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    config: ClusterConfig,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """Average-linkage agglomeration over candidate face pairs (i, j), in reciprocal-best
    rounds, with the size-dependent threshold of the module docstring. Returns a cluster label
    per face (0..C-1)."""
    n = len(embeddings)
    labels = np.arange(n)
    sums = _augmented(embeddings, offsets)
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
        link = _links(sums, sizes, a, b)
        needed = threshold_for_mean(
            config.threshold, config.lowest, _evidence(sizes[a], sizes[b]), config.power
        )
        ok = link >= needed
        a, b, link = a[ok], b[ok], link[ok]
        if len(a) == 0:
            break
        child, root = _stars(a, b, link, sums, sizes, config)
        if len(child) == 0:
            break
        target = np.arange(c)
        target[child] = root
        labels = target[labels]
        np.add.at(sums, root, sums[child])
        np.add.at(sizes, root, sizes[child])
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
    emb = emb[rows]
    found = knn(emb, config.search_depth, config.index, config.exact_max)
    labels[rows] = cluster_neighbours(emb, *found, config)
    return labels


def cluster_neighbours(
    embeddings: np.ndarray, scores: np.ndarray, near: np.ndarray, config: ClusterConfig
) -> np.ndarray:
    """Steps after the k-NN search (`knn`, to `config.search_depth`): the first pass, and
    with `config.normalise` the second on normalised scores."""
    i, j, _ = pairs_of(scores[:, : config.k], near[:, : config.k])
    found = merge_rounds(embeddings, i, j, config)
    if config.normalise:
        offsets = impostor_offsets(scores, near, found, config.cohort)
        found = merge_rounds(embeddings, i, j, config, offsets)
    return found


def impostor_offsets(
    scores: np.ndarray, near: np.ndarray, labels: np.ndarray, cohort: int
) -> np.ndarray:
    """Each face's score offset (r - median r) / 2, r its mean cosine to its `cohort` nearest
    neighbours outside its cluster (its nearest impostors): a pair then scores
    a.b - ((r_a + r_b) / 2 - median r). A face with fewer than cohort / 2 of them in its k-NN
    list (one of a large cluster) gets 0."""
    outside = (labels[np.maximum(near, 0)] != labels[:, None]) & (near >= 0)
    chosen = outside & (np.cumsum(outside, 1) <= cohort)
    count = chosen.sum(1)
    enough = count >= max(cohort // 2, 1)
    if not enough.any():
        return np.zeros(len(labels))
    r = np.where(chosen, scores, 0).sum(1, dtype=np.float64) / np.maximum(count, 1)
    middle = np.median(r[enough])
    return np.where(enough, (r - middle) / 2, 0.0)


def _evidence(na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """The pair's number of faces, as it counts for the threshold (module docstring)."""
    return 2.0 * na * nb / (na + nb)


def threshold_for_mean(
    threshold: float, floor: float, m: np.ndarray, power: float = 3.0
) -> np.ndarray:
    """The merge threshold for a cluster pair with evidence m (module docstring)."""
    return floor + (threshold - floor) / np.power(m, power)
