"""Evaluation: verification and identification metrics (pure numpy) and plots.

Everything here is a function of scores and labels; nothing imports models, training or
galleries. Plot functions import matplotlib only when called.
"""

from facelab.eval.identification import (
    detection_identification_rate,
    dir_far_curve,
    rank_k_accuracy,
)
from facelab.eval.metrics import (
    best_accuracy,
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    threshold_at_far,
    tpr_at_fpr,
    verification_report,
)
from facelab.eval.plots import plot_curve, plot_det, plot_roc, plot_score_histogram

__all__ = [
    "best_accuracy",
    "detection_identification_rate",
    "dir_far_curve",
    "equal_error_rate",
    "kfold_accuracy",
    "plot_curve",
    "plot_det",
    "plot_roc",
    "plot_score_histogram",
    "rank_k_accuracy",
    "roc_auc",
    "roc_curve",
    "threshold_at_far",
    "tpr_at_fpr",
    "verification_report",
]
