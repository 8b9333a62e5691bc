"""Face detectors against MTCNN on LFW, and on pictures without a face, in one run.

Agreement: on LFW images (all 13,233, or `--limit N` spread evenly over the sorted list), the
share where each detector's main face (`main_face`: large and central) has IoU >= 0.5 with
MTCNN's main face, and how often each finds no face at all.
False detections on face-free pictures, two kinds:
  - LFW backgrounds: the left and right 60-pixel strips of `--strip-images` LFW images (60x250
    each, spread over the list; outside the deep-funneled face at the centre; a bystander's
    face can appear there, so a detection MTCNN also makes is counted apart);
  - synthetic textures, 256x256: uniform noise, Gaussian-blurred noise (sigma 2, 6), stripes,
    checkerboards and colour gradients (fixed seed).

    python benchmarks/detection_quality.py [--limit 2000] [--detectors blazeface ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from facelab.data.images import read_image
from facelab.fileio import atomic_write_text
from facelab.models.detectors.blazeface import iou_with
from facelab.models.detectors.mtcnn import main_face
from facelab.models.registry import DETECTORS

SHARED = Path(__file__).resolve().parents[2] / "shared"
BATCH = 32


def main_boxes(detector: object, images: list[np.ndarray]) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        for image, d in zip(chunk, detector.detect(chunk), strict=True):
            k = main_face(d, image.shape)
            out.append(None if k is None else d.boxes[k])
    return out


def counts(detector: object, images: list[np.ndarray]) -> np.ndarray:
    found = []
    for start in range(0, len(images), BATCH):
        found += [len(d) for d in detector.detect(images[start : start + BATCH])]
    return np.array(found)


def textures(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Face-free synthetic pictures, 256x256 RGB, six kinds in turn."""
    out = []
    ys, xs = np.mgrid[0:256, 0:256]
    for k in range(n):
        kind = k % 6
        if kind == 0:
            image = rng.integers(0, 256, (256, 256, 3))
        elif kind in (1, 2):
            noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
            image = np.asarray(noise.filter(ImageFilter.GaussianBlur(2 if kind == 1 else 6)))
            image = (image - image.mean()) * 4 + 128
        elif kind == 3:
            period = rng.integers(4, 40)
            angle = rng.uniform(0, np.pi)
            wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
            image = (wave[..., None] * rng.uniform(40, 127, 3) + 128) * np.ones(3)
        elif kind == 4:
            cell = rng.integers(4, 64)
            board = ((xs // cell + ys // cell) % 2)[..., None]
            image = board * rng.integers(0, 256, 3) + (1 - board) * rng.integers(0, 256, 3)
        else:
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = (xs / 255.0)[..., None]
            image = a * (1 - t) + b * t
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lfw", default=str(SHARED / "data/lfw/images"))
    parser.add_argument("--limit", type=int, help="N LFW images spread over the sorted list")
    parser.add_argument(
        "--strip-images", type=int, default=2000, help="LFW images to take strips of"
    )
    parser.add_argument("--textures", type=int, default=600)
    parser.add_argument("--detectors", nargs="+", default=["blazeface", "blazeface_full"])
    parser.add_argument("--out", default="runs/detection_quality")
    args = parser.parse_args()
    files = sorted(Path(args.lfw).glob("*/*.jpg"))
    if args.limit:
        files = files[:: max(1, len(files) // args.limit)][: args.limit]
    images = [read_image(p) for p in files]
    detectors = {name: DETECTORS.create(name) for name in ["mtcnn", *args.detectors]}
    mains = {name: main_boxes(d, images) for name, d in detectors.items()}
    reference = mains["mtcnn"]
    agreement = {}
    for name, boxes in mains.items():
        both = [
            (a, b) for a, b in zip(boxes, reference, strict=True) if a is not None and b is not None
        ]
        agree = int(sum(iou_with(a, b[None])[0] >= 0.5 for a, b in both))
        agreement[name] = {
            "images": len(images),
            "no_face": sum(b is None for b in boxes),
            "main_face_iou_0.5_with_mtcnn": agree,
            "share_of_all_images": agree / len(images),
            "share_where_both_found_a_face": agree / max(1, len(both)),
        }

    every = max(1, len(images) // args.strip_images)
    strips = [s for im in images[::every][: args.strip_images] for s in (im[:, :60], im[:, -60:])]
    synthetic = textures(args.textures, np.random.default_rng(0))
    found = {name: (counts(d, strips), counts(d, synthetic)) for name, d in detectors.items()}
    false = {
        name: {
            "lfw_strips": len(strips),
            "strips_with_a_detection": int((s > 0).sum()),
            "strips_where_mtcnn_also_detects": int(((s > 0) & (found["mtcnn"][0] > 0)).sum()),
            "detections_in_strips": int(s.sum()),
            "textures": len(synthetic),
            "textures_with_a_detection": int((t > 0).sum()),
            "detections_in_textures": int(t.sum()),
        }
        for name, (s, t) in found.items()
    }
    atomic_write_text(
        Path(args.out) / "detection_quality.json",
        json.dumps({"agreement": agreement, "false_detections": false}, indent=2) + "\n",
    )
    print(f"\nmain face on {len(images)} LFW images, against MTCNN's (IoU >= 0.5)")
    print("| detector | agrees with MTCNN | of images where both find a face | no face |")
    print("|---|---|---|---|")
    for name, a in agreement.items():
        print(
            f"| {name} | {a['main_face_iou_0.5_with_mtcnn']} "
            f"({100 * a['share_of_all_images']:.2f}%) "
            f"| {100 * a['share_where_both_found_a_face']:.2f}% | {a['no_face']} |"
        )
    print(
        f"\nface-free pictures: {len(strips)} LFW side strips (60x250), "
        f"{len(synthetic)} synthetic textures (256x256)"
    )
    print(
        "| detector | strips with a detection | of which MTCNN also detects | detections "
        "| textures with a detection | detections |"
    )
    print("|---|---|---|---|---|---|")
    for name, f in false.items():
        print(
            f"| {name} | {f['strips_with_a_detection']} | {f['strips_where_mtcnn_also_detects']} "
            f"| {f['detections_in_strips']} | {f['textures_with_a_detection']} "
            f"| {f['detections_in_textures']} |"
        )


if __name__ == "__main__":
    main()
