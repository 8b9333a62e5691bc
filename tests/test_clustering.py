"""Clustering metrics against brute force, and the clustering algorithm on synthetic faces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facelab.eval.clustering import bcubed_prf, clustering_report, pairwise_prf


def _brute_pairwise(pred, truth):
    same_p = same_t = both = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        sp, st = pred[i] == pred[j], truth[i] == truth[j]
        same_p += sp
        same_t += st
        both += sp and st
    precision = both / same_p if same_p else 1.0
    recall = both / same_t if same_t else 1.0
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f


def _brute_bcubed(pred, truth):
    n = len(pred)
    ps, rs = [], []
    for i in range(n):
        cluster = [j for j in range(n) if pred[j] == pred[i]]
        cls = [j for j in range(n) if truth[j] == truth[i]]
        correct = sum(truth[j] == truth[i] for j in cluster)
        ps.append(correct / len(cluster))
        rs.append(correct / len(cls))
    p, r = float(np.mean(ps)), float(np.mean(rs))
    return p, r, 2 * p * r / (p + r)


@pytest.mark.parametrize("seed", range(25))
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    pred = rng.integers(0, int(rng.integers(1, 12)), n)
    truth = rng.integers(0, int(rng.integers(1, 12)), n)
    got = pairwise_prf(pred, truth)
    assert (got.precision, got.recall, got.f) == pytest.approx(_brute_pairwise(pred, truth))
    got = bcubed_prf(pred, truth)
    assert (got.precision, got.recall, got.f) == pytest.approx(_brute_bcubed(pred, truth))


def test_metrics_known_cases():
    truth = ["a", "a", "b", "b", "c"]
    perfect = clustering_report([5, 5, 7, 7, 9], truth)
    assert perfect["pairwise"] == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    assert perfect["bcubed"] == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    assert (perfect["clusters"], perfect["classes"]) == (3, 3)
    # all singletons: nothing claimed (precision 1), no same-class pair recovered
    singles = pairwise_prf(range(5), truth)
    assert (singles.precision, singles.recall) == (1.0, 0.0)
    assert bcubed_prf(range(5), truth).precision == 1.0
    assert bcubed_prf(range(5), truth).recall == pytest.approx((0.5 * 4 + 1) / 5)
    # one big cluster: 2 of 10 pairs right
    lump = pairwise_prf([0] * 5, truth)
    assert (lump.precision, lump.recall) == (pytest.approx(0.2), 1.0)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="length"):
        pairwise_prf([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        bcubed_prf([], [])
    with pytest.raises(ValueError, match="1-D"):
        bcubed_prf([[1]], [[1]])


# -- the clustering algorithm -------------------------------------------------------------------


def _same_partition(a, b) -> bool:
    pairs = {(x, y) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a)) == len(set(b))


@pytest.mark.parametrize("seed", range(6))
def test_full_graph_with_fixed_threshold_is_average_linkage(seed):
    """With every pair a candidate, no size allowance and raw cosines (no normalisation),
    reciprocal-pair rounds give exactly scikit-learn's average-linkage clustering cut at the
    same cosine; star rounds nearly."""
    from sklearn.cluster import AgglomerativeClustering

    from facelab.collections.cluster import ClusterConfig, cluster_embeddings

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, 16))
    x = centres[rng.integers(0, 12, 150)] + 0.5 * rng.standard_normal((150, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    threshold = 0.6
    config = ClusterConfig(
        threshold=threshold, floor=threshold, k=149, stars=False, normalise=False
    )
    ours = cluster_embeddings(x, config)
    theirs = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=1 - threshold
    ).fit_predict(x)
    assert len(set(ours)) > 5
    assert _same_partition(ours.tolist(), theirs.tolist())
    config = ClusterConfig(threshold=threshold, floor=threshold, k=149, normalise=False)
    stars = cluster_embeddings(x, config)
    assert pairwise_prf(stars, theirs).f > 0.98


def test_linkage_with_offsets_is_the_mean_of_offset_pair_scores():
    """The augmented sums give, for any two clusters, the mean over their face pairs of
    a.b - o_a - o_b."""
    from facelab.collections.cluster import _augmented, _links

    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    offsets = rng.uniform(-0.05, 0.05, 9)
    groups = [[0, 1, 2, 3], [4], [5, 6, 7, 8]]
    rows = _augmented(x, offsets)
    sums = np.stack([rows[g].sum(0) for g in groups])
    sizes = np.array([len(g) for g in groups])
    a, b = np.array([0, 0, 1]), np.array([1, 2, 2])
    brute = [
        np.mean([x[p] @ x[q] - offsets[p] - offsets[q] for p in groups[u] for q in groups[v]])
        for u, v in zip(a, b, strict=True)
    ]
    assert _links(sums, sizes, a, b) == pytest.approx(brute, abs=1e-5)


def test_impostor_offsets_use_the_nearest_faces_outside_the_cluster():
    from facelab.collections.cluster import impostor_offsets

    labels = np.array([0, 0, 1, 2, 0])
    near = np.array([[1, 2, 3, 4], [0, 3, 2, 4], [3, 4, 0, 1], [2, 0, 1, 4], [0, 1, -1, -1]])
    scores = np.array(
        [
            [0.99, 0.90, 0.80, 0.70],  # face 0: its cluster-mate 1 is skipped -> 0.90, 0.80
            [0.99, 0.88, 0.86, 0.50],  # face 1: 0.88, 0.86
            [0.92, 0.90, 0.70, 0.60],  # face 2: 0.92, 0.90
            [0.92, 0.80, 0.78, 0.60],  # face 3: 0.92, 0.80
            [0.99, 0.98, -9.0, -9.0],  # face 4: nothing outside its cluster found -> 0
        ]
    )
    got = impostor_offsets(scores, near, labels, cohort=2)
    r = np.array([0.85, 0.87, 0.91, 0.86])
    assert got[:4] == pytest.approx((r - np.median(r)) / 2) and got[4] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_normalised_scores_keep_a_hub_face_out(seed):
    """A face close to everyone (a blurred "hub") and above the threshold with one person's
    face joins it on raw cosines; its nearest impostors score high too, so normalised it stays
    alone. (Whether normalising helps overall is LFW's to measure: docs/collections.md.)"""
    from facelab.collections.cluster import ClusterConfig, cluster_embeddings

    rng = np.random.default_rng(seed)
    people = rng.standard_normal((40, 32))
    faces = np.repeat(people, 3, axis=0) + 0.35 * rng.standard_normal((120, 32))
    loner = rng.standard_normal(32)
    hub = loner + 0.8 * people.mean(0) * np.sqrt(40)
    x = np.vstack([faces, loner, hub])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    threshold = float(x[-1] @ x[-2]) - 0.01
    plain = cluster_embeddings(x, ClusterConfig(threshold, k=10, normalise=False))
    normalised = cluster_embeddings(x, ClusterConfig(threshold, k=10, cohort=5, depth=30))
    assert plain[-1] == plain[-2]
    assert normalised[-1] != normalised[-2]


def test_size_allowance_merges_large_clusters_not_single_faces():
    from facelab.collections.cluster import ClusterConfig, threshold_for_mean

    config = ClusterConfig(threshold=0.9, margin=0.1)
    assert config.lowest == pytest.approx(0.8)
    m = np.array([1, 4, 100])
    assert threshold_for_mean(0.9, 0.8, m, power=0.5) == pytest.approx([0.9, 0.85, 0.81])
    assert threshold_for_mean(0.9, 0.8, m, power=3) == pytest.approx([0.9, 0.8 + 0.1 / 64, 0.8])


def test_quality_gate_and_bad_input():
    from facelab.collections.cluster import UNCLUSTERED, ClusterConfig, cluster_embeddings

    x = np.tile(np.eye(4, dtype=np.float32)[:1], (5, 1))
    labels = cluster_embeddings(x, ClusterConfig(0.9, min_quality=0.5), np.array([1, 1, 0, 1, 0]))
    assert labels.tolist()[2] == labels.tolist()[4] == UNCLUSTERED
    assert len({labels[0], labels[1], labels[3]}) == 1
    with pytest.raises(ValueError, match="threshold"):
        ClusterConfig(threshold=2.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cluster_embeddings(np.zeros(3), ClusterConfig(0.5))
