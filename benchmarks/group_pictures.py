"""Recall of each face detector on group pictures composed of real LFW faces, by face size.

Each picture is a 640x480 canvas (the top-left 60x60 corner of an LFW photo, enlarged, blurred
and darkened, as background: a natural scene without a face) with up to 12 LFW faces pasted at
random, non-overlapping places. A face is the central 160x160 region of an LFW image (the face
fills about its central 110x110, where LFW's deep-funneled alignment puts it), scaled so that
face region is S pixels, S in 20, 40, 80, 160. A face counts as found when a detection's
centre lies inside its S x S box and the detection's width is within 0.5x to 2x of S.
Pictures and their ground truth go to runs/group_pictures/ (derived data, gitignored).

    python benchmarks/group_pictures.py [--pictures 10] [--detectors mtcnn blazeface ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from facelab.data.images import read_image
from facelab.fileio import atomic_write_text
from facelab.models.registry import DETECTORS

SHARED = Path(__file__).resolve().parents[2] / "shared"
CANVAS = (480, 640)  # height, width
TILE, FACE = 160, 110  # the pasted LFW region and the face inside it, in LFW pixels
SIZES = (20, 40, 80, 160)
FACES_PER_PICTURE = 12


def compose(
    rng: np.random.Generator, files: list[Path], size: int
) -> tuple[np.ndarray, list[list[float]]]:
    """One picture with faces of `size` pixels; returns it and the faces' x1, y1, x2, y2."""
    corner = read_image(files[rng.integers(len(files))])[:60, :60]  # LFW background, no face
    background = Image.fromarray(corner)
    background = background.resize(CANVAS[::-1], Image.BILINEAR).filter(ImageFilter.GaussianBlur(8))
    canvas = (np.asarray(background) * 0.6).astype(np.uint8)
    tile = round(size * TILE / FACE)
    boxes: list[list[float]] = []
    taken: list[tuple[int, int]] = []
    for _ in range(200):  # random places, without overlapping tiles
        if len(boxes) == FACES_PER_PICTURE:
            break
        x = int(rng.integers(0, CANVAS[1] - tile + 1))
        y = int(rng.integers(0, CANVAS[0] - tile + 1))
        if any(abs(x - a) < tile and abs(y - b) < tile for a, b in taken):
            continue
        image = read_image(files[rng.integers(len(files))])
        h, w = image.shape[:2]
        top, left = (h - TILE) // 2, (w - TILE) // 2
        crop = Image.fromarray(image[top : top + TILE, left : left + TILE])
        canvas[y : y + tile, x : x + tile] = np.asarray(crop.resize((tile, tile), Image.BILINEAR))
        offset = (tile - size) / 2
        boxes.append([x + offset, y + offset, x + offset + size, y + offset + size])
        taken.append((x, y))
    return canvas, boxes


def found(truth: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """Per true box: some detection centred inside it, with a width 0.5x to 2x its own."""
    if len(detected) == 0:
        return np.zeros(len(truth), bool)
    centre = (detected[:, :2] + detected[:, 2:]) / 2
    width = detected[:, 2] - detected[:, 0]
    inside = (
        (centre[None, :, 0] >= truth[:, None, 0])
        & (centre[None, :, 0] <= truth[:, None, 2])
        & (centre[None, :, 1] >= truth[:, None, 1])
        & (centre[None, :, 1] <= truth[:, None, 3])
    )
    size = (truth[:, 2] - truth[:, 0])[:, None]
    scale_ok = (width[None] >= 0.5 * size) & (width[None] <= 2 * size)
    return (inside & scale_ok).any(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lfw", default=str(SHARED / "data/lfw/images"))
    parser.add_argument("--pictures", type=int, default=10, help="pictures per face size")
    parser.add_argument(
        "--detectors", nargs="+", default=["mtcnn", "mtcnn_min20", "blazeface", "blazeface_full"]
    )
    parser.add_argument("--out", default="runs/group_pictures")
    args = parser.parse_args()
    files = sorted(Path(args.lfw).glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for size in SIZES:
        pictures[size] = []
        for k in range(args.pictures):
            canvas, boxes = compose(rng, files, size)
            Image.fromarray(canvas).save(out / f"faces{size}_{k:02d}.png")
            pictures[size].append((canvas, np.array(boxes, np.float32)))
    detectors = {
        name: DETECTORS.create("mtcnn", min_face_size=20)
        if name == "mtcnn_min20"
        else DETECTORS.create(name)
        for name in args.detectors
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, detector in detectors.items():
        results[name] = {}
        for size, batch in pictures.items():
            tick = time.perf_counter()
            detections = detector.detect([canvas for canvas, _ in batch])
            seconds = time.perf_counter() - tick
            hits = [found(truth, d.boxes) for (_, truth), d in zip(batch, detections, strict=True)]
            n_true = sum(len(h) for h in hits)
            n_hit = sum(int(h.sum()) for h in hits)
            n_det = sum(len(d) for d in detections)
            results[name][str(size)] = {
                "faces": n_true,
                "found": n_hit,
                "recall": n_hit / n_true,
                "detections": n_det,
                "ms_per_picture": 1000 * seconds / len(batch),
            }
    atomic_write_text(out / "recall.json", json.dumps(results, indent=2) + "\n")
    print(f"\nrecall on {args.pictures} composed 640x480 pictures per face size (found / faces)")
    print("| detector | " + " | ".join(f"{s} px" for s in SIZES) + " | detections (all sizes) |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for name, by_size in results.items():
        cells = [f"{100 * r['recall']:.1f}% ({r['found']}/{r['faces']})" for r in by_size.values()]
        total = sum(r["detections"] for r in by_size.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {total} |")


if __name__ == "__main__":
    main()
