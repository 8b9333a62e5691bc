"""Identification metrics: probes searched against a gallery of enrolled identities.

``similarity`` matrices are (probes, gallery entries), higher meaning more alike. A gallery may
hold several entries per identity; an identity's score for a probe is its best entry's score,
so ranks count identities, not entries. Ties are resolved pessimistically: another identity
scoring exactly as high as the true one is ranked ahead of it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def _ranks(
    similarity: ArrayLike, probe_labels: ArrayLike, gallery_labels: ArrayLike
) -> tuple[NDArray[np.int64], FloatArray]:
    """Per probe: (rank of its true identity, its top score over all identities)."""
    sim = np.asarray(similarity, dtype=np.float64)
    probes = np.asarray(probe_labels)
    gallery = np.asarray(gallery_labels)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D (probes, gallery), got shape {sim.shape}")
    if probes.shape != (sim.shape[0],) or gallery.shape != (sim.shape[1],):
        raise ValueError(
            f"label shapes {probes.shape} and {gallery.shape} do not match similarity "
            f"shape {sim.shape}"
        )
    if sim.size == 0:
        raise ValueError("similarity is empty")
    if np.isnan(sim).any():
        raise ValueError(f"similarity contains {int(np.isnan(sim).sum())} NaN value(s)")
    identities, entry_identity = np.unique(gallery, return_inverse=True)
    missing = ~np.isin(probes, identities)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} probe(s) have identities absent from the gallery, e.g. "
            f"{probes[missing][0]!r}; mated probes must be enrolled"
        )
    order = np.argsort(entry_identity, kind="mergesort")
    starts = np.flatnonzero(np.r_[True, np.diff(entry_identity[order]) != 0])
    per_identity = np.maximum.reduceat(sim[:, order], starts, axis=1)  # (probes, identities)
    true_score = per_identity[np.arange(len(probes)), np.searchsorted(identities, probes)]
    # Counting the true identity itself makes this 1 + the number of identities tied or ahead.
    ranks = (per_identity >= true_score[:, None]).sum(axis=1)
    return ranks, per_identity.max(axis=1)


def rank_k_accuracy(
    similarity: ArrayLike, probe_labels: ArrayLike, gallery_labels: ArrayLike, k: int = 1
) -> float:
    """Closed-set rank-k identification rate: fraction of probes whose identity is in the top k.

    A probe's rank is 1 + the number of other identities scoring at least as high as its own.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks, _ = _ranks(similarity, probe_labels, gallery_labels)
    return float(np.mean(ranks <= k))


def _check_impostors(impostor_max_scores: ArrayLike) -> FloatArray:
    imp = np.asarray(impostor_max_scores, dtype=np.float64)
    if imp.ndim != 1 or len(imp) == 0:
        raise ValueError(f"impostor_max_scores must be a non-empty 1-D array, got {imp.shape}")
    if np.isnan(imp).any():
        raise ValueError(f"impostor_max_scores contain {int(np.isnan(imp).sum())} NaN value(s)")
    return imp


def _dir_at(
    ranks: NDArray[np.int64], top: FloatArray, imp: FloatArray, fars: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(DIR, threshold) at each FAR; the threshold is the lowest one meeting the FAR bound."""
    if ((fars < 0.0) | (fars > 1.0)).any() or np.isnan(fars).any():
        raise ValueError("far values must be in [0, 1]")
    n_imp = len(imp)
    imp_desc = np.sort(imp)[::-1]
    # At most `allowed` impostors may reach the threshold (slack for 1e-3 * 3000 != 3.0).
    allowed = np.floor(fars * n_imp * (1.0 + 1e-9)).astype(np.int64)
    just_above_next = np.nextafter(imp_desc[np.minimum(allowed, n_imp - 1)], np.inf)
    accept_all = min(top.min(), imp.min())
    thresholds = np.where(allowed < n_imp, just_above_next, accept_all)
    hits = np.sort(top[ranks == 1])
    detected = len(hits) - np.searchsorted(hits, thresholds, side="left")
    return detected / len(ranks), thresholds


def detection_identification_rate(
    genuine_sims: ArrayLike,
    genuine_labels: ArrayLike,
    gallery_labels: ArrayLike,
    impostor_max_scores: ArrayLike,
    far: float,
) -> tuple[float, float]:
    """Open-set DIR at a false alarm rate, ``(dir, threshold)``, as in Best-Rowden et al. 2014.

    ``genuine_sims`` (mated probes x gallery) holds probes whose identity is enrolled;
    ``impostor_max_scores`` holds each non-mated probe's top gallery score. The threshold is the
    lowest one at which at most a ``far`` fraction of non-mated probes score >= threshold; DIR
    is the fraction of mated probes that are rank-1 correct with top score >= threshold.
    """
    ranks, top = _ranks(genuine_sims, genuine_labels, gallery_labels)
    dirs, thresholds = _dir_at(ranks, top, _check_impostors(impostor_max_scores), np.array([far]))
    return float(dirs[0]), float(thresholds[0])


def dir_far_curve(
    genuine_sims: ArrayLike,
    genuine_labels: ArrayLike,
    gallery_labels: ArrayLike,
    impostor_max_scores: ArrayLike,
    fars: ArrayLike | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(fars, dirs, thresholds)`` for a DIR-vs-FAR plot, same conventions as
    ``detection_identification_rate``.

    Without ``fars``, uses up to 100 log-spaced FARs from 1/#impostors (one false alarm) to 1.
    """
    ranks, top = _ranks(genuine_sims, genuine_labels, gallery_labels)
    imp = _check_impostors(impostor_max_scores)
    if fars is None:
        far_grid = np.geomspace(1.0 / len(imp), 1.0, num=min(len(imp), 100))
    else:
        far_grid = np.atleast_1d(np.asarray(fars, dtype=np.float64))
    dirs, thresholds = _dir_at(ranks, top, imp, far_grid)
    return far_grid, dirs, thresholds
