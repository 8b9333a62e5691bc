"""Speed and fidelity of facelab's MTCNN on LFW, against facenet-pytorch's recorded detections.

Times `MTCNN.detect` one image per call and in batches (median ms per image over calls), and,
when dlib is installed, dlib's HOG frontal-face detector on the same images in the same run
(the shared machine's load moves absolute numbers; the ratio moves less). Agreement is
measured on the reference file's images: each reference face matched to the detection with the
highest IoU.

    python benchmarks/bench_mtcnn.py --images 100 --batch 25 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from facelab.data.images import read_image
from facelab.models.detectors.mtcnn import Detections, mtcnn

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "mtcnn_facenet_pytorch.json"


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) x1, y1, x2, y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def agreement(items: list[dict], found: list[Detections]) -> dict[str, float]:
    """Face-count agreement, IoU, landmark and probability error against the reference."""
    same, ious, marks, probs = 0, [], [], []
    for item, det in zip(items, found, strict=True):
        same += len(det) == len(item["boxes"])
        if not len(det):
            ious += [0.0] * len(item["boxes"])
            continue
        overlap = iou(np.asarray(item["boxes"]), det.boxes)
        for i, j in enumerate(overlap.argmax(1)):
            ious.append(overlap[i, j])
            err = np.linalg.norm(np.asarray(item["landmarks"][i]) - det.landmarks[j], axis=1)
            marks.append(err.mean())
            probs.append(abs(item["probs"][i] - det.scores[j]))
    return {
        "images": len(items),
        "faces": len(ious),
        "same_count": same / len(items),
        "iou_mean": float(np.mean(ious)),
        "iou_min": float(np.min(ious)),
        "landmark_px_mean": float(np.mean(marks)),
        "landmark_px_max": float(np.max(marks)),
        "prob_err_max": float(np.max(probs)),
    }


def timed(
    run: Callable[[list[np.ndarray]], list], batches: list[list[np.ndarray]], repeats: int
) -> tuple[float, float, list]:
    """Median over calls of (call time / images in the call) in ms, wall clock and CPU time
    (all threads; the steadier figure on a loaded machine), and the last repeat's outputs."""
    wall, cpu = [], []
    for _ in range(repeats):
        outputs = []
        for batch in batches:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            outputs += run(batch)
            wall.append(1000 * (time.perf_counter() - tick) / len(batch))
            cpu.append(1000 * (time.process_time() - cpu_tick) / len(batch))
    return statistics.median(wall), statistics.median(cpu), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="first N reference LFW images")
    parser.add_argument("--batch", type=int, default=25, help="images per batched call")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (reference: 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference", default=str(REFERENCE))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref = json.loads(Path(args.reference).read_text())
    items = [it for it in ref["items"] if it["image"].startswith("images/")][: args.images]
    root = Path(args.reference).resolve().parents[1] / "data" / "lfw"
    images = [read_image(root / it["image"]) for it in items]
    singles = [[image] for image in images]
    batches = [images[s : s + args.batch] for s in range(0, len(images), args.batch)]

    detector = mtcnn(min_face_size=20)  # facenet-pytorch's setting, as in the reference
    detector.detect(images[: args.batch])  # warm-up: allocator, kernel selection
    runs = {
        "facelab MTCNN, batch 1": timed(detector.detect, singles, args.repeats),
        f"facelab MTCNN, batch {args.batch}": timed(detector.detect, batches, args.repeats),
    }
    try:
        import dlib
    except ImportError:
        dlib = None
    if dlib is not None:
        hog = dlib.get_frontal_face_detector()
        runs["dlib HOG (upsample 0), batch 1"] = timed(
            lambda b: list(hog(b[0], 0)), singles, args.repeats
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nMTCNN on {len(images)} LFW 250x250 images, torch threads {args.threads}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}\n"
    )
    print("| detector | median ms/image | CPU ms/image |")
    print("|---|---|---|")
    for name, (wall, cpu, _) in runs.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    recorded = ref["ms_per_image_median_lfw"]
    print(f"| facenet-pytorch MTCNN, batch 1 (recorded in the reference file) | {recorded:.1f} | |")

    print(f"\nagreement with facenet-pytorch on {len(items)} images:")
    print(
        "| run | faces | same face count | mean IoU | min IoU | landmark px mean | max "
        "| max prob err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, _, found) in list(runs.items())[:2]:
        s = agreement(items, found)
        print(
            f"| {name} | {s['faces']} | {s['same_count']:.1%} | {s['iou_mean']:.5f} "
            f"| {s['iou_min']:.4f} | {s['landmark_px_mean']:.4f} | {s['landmark_px_max']:.3f} "
            f"| {s['prob_err_max']:.1e} |"
        )


if __name__ == "__main__":
    main()
