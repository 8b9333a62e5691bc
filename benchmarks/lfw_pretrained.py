"""LFW verification of the imported dlib ResNet: facelab's pipeline beside dlib's own, one run.

facelab: a face detector (MTCNN, native port, and/or BlazeFace: `--detectors`) -> five-point
alignment to the model's stored template (or dlib's chip) -> native dlib ResNet, cosine
similarity. dlib: HOG detector -> 5-point shape model -> dlib's
ResNet descriptor, Euclidean distance (dlib's own metric; score = -distance). Both see the same
images, decoded once. Prints accuracy (10-fold mean ± std on View 2), AUC, EER, TPR@FPR=1e-3,
per-face CPU time of each stage, and the cosine agreement of the two descriptors per face.

    python benchmarks/lfw_pretrained.py [--pairs ../shared/data/lfw/pairs.txt] [--limit 600]
        [--out runs/lfw_pretrained] [--detectors mtcnn blazeface] [--skip-dlib] [--threads 2]

`--limit N` keeps N pairs spread over the list (a quick look; View 2 needs all 6,000).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import dlib_resnet
from dlib_reference import DlibPipeline

from facelab.data.images import read_image
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import verification_report
from facelab.fileio import atomic_write_text
from facelab.pipeline import embed_images

SHARED = Path(__file__).resolve().parents[2] / "shared"


def trial_index(trials: list[Trial]) -> tuple[list[Path], dict[Path, int]]:
    """The distinct images of the trials (sorted) and each one's row in that list."""
    unique = sorted({p for t in trials for p in (t.a, t.b)})
    return unique, {p: i for i, p in enumerate(unique)}


def pair_scores(
    emb: np.ndarray, index: dict[Path, int], trials: list[Trial], metric: str
) -> np.ndarray:
    """Each trial's score from the rows of its two images: cosine (rows L2-normalised) or
    minus the Euclidean distance."""
    a = emb[[index[t.a] for t in trials]]
    b = emb[[index[t.b] for t in trials]]
    if metric == "cosine":
        return np.einsum("ij,ij->i", a, b)
    return -np.linalg.norm(a - b, axis=1)


def summary(name: str, report: dict, ms: dict[str, float]) -> dict:
    return {
        "pipeline": name,
        "accuracy": report.get("kfold_mean", report["best_accuracy"]),
        "accuracy_std": report.get("kfold_std"),
        "auc": report["auc"],
        "eer": report["eer"],
        "tpr_at_fpr_1e-3": report["tpr_at_fpr_0.001"],
        "ms_per_face": ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairs.txt"))
    parser.add_argument("--limit", type=int, help="N pairs evenly spread over the list")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="runs/lfw_pretrained")
    parser.add_argument(
        "--alignment",
        nargs="+",
        choices=("registered", "dlib_chip"),
        default=["registered"],
        help="dlib_resnet's registered preprocessing, or dlib's own chip from the ported "
        "5-point shape model",
    )
    parser.add_argument(
        "--detectors", nargs="+", default=["mtcnn"], help="registered face detectors to compare"
    )
    parser.add_argument("--skip-dlib", action="store_true", help="leave out dlib's own pipeline")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a machine shared with others)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    trials = read_trials(args.pairs)
    if args.limit:
        trials = trials[:: max(1, len(trials) // args.limit)][: args.limit]
    unique, index = trial_index(trials)
    images = [read_image(p) for p in unique]
    labels = np.array([t.label for t in trials])
    folds = np.array([t.fold for t in trials]) if trials[0].fold is not None else None
    n = len(images)

    runs = []
    for detector in args.detectors:
        for alignment in args.alignment:
            model = dlib_resnet(alignment)
            ours = embed_images(
                model.for_inference(), images, batch_size=args.batch_size, detector=detector
            )
            ms = {k: 1000 * v / n for k, v in ours.seconds.items() if k != "read"}
            ms["total"] = sum(ms.values())
            runs.append((f"{detector} + {model.preprocess.alignment}", ours, ms))

    rows = [
        summary(
            f"facelab ({label} + dlib_resnet port)",
            verification_report(
                pair_scores(ours.embeddings, index, trials, "cosine"), labels, folds
            ),
            ms,
        )
        for label, ours, ms in runs
    ]
    result = {
        "pairs": len(trials),
        "images": n,
        "pairs_file": args.pairs,
        "no_face_fallbacks": {f"facelab {a}": o.route_counts() for a, o, _ in runs},
        "rows": rows,
        "threads": torch.get_num_threads(),
    }
    speed_ref = runs[0][2]
    found = np.zeros(0, bool)
    if not args.skip_dlib:
        dlib = DlibPipeline()
        tick = time.perf_counter()
        ref = np.stack([dlib(img) for img in images])
        dlib_total = time.perf_counter() - tick
        speed_ref = {k: 1000 * v / n for k, v in dlib.seconds.items()}
        speed_ref["total"] = 1000 * dlib_total / n
        rows.append(
            summary(
                "dlib (HOG + shape model + ResNet)",
                verification_report(pair_scores(ref, index, trials, "euclidean"), labels, folds),
                speed_ref,
            )
        )
        ref_unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        found = np.array(dlib.found)
        result["no_face_fallbacks"]["dlib"] = dlib.fallbacks
        result["descriptor_cosine_facelab_vs_dlib"] = {
            a: {
                "mean": float(c.mean()),
                "median": float(np.median(c)),
                "min": float(c.min()),
                "mean_where_dlib_found_a_face": float(c[found].mean()),
            }
            for a, c in ((a, np.einsum("ij,ij->i", o.embeddings, ref_unit)) for a, o, _ in runs)
        }
    atomic_write_text(Path(args.out) / "lfw_pretrained.json", json.dumps(result, indent=2) + "\n")

    print(
        f"\nLFW {Path(args.pairs).name}: {len(trials)} pairs, {n} images, "
        f"{torch.get_num_threads()} threads"
    )
    reference = "first row" if args.skip_dlib else "dlib"
    print(
        "| pipeline | accuracy | AUC | EER | TPR@FPR=1e-3 | detect ms | align/landmarks ms "
        f"| embed ms | total ms/face | {reference} time / this |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms_per_face"]
        std = f" ± {100 * r['accuracy_std']:.2f}" if r["accuracy_std"] is not None else ""
        second = ms.get("align", ms.get("landmarks"))
        embed_ms = ms.get("embed", ms.get("descriptor"))
        print(
            f"| {r['pipeline']} | {100 * r['accuracy']:.2f}%{std} | {r['auc']:.4f} "
            f"| {100 * r['eer']:.2f}% | {r['tpr_at_fpr_1e-3']:.3f} | {ms['detect']:.1f} "
            f"| {second:.1f} | {embed_ms:.1f} | {ms['total']:.1f} "
            f"| {speed_ref['total'] / ms['total']:.2f}x |"
        )
    print("facelab routes; dlib: no face found (centre fallback):", result["no_face_fallbacks"])
    for a, c in result.get("descriptor_cosine_facelab_vs_dlib", {}).items():
        print(
            f"descriptor cosine facelab ({a}) vs dlib, same image: mean {c['mean']:.4f}, "
            f"median {c['median']:.4f}, min {c['min']:.4f}; mean over the "
            f"{int(found.sum())} images where dlib's HOG found a face "
            f"{c['mean_where_dlib_found_a_face']:.4f}"
        )


if __name__ == "__main__":
    main()
