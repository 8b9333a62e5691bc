"""Evaluation metrics against scikit-learn and against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from facelab.eval import (
    best_accuracy,
    detection_identification_rate,
    dir_far_curve,
    equal_error_rate,
    kfold_accuracy,
    plot_curve,
    plot_roc,
    plot_score_histogram,
    rank_k_accuracy,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    verification_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_trials(seed: int, n: int = 400, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + 1.2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


TRIALS = [(seed, decimals) for seed in range(5) for decimals in (None, 1, 0)]


@pytest.mark.parametrize(("seed", "decimals"), TRIALS)
def test_roc_curve_matches_sklearn(seed, decimals):
    scores, labels = random_trials(seed, decimals=decimals)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert len(thresholds) == len(np.unique(scores)) + 1


@pytest.mark.parametrize(("seed", "decimals"), TRIALS)
def test_roc_auc_matches_sklearn(seed, decimals):
    scores, labels = random_trials(seed, decimals=decimals)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert roc_auc(scores, labels) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_roc_auc_ties_count_half():
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_eer_exact_crossing():
    # At threshold 0.6: 3 of 4 genuine accepted (FNR 1/4), 1 of 4 impostors accepted (FPR 1/4).
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    assert equal_error_rate(scores, labels) == pytest.approx((0.25, 0.6))


def test_eer_interpolated_crossing():
    # ROC points (FPR, FNR): at 0.8 -> (0, 1/3); at 0.7 -> (1/2, 1/3). FPR - FNR goes from
    # -1/3 to +1/6, so the crossing is 2/3 of the way along: FPR = FNR = 1/3.
    scores = [0.9, 0.8, 0.4, 0.7, 0.3]
    labels = [1, 1, 1, 0, 0]
    eer, threshold = equal_error_rate(scores, labels)
    assert eer == pytest.approx(1 / 3)
    assert threshold == 0.7


def test_eer_separable_is_zero():
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == (0.0, 0.8)


def test_tpr_at_fpr_hand_case():
    genuine = [0.95, 0.9, 0.8, 0.7, 0.4]
    impostor = [0.85, 0.6, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01]
    scores = genuine + impostor
    labels = [1] * 5 + [0] * 10
    # FPR 0: only scores above the top impostor 0.85 -> 2 of 5 genuine.
    assert tpr_at_fpr(scores, labels, 0.0) == (pytest.approx(0.4), 0.9)
    assert tpr_at_fpr(scores, labels, 0.05) == (pytest.approx(0.4), 0.9)
    # FPR 0.1 allows exactly one false accept (0.85): threshold 0.7 keeps it at one.
    assert tpr_at_fpr(scores, labels, 0.1) == (pytest.approx(0.8), 0.7)
    assert tpr_at_fpr(scores, labels, 0.3) == (pytest.approx(1.0), 0.4)


def test_tpr_at_fpr_strictest_point_too_loose():
    tpr, threshold = tpr_at_fpr([0.9, 0.8, 0.1], [0, 1, 0], 0.0)
    assert tpr == 0.0
    assert threshold > 0.9
    assert np.isfinite(threshold)


@pytest.mark.parametrize("seed", range(3))
def test_tpr_at_fpr_is_conservative(seed):
    scores, labels = random_trials(seed, n=1000, decimals=1)
    for target in (1e-3, 1e-2, 1e-1):
        tpr, threshold = tpr_at_fpr(scores, labels, target)
        accepted = scores >= threshold
        assert accepted[labels == 0].mean() <= target
        assert accepted[labels == 1].mean() == pytest.approx(tpr)


def test_best_accuracy_hand_case():
    # Thresholds give accuracy 2/4, 3/4 (accept 0.9), 2/4, 3/4 (accept >= 0.5), 2/4:
    # the strictest best one is kept, halfway between 0.9 and 0.6.
    assert best_accuracy([0.9, 0.6, 0.5, 0.1], [1, 0, 1, 0]) == (0.75, pytest.approx(0.75))


@pytest.mark.parametrize(("seed", "decimals"), TRIALS)
def test_best_accuracy_is_the_maximum(seed, decimals):
    scores, labels = random_trials(seed, decimals=decimals)
    accuracy, threshold = best_accuracy(scores, labels)
    assert np.mean((scores >= threshold) == labels) == pytest.approx(accuracy)
    candidates = np.r_[np.unique(scores), np.inf]
    brute = max(np.mean((scores >= t) == labels) for t in candidates)
    assert accuracy == pytest.approx(brute)


def lfw_like_folds():
    """10 folds of 3 genuine + 3 impostor pairs; fold 0 is shifted down to score lower.

    Folds 1-9 alone separate at 0.5 (impostors <= 0.3 < 0.7 <= genuine), which rejects every
    genuine pair of fold 0 (3/6 correct). Every other fold's training set includes fold 0,
    whose genuine scores (>= 0.40) still sit above all impostors (<= 0.3): threshold 0.35,
    all correct. Accuracies [0.5] + [1.0] * 9: mean 0.95, population std 0.15.
    """
    scores, labels, folds = [], [], []
    for fold in range(10):
        genuine = [0.40, 0.42, 0.44] if fold == 0 else [0.7, 0.8, 0.9]
        impostor = [0.10, 0.12, 0.14] if fold == 0 else [0.2, 0.25, 0.3]
        scores += genuine + impostor
        labels += [1, 1, 1, 0, 0, 0]
        folds += [fold] * 6
    return np.array(scores), np.array(labels), np.array(folds)


def test_kfold_accuracy_hand_case():
    scores, labels, folds = lfw_like_folds()
    result = kfold_accuracy(scores, labels, folds)
    np.testing.assert_allclose(result["accuracies"], [0.5] + [1.0] * 9)
    np.testing.assert_allclose(result["thresholds"], [0.5] + [0.35] * 9)
    assert result["mean"] == pytest.approx(0.95)
    assert result["std"] == pytest.approx(0.15)  # ddof=0
    assert best_accuracy(scores, labels)[0] == 1.0  # choosing on all folds would hide the miss


def test_kfold_accuracy_int_folds_and_order_independence():
    scores, labels, folds = lfw_like_folds()
    by_int = kfold_accuracy(scores, labels, 10)
    assert by_int == kfold_accuracy(scores, labels, folds)
    perm = np.random.default_rng(0).permutation(len(scores))
    shuffled = kfold_accuracy(scores[perm], labels[perm], folds[perm])
    assert shuffled["accuracies"] == pytest.approx(by_int["accuracies"])


def test_kfold_accept_all_and_reject_all_hold_for_held_out_scores_beyond_the_training_ones():
    # Fold 1 alone (the training fold of fold 0) is best served by accepting everything (3 of 4
    # genuine, the impostor scoring highest); fold 0's genuine pairs score below all of fold 1.
    scores = [0.1, 0.2, 0.9, 0.95] + [0.5, 0.6, 0.7, 0.8]
    labels = [1, 1, 0, 1] + [1, 1, 1, 0]
    result = kfold_accuracy(scores, labels, [0] * 4 + [1] * 4)
    assert best_accuracy(scores[4:], labels[4:]) == (0.75, 0.5)
    assert result["thresholds"][0] == 0.1 and result["accuracies"][0] == 0.75  # all accepted
    # mirrored: fold 1 best rejects everything, and fold 0's impostors score above all of it
    flipped = kfold_accuracy([-x for x in scores], [1 - y for y in labels], [0] * 4 + [1] * 4)
    assert flipped["thresholds"][0] > -0.1 and flipped["accuracies"][0] == 0.75  # all rejected
    assert json.loads(json.dumps(result | flipped, allow_nan=False)) == result | flipped


def test_kfold_held_out_decisions_follow_the_training_rule():
    """Weak scores, imbalanced folds: whenever the other folds' best is to accept (reject)
    every pair, the held-out fold's accuracy is its share of genuine (impostor) pairs, also
    when some of its scores lie beyond all the training scores."""
    extremes = beyond = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        folds = np.repeat(np.arange(10), 8)
        labels = rng.random(len(folds)) < rng.choice([0.2, 0.8], 10)[folds]
        scores = rng.normal(size=len(folds)) + 0.2 * labels
        result = kfold_accuracy(scores, labels, folds)
        for fold, accuracy in enumerate(result["accuracies"]):
            train, test = folds != fold, folds == fold
            best, threshold = best_accuracy(scores[train], labels[train])
            if threshold == scores[train].min() and best == labels[train].mean():
                assert accuracy == labels[test].mean(), (seed, fold)
                beyond += bool(scores[test].min() < threshold)
            elif threshold > scores[train].max():
                assert accuracy == 1 - labels[test].mean(), (seed, fold)
                beyond += bool(scores[test].max() >= threshold)
            else:  # an ordinary threshold: applied as chosen
                assert result["thresholds"][fold] == threshold, (seed, fold)
                continue
            extremes += 1
    assert extremes >= 20 and beyond >= 2, (extremes, beyond)  # the cases occurred


def test_verification_report_is_json_ready():
    scores, labels, folds = lfw_like_folds()
    report = verification_report(scores, labels, folds)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["auc"] == 1.0
    assert report["eer"] == 0.0
    assert report["n_genuine"] == report["n_impostor"] == 30
    assert report["kfold_mean"] == pytest.approx(0.95)
    for key in ("tpr_at_fpr_0.1", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001"):
        assert report[key] == 1.0
        assert type(report[key.replace("tpr", "threshold", 1)]) is float
    assert "kfold_mean" not in verification_report(scores, labels)


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [1, 0, 1], "length"),
        ([0.1, 0.2], [1, 1], "one class"),
        ([0.1, np.nan], [1, 0], "NaN"),
        ([0.1, np.inf], [1, 0], "finite"),
        ([0.1, 0.2], [1, 2], "binary"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
    ],
)
def test_bad_input_raises(scores, labels, message):
    for metric in (roc_curve, roc_auc, equal_error_rate, best_accuracy, verification_report):
        with pytest.raises(ValueError, match=message):
            metric(scores, labels)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="target_fpr"):
        tpr_at_fpr([0.1, 0.2], [1, 0], 1.5)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy([0.1, 0.2, 0.3], [1, 0, 1], [0, 1])
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy([0.1, 0.2, 0.3], [1, 0, 1], 1)
    with pytest.raises(ValueError, match="only one class"):
        kfold_accuracy([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0], [0, 0, 1, 1])


# Gallery: a (1 entry), b (2 entries), c (1 entry).
GALLERY = np.array(["a", "b", "b", "c"])
SIMILARITY = np.array(
    [
        [0.90, 0.20, 0.30, 0.10],  # a: rank 1
        [0.80, 0.70, 0.10, 0.75],  # b (best entry 0.70) behind a and c: rank 3
        [0.50, 0.60, 0.20, 0.55],  # c behind b: rank 2
        [0.10, 0.40, 0.65, 0.20],  # b through its second entry: rank 1, top score 0.65
    ]
)
PROBES = np.array(["a", "b", "c", "b"])


def test_rank_k_accuracy_hand_case():
    assert rank_k_accuracy(SIMILARITY, PROBES, GALLERY, 1) == 0.5
    assert rank_k_accuracy(SIMILARITY, PROBES, GALLERY, 2) == 0.75
    assert rank_k_accuracy(SIMILARITY, PROBES, GALLERY, 3) == 1.0


def test_rank_k_ties_are_pessimistic():
    assert rank_k_accuracy([[0.5, 0.5]], ["a"], ["a", "b"], 1) == 0.0
    assert rank_k_accuracy([[0.5, 0.5]], ["a"], ["a", "a"], 1) == 1.0  # same identity twice


def test_detection_identification_rate_hand_case():
    impostors = [0.7, 0.5, 0.3, 0.2]
    # FAR 0: threshold just above 0.7; only probe a (0.90) is rank-1 correct and above it.
    dir_, threshold = detection_identification_rate(SIMILARITY, PROBES, GALLERY, impostors, 0.0)
    assert dir_ == 0.25
    assert 0.7 < threshold < 0.71
    # FAR 0.25 (and 0.3, still one false alarm): threshold just above 0.5 -> a and b (0.65).
    for far in (0.25, 0.3):
        dir_, threshold = detection_identification_rate(SIMILARITY, PROBES, GALLERY, impostors, far)
        assert dir_ == 0.5
        assert 0.5 < threshold < 0.51
        assert np.mean(np.array(impostors) >= threshold) <= far
    # FAR 1: everything accepted; DIR is then the rank-1 rate.
    assert detection_identification_rate(SIMILARITY, PROBES, GALLERY, impostors, 1.0)[0] == 0.5


def test_dir_far_curve():
    impostors = [0.7, 0.5, 0.3, 0.2]
    fars, dirs, thresholds = dir_far_curve(SIMILARITY, PROBES, GALLERY, impostors, [0.0, 0.25, 1.0])
    np.testing.assert_allclose(dirs, [0.25, 0.5, 0.5])
    assert np.all(np.diff(thresholds) <= 0)
    fars, dirs, _ = dir_far_curve(SIMILARITY, PROBES, GALLERY, impostors)
    assert fars[0] == pytest.approx(0.25) and fars[-1] == pytest.approx(1.0)
    assert np.all(np.diff(dirs) >= 0)


def test_identification_bad_input():
    with pytest.raises(ValueError, match="absent from the gallery"):
        rank_k_accuracy(SIMILARITY, ["a", "b", "c", "z"], GALLERY, 1)
    with pytest.raises(ValueError, match="do not match"):
        rank_k_accuracy(SIMILARITY, PROBES[:3], GALLERY, 1)
    with pytest.raises(ValueError, match="far"):
        detection_identification_rate(SIMILARITY, PROBES, GALLERY, [0.1], 2.0)
    with pytest.raises(ValueError, match="impostor_max_scores"):
        detection_identification_rate(SIMILARITY, PROBES, GALLERY, [], 0.1)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_plots_write_png(tmp_path):
    scores, labels = random_trials(0)
    fpr, tpr, _ = roc_curve(scores, labels)
    path = tmp_path / "roc" / "roc.png"
    assert plot_roc(fpr, tpr, path, "ROC", auc=roc_auc(scores, labels)) == path
    assert_png(path)
    path = tmp_path / "hist" / "scores.png"
    plot_score_histogram(scores, labels, path, threshold=0.6)
    assert_png(path)
    path = tmp_path / "curve" / "curve.png"
    xs = np.arange(1, 6)
    plot_curve(xs, {"train": xs * 0.1, "val": xs * 0.05}, path, "epoch", "loss", "learning curve")
    assert_png(path)
