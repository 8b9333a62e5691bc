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
