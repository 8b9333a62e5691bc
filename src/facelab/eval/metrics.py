"""Verification metrics: pure functions of similarity scores and same/different labels.

Conventions shared by every function here:

- ``scores`` are similarities: higher means "more likely the same person".
- ``labels`` are 1/True for genuine (same identity) pairs and 0/False for impostor pairs.
- A pair is accepted when ``score >= threshold``.

Only numpy is used, so the results can be checked against scikit-learn in the tests without
scikit-learn being a run-time dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def finite(value: float, what: str = "threshold") -> float:
    """`value` as a float, refusing NaN and infinities: `score >= nan` is never true, so a NaN
    threshold would silently reject everything."""
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return number


def _check_binary(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Return (scores as float64, labels as bool), raising ValueError on anything ambiguous."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {len(s)} != {len(y)}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (found +/-inf)")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be binary: bool or 0/1")
        y = y.astype(np.bool_)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            "labels contain only one class; verification metrics need both genuine (1) "
            "and impostor (0) pairs"
        )
    return s, y


def _operating_points(
    s: FloatArray, y: NDArray[np.bool_]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cumulative (true positives, false positives, threshold) at each distinct score, descending.

    Tied scores share one point: a threshold cannot separate them.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted, dtype=np.float64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s_sorted[last_of_tie]


def _reject_all_threshold(s: FloatArray) -> float:
    """A finite threshold just above the highest score: accepts nothing, stays JSON-safe."""
    return float(np.nextafter(s.max(), np.inf))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score, as sklearn computes them.

    Matches ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``: the first
    point is (0, 0) with threshold ``inf``; thresholds then decrease through every distinct score.
    """
    s, y = _check_binary(scores, labels)
    tps, fps, thresholds = _operating_points(s, y)
    n_pos = float(y.sum())
    n_neg = float(len(y)) - n_pos
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _midranks(s: FloatArray) -> FloatArray:
    """1-based ranks with tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], len(s)]
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic with midranks.

    Ties between a genuine and an impostor score count one half, which equals the trapezoidal
    area under the tie-collapsed ROC curve (and sklearn's ``roc_auc_score``).
    """
    s, y = _check_binary(scores, labels)
    n_pos = float(y.sum())
    n_neg = float(len(y)) - n_pos
    u = _midranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def equal_error_rate(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Equal error rate and its threshold, ``(eer, threshold)``.

    Walking the ROC from strict to lenient, FPR rises and FNR = 1 - TPR falls. The EER is where
    the two cross, linearly interpolated on the ROC segment between the last point with
    FPR < FNR and the first with FPR >= FNR (exact when a point has FPR == FNR). The threshold
    is that first point's score: the strictest threshold whose FPR is at least its FNR.
    """
    fpr, tpr, thresholds = roc_curve(scores, labels)
    diff = fpr - (1.0 - tpr)  # -1 at the (0, 0) start, +1 at the accept-all end
    i = int(np.argmax(diff >= 0.0))
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1)
    eer = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    return float(eer), float(thresholds[i])


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, target_fpr: float) -> tuple[float, float]:
    """Highest TPR whose FPR does not exceed ``target_fpr``, and its threshold.

    Conservative: no interpolation between ROC points, so the returned threshold really achieves
    FPR <= target on these scores. If even the strictest distinct score exceeds the target, the
    result is TPR 0 with a threshold just above the highest score (accept nothing).
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    s, y = _check_binary(scores, labels)
    tps, fps, thresholds = _operating_points(s, y)
    n_pos = float(y.sum())
    n_neg = float(len(y)) - n_pos
    # Compare counts, with slack for e.g. 1e-3 * 3000 == 3.0000000000000004.
    ok = np.flatnonzero(fps <= target_fpr * n_neg * (1.0 + 1e-9))
    if len(ok) == 0:
        return 0.0, _reject_all_threshold(s)
    i = ok[-1]
    return float(tps[i] / n_pos), float(thresholds[i])


def _best_split(s: FloatArray, y: NDArray[np.bool_]) -> tuple[float, float, str]:
    """``best_accuracy`` on checked arrays, plus which kind of rule won: "reject_all",
    "accept_all" or "threshold" (some pairs accepted, some rejected)."""
    tps, fps, accepted = _operating_points(s, y)
    n_pos = float(y.sum())
    n = float(len(y))
    n_neg = n - n_pos
    # Candidate 0 rejects everything; candidate k >= 1 accepts scores >= accepted[k - 1].
    correct = np.r_[n_neg, tps + (n_neg - fps)]
    k = int(np.argmax(correct))
    if k == 0:
        return float(correct[k] / n), _reject_all_threshold(s), "reject_all"
    if k == len(accepted):
        return float(correct[k] / n), float(accepted[-1]), "accept_all"
    low, high = accepted[k], accepted[k - 1]
    mid = (low + high) / 2.0
    return float(correct[k] / n), float(mid if mid > low else high), "threshold"


def best_accuracy(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Highest accuracy over all thresholds, and the threshold achieving it.

    The threshold is placed halfway between the lowest accepted and the highest rejected score,
    so it generalises symmetrically when applied to held-out pairs (as in ``kfold_accuracy``).
    Among equally accurate thresholds the strictest is kept (fewest false accepts). When
    accepting (rejecting) every pair is best, the threshold is the lowest score (just above the
    highest).
    """
    s, y = _check_binary(scores, labels)
    accuracy, threshold, _ = _best_split(s, y)
    return accuracy, threshold


def _fold_ids(folds: int | ArrayLike, n: int) -> NDArray[Any]:
    """Per-pair fold ids; an int k means k contiguous folds in order (LFW's pairs.txt layout)."""
    if isinstance(folds, int | np.integer):
        k = int(folds)
        if not 2 <= k <= n:
            raise ValueError(f"number of folds must be in [2, {n}], got {k}")
        sizes = np.full(k, n // k)
        sizes[: n % k] += 1
        return np.repeat(np.arange(k), sizes)
    ids = np.asarray(folds)
    if ids.shape != (n,):
        raise ValueError(f"folds must hold one fold id per pair: shape {ids.shape} != ({n},)")
    if len(np.unique(ids)) < 2:
        raise ValueError("folds must contain at least two distinct fold ids")
    return ids


def kfold_accuracy(scores: ArrayLike, labels: ArrayLike, folds: int | ArrayLike) -> dict[str, Any]:
    """LFW-protocol accuracy: each fold is scored with a threshold chosen on the other folds.

    ``folds`` is either one fold id per pair or an int k (k contiguous, in-order folds, like
    LFW's 10 sets of 600 pairs). The threshold for a fold is ``best_accuracy`` on all the other
    folds, so no test pair influences its own threshold. ``std`` is the population standard
    deviation (``np.std``, ddof=0), as insightface and most LFW tables report it.

    When the other folds are best served by accepting every pair (or rejecting every pair), the
    held-out fold is decided the same way, every pair accepted (rejected): its threshold is the
    lowest score of all folds (just above the highest). Otherwise a held-out score beyond the
    training folds' extreme score would land on the other side of a threshold that only stood
    for "everything", and the fold's result would depend on where the training scores happened
    to end. Only the held-out scores' range is used, never their labels.

    Returns ``{"mean", "std", "accuracies", "thresholds"}`` with plain floats, folds in
    ascending id order.
    """
    s, y = _check_binary(scores, labels)
    ids = _fold_ids(folds, len(s))
    accuracies: list[float] = []
    thresholds: list[float] = []
    for fold in np.unique(ids):
        test = ids == fold
        if len(np.unique(y[~test])) < 2:
            raise ValueError(f"the folds other than {fold!r} hold only one class of pairs")
        _, threshold, rule = _best_split(s[~test], y[~test])
        if rule == "accept_all":
            threshold = float(s.min())
        elif rule == "reject_all":
            threshold = _reject_all_threshold(s)
        accuracies.append(float(np.mean((s[test] >= threshold) == y[test])))
        thresholds.append(threshold)
    return {
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "accuracies": accuracies,
        "thresholds": thresholds,
    }


def verification_report(
    scores: ArrayLike,
    labels: ArrayLike,
    folds: int | ArrayLike | None = None,
    fpr_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
) -> dict[str, Any]:
    """All verification numbers in one JSON-serialisable dict of plain floats and ints.

    Keys: ``n_genuine``, ``n_impostor``, ``auc``, ``eer``, ``eer_threshold``,
    ``tpr_at_fpr_<target>`` and ``threshold_at_fpr_<target>`` per target (e.g.
    ``tpr_at_fpr_0.001``), ``best_accuracy``, ``best_accuracy_threshold`` and, when ``folds``
    is given, ``kfold_mean``, ``kfold_std``, ``kfold_accuracies``, ``kfold_thresholds``.
    """
    s, y = _check_binary(scores, labels)
    report: dict[str, Any] = {
        "n_genuine": int(y.sum()),
        "n_impostor": int((~y).sum()),
        "auc": roc_auc(s, y),
    }
    report["eer"], report["eer_threshold"] = equal_error_rate(s, y)
    for target in fpr_targets:
        tpr, threshold = tpr_at_fpr(s, y, target)
        report[f"tpr_at_fpr_{target:g}"] = tpr
        report[f"threshold_at_fpr_{target:g}"] = threshold
    report["best_accuracy"], report["best_accuracy_threshold"] = best_accuracy(s, y)
    if folds is not None:
        kfold = kfold_accuracy(s, y, folds)
        report["kfold_mean"] = kfold["mean"]
        report["kfold_std"] = kfold["std"]
        report["kfold_accuracies"] = kfold["accuracies"]
        report["kfold_thresholds"] = kfold["thresholds"]
    return report


def threshold_at_far(scores: ArrayLike, labels: ArrayLike, target_far: float) -> dict[str, Any]:
    """The operating point for a target false-accept rate: the highest-TPR threshold whose FAR
    on these trials does not exceed `target_far` (`tpr_at_fpr`), with the FAR and FRR measured
    at it and the trial counts behind them.

    Keys: ``target_far``, ``threshold``, ``far``, ``frr``, ``n_genuine``, ``n_impostor``. When
    one false accept is more than `target_far` of the impostors (``target_far * n_impostor <
    1``), the threshold is the strictest that accepts no impostor and `far` is 0: a bound the
    trials cannot confirm, which ``n_impostor`` lets a reader see.
    """
    s, y = _check_binary(scores, labels)
    tpr, threshold = tpr_at_fpr(s, y, target_far)
    return {
        "target_far": float(target_far),
        "threshold": threshold,
        "far": float(np.mean(s[~y] >= threshold)),
        "frr": float(1.0 - tpr),
        "n_genuine": int(y.sum()),
        "n_impostor": int((~y).sum()),
    }
