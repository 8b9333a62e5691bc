"""Clustering metrics: pure functions of a predicted and a true labelling (numpy only).

Both take one label per item (any integers or strings); items with the same predicted label
form one cluster, items with the same true label one class.

- Pairwise precision / recall / F: over all unordered pairs of items, precision is the share
  of pairs put in the same cluster that are of the same class, recall the share of same-class
  pairs put in the same cluster. Dominated by large classes (pairs grow with size squared).
- BCubed precision / recall / F (Bagga & Baldwin 1998, Amigó et al. 2009): per item, the share
  of its cluster (itself included) of its class, and the share of its class in its cluster,
  averaged over items. Every item counts once, so singletons (most of LFW) weigh as much as
  members of large classes.

Both are computed from the contingency table (cluster x class counts) in O(n log n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f: float

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f": self.f}


def _f(precision: float, recall: float) -> float:
    total = precision + recall
    return 0.0 if total == 0 else 2 * precision * recall / total


def _contingency(
    predicted: ArrayLike, truth: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(cell counts, cluster sizes, class sizes, cell's cluster index, cell's class index)."""
    p = np.asarray(predicted)
    t = np.asarray(truth)
    if p.ndim != 1 or t.ndim != 1:
        raise ValueError(f"labellings must be 1-D, got shapes {p.shape} and {t.shape}")
    if len(p) != len(t):
        raise ValueError(f"labellings differ in length: {len(p)} != {len(t)}")
    if len(p) == 0:
        raise ValueError("labellings are empty")
    _, p_idx = np.unique(p, return_inverse=True)
    _, t_idx = np.unique(t, return_inverse=True)
    cells, counts = np.unique(np.stack([p_idx, t_idx]), axis=1, return_counts=True)
    cluster_sizes = np.bincount(p_idx)
    class_sizes = np.bincount(t_idx)
    return counts, cluster_sizes, class_sizes, cells[0], cells[1]


def pairwise_prf(predicted: ArrayLike, truth: ArrayLike) -> PRF:
    """Pairwise precision, recall and F. A labelling with no same-cluster pair has precision 1
    (it claims nothing wrong); one with no same-class pair has recall 1."""
    counts, cluster_sizes, class_sizes, _, _ = _contingency(predicted, truth)

    def pairs(x: np.ndarray) -> float:
        return float((x.astype(np.float64) * (x - 1) / 2).sum())

    both, claimed, true = pairs(counts), pairs(cluster_sizes), pairs(class_sizes)
    precision = both / claimed if claimed else 1.0
    recall = both / true if true else 1.0
    return PRF(precision, recall, _f(precision, recall))


def bcubed_prf(predicted: ArrayLike, truth: ArrayLike) -> PRF:
    """BCubed precision, recall and F (each item counted in its own cluster and class)."""
    counts, cluster_sizes, class_sizes, cell_cluster, cell_class = _contingency(predicted, truth)
    n = float(cluster_sizes.sum())
    c = counts.astype(np.float64)
    # each of the `c` items of a cell has precision c / |cluster| and recall c / |class|
    precision = float((c * c / cluster_sizes[cell_cluster]).sum() / n)
    recall = float((c * c / class_sizes[cell_class]).sum() / n)
    return PRF(precision, recall, _f(precision, recall))


def clustering_report(predicted: ArrayLike, truth: ArrayLike) -> dict[str, object]:
    """Both metrics and the cluster counts, as one JSON-ready dict."""
    p = np.asarray(predicted)
    return {
        "pairwise": pairwise_prf(predicted, truth).as_dict(),
        "bcubed": bcubed_prf(predicted, truth).as_dict(),
        "clusters": int(len(np.unique(p))),
        "classes": int(len(np.unique(np.asarray(truth)))),
    }
