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
    """With every pair a candidate and no size allowance, reciprocal-pair rounds give exactly
    scikit-learn's average-linkage clustering cut at the same cosine; star rounds nearly."""
    from sklearn.cluster import AgglomerativeClustering

    from facelab.collections.cluster import ClusterConfig, cluster_embeddings

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, 16))
    x = centres[rng.integers(0, 12, 150)] + 0.5 * rng.standard_normal((150, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    threshold = 0.6
    config = ClusterConfig(threshold=threshold, floor=threshold, k=149, stars=False)
    ours = cluster_embeddings(x, config)
    theirs = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=1 - threshold
    ).fit_predict(x)
    assert len(set(ours)) > 5
    assert _same_partition(ours.tolist(), theirs.tolist())
    stars = cluster_embeddings(x, ClusterConfig(threshold=threshold, floor=threshold, k=149))
    assert pairwise_prf(stars, theirs).f > 0.98


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
