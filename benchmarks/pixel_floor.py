"""The pixel floor: LFW verification by the cosine of raw grey pixels, no learning at all.

Every image is centre-cropped (`--crops`: fraction of the 250-pixel side kept; 1.0 is the whole
frame), resized to `--size` squared, turned grey (ITU-R 601 luma) and flattened; a pair's score
is the cosine of the two vectors. "flip-sum" adds the mirrored image's vector first, as the
learnt models may do at test time. A trained model that does not beat these numbers has learnt
nothing about identity.

    python benchmarks/pixel_floor.py [--pairs ../shared/data/lfw/pairsDevTest.txt]
        [--size 32] [--crops 1.0 0.6 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from lfw_pretrained import pair_scores, trial_index

from facelab.data.images import read_image
from facelab.data.trials import read_trials
from facelab.eval.metrics import verification_report
from facelab.fileio import atomic_write_text
from facelab.models.preprocess import Preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def grey_pixels(images: list[np.ndarray], size: int, crop: float, flip: bool) -> np.ndarray:
    """(N, size * size) L2-normalised grey pixel vectors (flip: plus the mirrored image's)."""
    spec = Preprocess(size=size, crop=crop)
    grey = np.stack([spec.crop_face(img).astype(np.float32) @ LUMA for img in images])
    if flip:
        grey = grey + grey[:, :, ::-1]
    vectors = grey.reshape(len(images), -1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairsDevTest.txt"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--crops", type=float, nargs="+", default=[1.0, 0.6, 0.5])
    parser.add_argument("--out", default="runs/pixel_floor")
    args = parser.parse_args()
    torch.set_num_threads(2)

    trials = read_trials(args.pairs)
    unique, index = trial_index(trials)
    labels = np.array([t.label for t in trials])
    images = [read_image(p) for p in unique]

    rows = []
    for crop in args.crops:
        for flip in (False, True):
            tick = time.perf_counter()
            vectors = grey_pixels(images, args.size, crop, flip)
            seconds = time.perf_counter() - tick
            report = verification_report(pair_scores(vectors, index, trials, "cosine"), labels)
            rows.append(
                {
                    "method": f"{args.size}x{args.size} grey pixels, crop {crop:g}"
                    + (", flip-sum" if flip else ""),
                    "auc": report["auc"],
                    "eer": report["eer"],
                    "tpr_at_fpr_0.01": report["tpr_at_fpr_0.01"],
                    "embeddings_per_s": len(images) / seconds,
                }
            )
    result = {"pairs_file": args.pairs, "pairs": len(trials), "images": len(images), "rows": rows}
    atomic_write_text(Path(args.out) / "pixel_floor.json", json.dumps(result, indent=2) + "\n")

    print(f"\nPixel floor on {Path(args.pairs).name}: {len(trials)} pairs, {len(images)} images")
    print("| method | AUC | EER | TPR@FPR=1e-2 | embeddings/s (decoded images) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['auc']:.4f} | {100 * r['eer']:.2f}% "
            f"| {r['tpr_at_fpr_0.01']:.3f} | {r['embeddings_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
