"""Figures for evaluation results, written atomically.

matplotlib is imported inside each function so that ``facelab.eval`` stays importable (and
fast) without it. Figures are drawn with the Agg canvas directly, never through pyplot, so no
global backend state is touched and plotting is safe in servers and worker threads.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from facelab.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(size: tuple[float, float] = (6.0, 4.5)) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """`fileio.atomic_write`: readers never see a half-written image, even if plotting fails
    midway, and a full disk is an error naming ``path``."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=120))


# (label, false-accept rate, true-accept rate) of an operating point on the plotted trials
RatePoint = tuple[str, float, float]
# (label, threshold) of an operating point on the score axis
ThresholdMark = tuple[str, float]
# The low end of the logarithmic FAR axes: the operating points of interest reach 1e-4.
MIN_FPR = 1e-4
MARKER_STYLE = {"marker": "o", "linestyle": "none", "markersize": 6, "zorder": 3}


def _mark_points(
    ax: Axes, points: Sequence[RatePoint], det: bool = False, log: bool = False
) -> None:
    """One marker per operating point: at (FAR, TAR) on a ROC, at (FAR, FRR) on a DET. On
    logarithmic axes a rate under `MIN_FPR` (0 on a short list) cannot be drawn: it is put on
    the axis edge as a triangle pointing off the axis, and its label says so."""
    for label, fpr, tpr in points:
        x, y = fpr, (1.0 - tpr if det else tpr)
        style = dict(MARKER_STYLE)
        clipped = []
        if log and x < MIN_FPR:
            x, style["marker"] = MIN_FPR, "<"
            clipped.append(f"FAR {fpr:.2g}")
        if det and y < MIN_FPR:
            y, style["marker"] = MIN_FPR, "v"
            clipped.append(f"FRR {1.0 - tpr:.2g}")
        text = f"{label} ({', '.join(clipped)}: on the axis edge)" if clipped else label
        ax.plot([x], [y], label=text, gid=f"operating point {label}", **style)


def roc_figure(
    fpr: ArrayLike,
    tpr: ArrayLike,
    title: str = "ROC",
    auc: float | None = None,
    points: Sequence[RatePoint] = (),
) -> Figure:
    """ROC (TPR vs FPR) twice: a linear FPR axis (left) and a logarithmic one from 1e-4 to 1
    (right), where face systems operate; `points` are marked on both."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    fig = _new_figure((11.0, 4.5))
    label = "ROC" if auc is None else f"ROC (AUC = {auc:.4f})"
    linear, log = fig.subplots(1, 2)
    linear.plot(fpr, tpr, label=label)
    linear.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    linear.set_xlim(0.0, 1.0)
    shown = fpr > 0
    log.plot(fpr[shown], tpr[shown], label=label)
    log.set_xlim(MIN_FPR, 1.0)
    log.set_xscale("log")
    for ax, scale in ((linear, "linear"), (log, "logarithmic")):
        _mark_points(ax, points, log=ax is log)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(f"false positive rate ({scale})")
        ax.set_ylabel("true positive rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    return fig


def plot_roc(
    fpr: ArrayLike,
    tpr: ArrayLike,
    path: str | os.PathLike[str],
    title: str = "ROC",
    auc: float | None = None,
    points: Sequence[RatePoint] = (),
) -> Path:
    """Write `roc_figure` to `path`."""
    return _save_atomic(roc_figure(fpr, tpr, title, auc, points), path)


def det_figure(
    fpr: ArrayLike, tpr: ArrayLike, title: str = "DET", points: Sequence[RatePoint] = ()
) -> Figure:
    """Detection error trade-off: false non-match rate (1 - TPR) against false match rate, both
    on logarithmic axes from 1e-4 to 1 (lower left is better); `points` are marked."""
    fmr = np.asarray(fpr, dtype=np.float64)
    fnmr = 1.0 - np.asarray(tpr, dtype=np.float64)
    shown = (fmr > 0) & (fnmr > 0)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(fmr[shown], fnmr[shown], label="DET")
    _mark_points(ax, points, det=True, log=True)
    ax.set_xlim(MIN_FPR, 1.0)
    ax.set_ylim(MIN_FPR, 1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_det(
    fpr: ArrayLike,
    tpr: ArrayLike,
    path: str | os.PathLike[str],
    title: str = "DET",
    points: Sequence[RatePoint] = (),
) -> Path:
    """Write `det_figure` to `path`."""
    return _save_atomic(det_figure(fpr, tpr, title, points), path)


def score_histogram_figure(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float | None = None,
    title: str = "Score distributions",
    bins: int = 50,
    marks: Sequence[ThresholdMark] = (),
) -> Figure:
    """Overlaid genuine/impostor score histograms: how well, and where, the classes separate;
    `threshold` (dashed) and each operating point of `marks` (a labelled vertical line) show
    where decisions fall."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in shape: {s.shape} != {y.shape}")
    fig = _new_figure()
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(s, bins=bins)
    ax.hist(s[y], bins=edges, density=True, alpha=0.55, label=f"same ({int(y.sum())})")
    ax.hist(s[~y], bins=edges, density=True, alpha=0.55, label=f"different ({int((~y).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    colours = ("tab:red", "tab:purple", "tab:brown", "tab:olive")
    for (label, value), colour in zip(marks, itertools.cycle(colours), strict=False):
        ax.axvline(
            value, color=colour, label=f"{label}: {value:.4f}", gid=f"operating point {label}"
        )
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_score_histogram(
    scores: ArrayLike,
    labels: ArrayLike,
    path: str | os.PathLike[str],
    threshold: float | None = None,
    title: str = "Score distributions",
    bins: int = 50,
    marks: Sequence[ThresholdMark] = (),
) -> Path:
    """Write `score_histogram_figure` to `path`."""
    return _save_atomic(score_histogram_figure(scores, labels, threshold, title, bins, marks), path)


def rates_at(
    scores: ArrayLike, labels: ArrayLike, marks: Sequence[ThresholdMark]
) -> list[RatePoint]:
    """Where each threshold of `marks` falls on these trials: (label, FAR, TAR), a pair being
    accepted when its score is at least the threshold."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    return [
        (label, float(np.mean(s[~y] >= value)), float(np.mean(s[y] >= value)))
        for label, value in marks
    ]


def plot_curve(
    xs: ArrayLike,
    ys_by_name: Mapping[str, ArrayLike],
    path: str | os.PathLike[str],
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
) -> Path:
    """One line per named series over shared x values (learning curves, DIR vs FAR, ...)."""
    x = np.asarray(xs, dtype=np.float64)
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, ys in ys_by_name.items():
        y = np.asarray(ys, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"series {name!r} has shape {y.shape}, xs has {x.shape}")
        ax.plot(x, y, label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ys_by_name:
        ax.legend()
    return _save_atomic(fig, path)
