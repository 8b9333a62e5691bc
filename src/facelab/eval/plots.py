"""Figures for evaluation results, written atomically.

matplotlib is imported inside each function so that ``facelab.eval`` stays importable (and
fast) without it. Figures are drawn with the Agg canvas directly, never through pyplot, so no
global backend state is touched and plotting is safe in servers and worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from facelab.fileio import atomic_write

if TYPE_CHECKING:
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


def plot_roc(
    fpr: ArrayLike,
    tpr: ArrayLike,
    path: str | os.PathLike[str],
    title: str = "ROC",
    auc: float | None = None,
    log_x: bool = False,
) -> Path:
    """ROC curve (TPR vs FPR); ``log_x`` shows the low-FPR region where face systems operate."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    fig = _new_figure()
    ax = fig.add_subplot()
    label = "ROC" if auc is None else f"ROC (AUC = {auc:.4f})"
    if log_x:
        shown = fpr > 0
        ax.plot(fpr[shown], tpr[shown], label=label)
        ax.set_xscale("log")
        if shown.any():
            ax.set_xlim(fpr[shown].min(), 1.0)
    else:
        ax.plot(fpr, tpr, label=label)
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save_atomic(fig, path)


def plot_score_histogram(
    scores: ArrayLike,
    labels: ArrayLike,
    path: str | os.PathLike[str],
    threshold: float | None = None,
    title: str = "Score distributions",
    bins: int = 50,
) -> Path:
    """Overlaid genuine/impostor score histograms: how well, and where, the classes separate."""
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
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return _save_atomic(fig, path)


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
