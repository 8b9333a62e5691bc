"""A training run's learning curve: verification AUC (and TPR at FPR 1e-2) per epoch, as a PNG
beside the run's metrics.csv, which the trainer writes after every epoch.

    python benchmarks/plot_learning_curve.py runs/lfw_scratch_cpu [--floor 0.6975]

`--floor` draws a horizontal line at that AUC (e.g. the pixel floor of benchmarks/pixel_floor.py),
so a reader sees how far above it the run climbs. Prints the curve as a table too.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from facelab.eval.plots import plot_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder holding metrics.csv")
    parser.add_argument("--floor", type=float, help="draw this AUC as a reference line")
    parser.add_argument("--out", help="PNG path (default: RUN/learning_curve.png)")
    args = parser.parse_args()

    run = Path(args.run)
    with (run / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val_auc")]
    if not rows:
        raise SystemExit(f"{run}/metrics.csv has no epoch with val_auc")
    epochs = [int(r["epoch"]) for r in rows]
    series = {
        "val AUC": [float(r["val_auc"]) for r in rows],
        "val TPR @ FPR=1e-2": [float(r["val_tpr_at_fpr_0.01"]) for r in rows],
    }
    if args.floor is not None:
        series["pixel floor AUC"] = [args.floor] * len(rows)
    out = Path(args.out) if args.out else run / "learning_curve.png"
    plot_curve(epochs, series, out, "epoch", "value", f"{run.name}: verification per epoch")

    print("| epoch | train loss | images/s | val AUC | val EER | val TPR@FPR=1e-2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['epoch']} | {float(r.get('train_loss') or 'nan'):.4f} "
            f"| {r.get('images_per_s', '')} | {float(r['val_auc']):.4f} "
            f"| {100 * float(r['val_eer']):.2f}% | {float(r['val_tpr_at_fpr_0.01']):.3f} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
