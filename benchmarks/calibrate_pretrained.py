"""Operating points of the pretrained models: thresholds for target FAR 1e-2 down to 1e-6,
calibrated on LFW View 1 and reported on View 2, plus each model's View 2 10-fold accuracy.

    OMP_NUM_THREADS=2 python benchmarks/calibrate_pretrained.py \
        [--models dlib_resnet dlib_resnet_chip] [--report-folds 10] [--limit N] [--write] \
        [--out runs/calibrate_pretrained]

The models of one run share MTCNN's detections (`ReplayDetector`): the second model embeds the
same faces without detecting again.

Calibration (View 1, `pairsDevTrain.txt`): genuine trials are its 1,100 same pairs; impostor
trials are every pair of its images showing two different people (LFW names the person of each
image). Its own 1,100 different pairs cannot measure a FAR below about 1e-3 (one false accept is
9e-4 of them); every cross-identity pair of its images gives millions. The threshold for each
target FAR is `facelab.eval.metrics.threshold_at_far` (the one gallery calibration uses).

Report (View 2, `pairs.txt`), at the thresholds fixed above: FRR on its same pairs, FAR on its
different pairs and on every cross-identity pair of its images. View 1 and View 2 draw on the
same LFW images, so every View 2 pair whose two images both appear in the calibration list is
left out of the report (counted in the output): no reported pair could have been a calibration
pair. The 10-fold accuracy, AUC and EER are View 2's standard protocol on all 6,000 pairs
(thresholds chosen on nine folds, applied to the tenth), independent of the calibration.
`--report-folds N` reports on the first N folds only (a shorter run; no LFW accuracy stored).

`--write` stores the operating points (and, from a full View 2 report, the accuracy), with the
command, date, commit and trial counts, in `src/facelab/models/model_cards.json` (the model's
registry card).
`--limit N` keeps N pairs of each list (a quick look; nothing to `--write`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from facelab.api import load_model
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import threshold_at_far, verification_report
from facelab.fileio import atomic_write_text
from facelab.models.operating_points import CARDS_FILE, SHIPPED_FARS
from facelab.models.registry import DETECTORS
from facelab.pipeline import embed_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
LFW = SHARED / "data/lfw"
BLOCK = 1024  # rows of the all-pairs similarity matrix computed at once


class ReplayDetector:
    """MTCNN whose detections are kept by image content, so the second model of a run reuses
    the first's faces (the same detector on the same images) instead of detecting again."""

    def __init__(self) -> None:
        self.detector = DETECTORS.create("mtcnn")
        self.seen: dict[str, object] = {}

    def detect(self, images: list[np.ndarray]) -> list[object]:
        keys = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
        todo = [i for i, key in enumerate(keys) if key not in self.seen]
        if todo:
            found = self.detector.detect([images[i] for i in todo])
            self.seen.update((keys[i], det) for i, det in zip(todo, found, strict=True))
        return [self.seen[key] for key in keys]


def person(path: Path) -> str:
    """LFW's layout names the person: images/<Person_Name>/<Person_Name>_NNNN.jpg."""
    return path.parent.name


def listed_scores(emb: np.ndarray, index: dict[Path, int], trials: list[Trial]) -> np.ndarray:
    a = emb[[index[t.a] for t in trials]]
    b = emb[[index[t.b] for t in trials]]
    return np.einsum("ij,ij->i", a, b)


def cross_identity_scores(emb: np.ndarray, people: np.ndarray) -> np.ndarray:
    """Cosine of every unordered pair of rows showing different people."""
    sims = emb @ emb.T
    i, j = np.triu_indices(len(emb), k=1)
    different = people[i] != people[j]
    return sims[i[different], j[different]]


def cross_identity_accepts(
    emb: np.ndarray, people: np.ndarray, left_out: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, int]:
    """(false accepts at each threshold, pairs) over every unordered pair of rows showing
    different people, except pairs whose two rows are both `left_out`; block by block, so the
    full matrix never sits in memory."""
    accepts = np.zeros(len(thresholds), dtype=np.int64)
    pairs = 0
    cols = np.arange(len(emb))
    for start in range(0, len(emb), BLOCK):
        rows = np.arange(start, min(start + BLOCK, len(emb)))
        sims = emb[rows] @ emb.T
        keep = cols[None, :] > rows[:, None]
        keep &= people[rows][:, None] != people[None, :]
        keep &= ~(left_out[rows][:, None] & left_out[None, :])
        kept = sims[keep]
        pairs += len(kept)
        accepts += (kept[:, None] >= thresholds[None, :]).sum(axis=0)
    return accepts, pairs


def limited(trials: list[Trial], limit: int | None) -> list[Trial]:
    return trials[:: max(1, len(trials) // limit)][:limit] if limit else trials


def calibrate_model(
    name: str,
    calibration: list[Trial],
    report: list[Trial],
    batch_size: int,
    detector: ReplayDetector,
) -> dict:
    """Embed both lists' images once, calibrate on the first, report on the second."""
    model = load_model(name)
    unique = sorted({p for t in calibration + report for p in (t.a, t.b)})
    index = {p: i for i, p in enumerate(unique)}
    tick = time.perf_counter()
    embedded = embed_images(model.for_inference(), unique, batch_size=batch_size, detector=detector)
    seconds = time.perf_counter() - tick
    emb = embedded.embeddings

    cal_images = sorted({p for t in calibration for p in (t.a, t.b)})
    cal_rows = np.array([index[p] for p in cal_images])
    genuine = listed_scores(emb, index, [t for t in calibration if t.label == 1])
    impostor = cross_identity_scores(emb[cal_rows], np.array([person(p) for p in cal_images]))
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    points = [threshold_at_far(scores, labels, far) for far in SHIPPED_FARS]
    thresholds = np.array([p["threshold"] for p in points])

    in_calibration = np.zeros(len(unique), dtype=bool)
    in_calibration[cal_rows] = True
    kept = [t for t in report if not (in_calibration[index[t.a]] and in_calibration[index[t.b]])]
    kept_scores = listed_scores(emb, index, kept)
    kept_labels = np.array([t.label for t in kept], dtype=bool)
    rep_images = sorted({p for t in report for p in (t.a, t.b)})
    rep_rows = np.array([index[p] for p in rep_images])
    all_accepts, all_pairs = cross_identity_accepts(
        emb[rep_rows],
        np.array([person(p) for p in rep_images]),
        in_calibration[rep_rows],
        thresholds,
    )
    for point, accepts, threshold in zip(points, all_accepts, thresholds, strict=True):
        point["report"] = {
            "frr": float(np.mean(kept_scores[kept_labels] < threshold)),
            "far_listed": float(np.mean(kept_scores[~kept_labels] >= threshold)),
            "far_all_pairs": float(accepts / all_pairs),
            "false_accepts_all_pairs": int(accepts),
        }

    full = verification_report(
        listed_scores(emb, index, report),
        np.array([t.label for t in report]),
        np.array([t.fold for t in report]) if report[0].fold is not None else None,
    )
    return {
        "model": name,
        "points": points,
        "calibration_counts": {
            "images": len(cal_images),
            "genuine_pairs": len(genuine),
            "impostor_pairs": len(impostor),
        },
        "report_counts": {
            "pairs_left_out": len(report) - len(kept),
            "genuine_pairs": int(kept_labels.sum()),
            "impostor_pairs_listed": int((~kept_labels).sum()),
            "images": len(rep_images),
            "impostor_pairs_all": all_pairs,
        },
        "view2": {
            "pairs": len(report),
            "accuracy": full.get("kfold_mean", full["best_accuracy"]),
            "accuracy_std": full.get("kfold_std"),
            "auc": full["auc"],
            "eer": full["eer"],
            "tpr_at_fpr_1e-3": full["tpr_at_fpr_0.001"],
        },
        "routes": embedded.route_counts(),
        "images_embedded": len(unique),
        "embed_seconds": round(seconds, 1),
    }


def card_entry(
    result: dict, provenance: dict, calibration: str, report: str, full_report: bool
) -> dict:
    """The model card sections this run measured, in the form `model_cards.json` keeps; the
    LFW accuracy only from a report on all of View 2."""
    cal, rep = result["calibration_counts"], result["report_counts"]
    trials = (
        f"LFW View 1 {calibration}: its {cal['genuine_pairs']:,} same pairs and all "
        f"{cal['impostor_pairs']:,} cross-identity pairs of its {cal['images']:,} images"
    )
    points = [{**p, "trials": trials} for p in result["points"]]
    entry = {
        "operating_points": {
            "calibration": {"trials": calibration, **cal},
            "report": {"trials": report, **rep},
            "points": points,
            **provenance,
        },
    }
    if full_report:
        entry["lfw_view2"] = {**result["view2"], "trials": report, **provenance}
    return entry


def git_commit() -> str:
    run = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dlib_resnet", "dlib_resnet_chip"])
    parser.add_argument("--calibration", default=str(LFW / "pairsDevTrain.txt"))
    parser.add_argument("--report", default=str(LFW / "pairs.txt"))
    parser.add_argument("--limit", type=int, help="keep N pairs of each list (quick look)")
    parser.add_argument(
        "--report-folds",
        type=int,
        default=10,
        help="report on the first N folds of the report list (all 10: View 2 in full, which "
        "alone also measures the 10-fold accuracy stored as the model's LFW figure)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="runs/calibrate_pretrained")
    parser.add_argument("--write", action="store_true", help=f"store the results in {CARDS_FILE}")
    args = parser.parse_args()
    if args.write and args.limit:
        parser.error("--write stores full-list results only; drop --limit")

    calibration = limited(read_trials(args.calibration), args.limit)
    report = [t for t in read_trials(args.report) if t.fold is None or t.fold < args.report_folds]
    report = limited(report, args.limit)
    provenance = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "command": "python " + " ".join(["benchmarks/calibrate_pretrained.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    detector = ReplayDetector()
    results = [
        calibrate_model(name, calibration, report, args.batch_size, detector)
        for name in args.models
    ]
    out = Path(args.out)
    atomic_write_text(out / "calibration.json", json.dumps(results, indent=2) + "\n")

    for r in results:
        cal, rep, v2 = r["calibration_counts"], r["report_counts"], r["view2"]
        print(
            f"\n{r['model']}: calibrated on {Path(args.calibration).name} "
            f"({cal['genuine_pairs']:,} genuine, {cal['impostor_pairs']:,} impostor pairs of "
            f"{cal['images']:,} images); reported on {Path(args.report).name} "
            f"({rep['genuine_pairs']:,} genuine, {rep['impostor_pairs_listed']:,} listed and "
            f"{rep['impostor_pairs_all']:,} cross-identity impostor pairs; "
            f"{rep['pairs_left_out']} listed pairs left out as calibration pairs)"
        )
        print(
            "| target FAR | threshold | FAR (cal) | FRR (cal) | FRR (View 2) "
            "| FAR (View 2 listed) | FAR (View 2 all pairs) |"
        )
        print("|---|---|---|---|---|---|---|")
        for p in r["points"]:
            q = p["report"]
            print(
                f"| {p['target_far']:g} | {p['threshold']:.4f} | {p['far']:.2e} | {p['frr']:.4f} "
                f"| {q['frr']:.4f} | {q['far_listed']:.2e} | {q['far_all_pairs']:.2e} |"
            )
        print(
            f"{Path(args.report).name} {args.report_folds}-fold accuracy "
            f"{100 * v2['accuracy']:.2f}% ± "
            f"{100 * (v2['accuracy_std'] or 0):.2f}, AUC {v2['auc']:.4f}, EER {v2['eer']:.4f}, "
            f"routes {r['routes']}, {r['images_embedded']} images in "
            f"{r['embed_seconds']} s"
        )

    if args.write:
        cards = json.loads(CARDS_FILE.read_text(encoding="utf-8"))
        for r in results:
            report_name = Path(args.report).name
            if args.report_folds < 10:
                report_name += f", folds 1-{args.report_folds}"
            entry = card_entry(
                r, provenance, Path(args.calibration).name, report_name, args.report_folds >= 10
            )
            cards.setdefault(r["model"], {}).update(entry)
        atomic_write_text(CARDS_FILE, json.dumps(cards, indent=2) + "\n")
        print(f"\nwrote {CARDS_FILE}")


if __name__ == "__main__":
    main()
