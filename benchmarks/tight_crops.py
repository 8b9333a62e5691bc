"""Tight face crops of LFW pairsDevTest: facelab beside dlib's own pipeline, variant by variant.

Users bring faces already cut out (thumbnails, data-set crops, other detectors' output), grey,
dark or lit from one side. This builds such variants from real faces and scores the same
1,000 pairs on each:

- the crop box: facelab's MTCNN box of the main face on the original 250x250 image, made
  square on its longer side (about forehead to chin) and grown by `--margin` (default 0.1 of
  the side, half on each side); where MTCNN finds no face the central 100x100 region (where
  LFW's deep funneling puts faces) stands in. Boxes are cached in runs/tight_crops/boxes.json;
- variants (PNG files under runs/tight_crops/<variant>/, never in git): `tight112`, `tight64`,
  `tight32` (the crop resized with Lanczos), `grey112` (luma only), `dark112` (gamma 2.5:
  v' = 255 (v/255)^2.5), `sidelit112` (grey, then multiplied by a horizontal ramp from 0.15 at
  one edge to 1 at the other, the lit side alternating from image to image, a stand-in for
  lighting from one side), `close112` and `close_sidelit112` (cut 1.25x closer about the
  box centre: brow to chin, cheeks cut, the way data sets such as cropped Yale B frame faces)
  and the uncropped images (`uncropped`).

Pipelines: facelab (`load_model(--model)`, default pipeline: MTCNN and its fallbacks, see
docs/inputs.md), cosine; dlib (benchmarks/dlib_reference.py: HOG detector with one upsampling,
as face_recognition's default, the largest face, else the whole frame handed to the 5-point
shape model as dlib users do with crops; ResNet descriptor), minus the Euclidean distance.
Metrics from facelab.eval.metrics: AUC, EER, TPR at FPR 1e-3 (500 impostor pairs: the
threshold sits at the highest impostor score or so). dlib descriptors are cached per variant
in runs/tight_crops/<variant>/dlib.npz; facelab's are recomputed. dlib (HOG with upsampling,
ResNet one face at a time) costs several times facelab's time, so by default it runs on 300
of the 1,000 pairs (spread over the list): each variant gets facelab's and dlib's rows on
those 300 (`--dlib-pairs`), and the `--all-pairs` variants (default: uncropped, tight112)
facelab's row on all 1,000 too.

    python benchmarks/tight_crops.py [--variants uncropped tight112 ...] [--dlib-pairs 300]
        [--model dlib_resnet] [--detector blazeface] [--pipelines facelab]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dlib_reference import DlibPipeline
from lfw_pretrained import pair_scores, trial_index
from PIL import Image

from facelab import load_model
from facelab.data.images import read_image
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import verification_report
from facelab.fileio import atomic_write_text
from facelab.models.detectors.mtcnn import main_face
from facelab.models.registry import DETECTORS
from facelab.pipeline import embed_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
LFW_CENTRE_BOX = (75.0, 75.0, 175.0, 175.0)  # where deep-funneled LFW faces sit
RAMP_DARK_SIDE = 0.15  # light left on the unlit side of `sidelit` images


@dataclass(frozen=True)
class Variant:
    """How a tight crop is made from an LFW image and its face box."""

    size: int
    grey: bool = False
    gamma: float = 1.0
    side_light: bool = False
    zoom: float = 1.0  # >1 cuts closer than the crop box, about its centre


VARIANTS: dict[str, Variant | None] = {
    "uncropped": None,
    "tight112": Variant(112),
    "tight32": Variant(32),
    "close_sidelit112": Variant(112, grey=True, side_light=True, zoom=1.25),
    "tight64": Variant(64),
    "sidelit112": Variant(112, grey=True, side_light=True),
    "dark112": Variant(112, gamma=2.5),
    "grey112": Variant(112, grey=True),
    "close112": Variant(112, zoom=1.25),
}


def crop_boxes(paths: list[Path], cache: Path, margin: float) -> list[tuple[float, ...]]:
    """Square crop box per image: the MTCNN face box's longer side, grown by `margin`."""
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["margin"] == margin and stored["paths"] == [str(p) for p in paths]:
            return [tuple(b) for b in stored["boxes"]]
    detector = DETECTORS.create("mtcnn")
    boxes = []
    for start in range(0, len(paths), 32):
        images = [read_image(p) for p in paths[start : start + 32]]
        for image, det in zip(images, detector.detect(images), strict=True):
            index = main_face(det, image.shape)
            x1, y1, x2, y2 = LFW_CENTRE_BOX if index is None else det.boxes[index]
            side = max(x2 - x1, y2 - y1) * (1 + margin)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    payload = {"margin": margin, "paths": [str(p) for p in paths], "boxes": boxes}
    atomic_write_text(cache, json.dumps(payload, default=float) + "\n")
    return boxes


def make_variant(image: np.ndarray, box: tuple[float, ...], v: Variant, index: int) -> Image.Image:
    """The crop of `image` (RGB uint8) in `box`, resized and relit as `v` says."""
    x1, y1, x2, y2 = box
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / (2 * v.zoom)
    face = Image.fromarray(image).crop(
        tuple(round(c) for c in (cx - half, cy - half, cx + half, cy + half))
    )
    face = face.resize((v.size, v.size), Image.LANCZOS)
    if v.grey:
        face = face.convert("L")
    pixels = np.asarray(face, dtype=np.float64) / 255
    if v.gamma != 1.0:
        pixels = pixels**v.gamma
    if v.side_light:
        ramp = np.linspace(RAMP_DARK_SIDE, 1.0, v.size)
        ramp = ramp if index % 2 == 0 else ramp[::-1]
        pixels = pixels * (ramp[None, :, None] if pixels.ndim == 3 else ramp[None, :])
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def variant_paths(name: str, originals: list[Path], args: argparse.Namespace) -> list[Path]:
    """The variant's image files, one per original (written unless present)."""
    spec = VARIANTS[name]
    if spec is None:
        return originals
    root = Path(args.out) / name
    paths = [root / p.parent.name / f"{p.stem}.png" for p in originals]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        boxes = crop_boxes(originals, Path(args.out) / "boxes.json", args.margin)
        for i in missing:
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            partial = paths[i].with_suffix(".part")  # a reader never sees half a file
            make_variant(read_image(originals[i]), boxes[i], spec, i).save(partial, "PNG")
            partial.replace(paths[i])
    return paths


def dlib_embeddings(paths: list[Path], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """dlib's descriptors and per-image "HOG found a face" flags, cached."""
    if cache.is_file():
        with np.load(cache) as stored:
            if stored["paths"].tolist() == [str(p) for p in paths]:
                return stored["descriptors"], stored["found"]
    dlib = DlibPipeline(upsample=1, fallback_fraction=None)
    descriptors = np.stack([dlib(read_image(p)) for p in paths])
    found = np.array(dlib.found)
    np.savez(cache, paths=np.array([str(p) for p in paths]), descriptors=descriptors, found=found)
    return descriptors, found


def spread(trials: list[Trial], limit: int | None) -> list[Trial]:
    """`limit` trials spread evenly over the list (all of them without a limit)."""
    if not limit or limit >= len(trials):
        return trials
    return trials[:: max(1, len(trials) // limit)][:limit]


def row(name: str, pipeline: str, trials: list[Trial], scores: np.ndarray, note: str) -> dict:
    report = verification_report(scores, np.array([t.label for t in trials]))
    return {
        "variant": name,
        "pipeline": pipeline,
        "pairs": len(trials),
        "auc": report["auc"],
        "eer": report["eer"],
        "tpr_at_fpr_1e-3": report["tpr_at_fpr_0.001"],
        "faces": note,
    }


def counts_note(labels: list[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in Counter(labels).most_common())


def measure(name: str, trials: list[Trial], args: argparse.Namespace) -> list[dict]:
    """Rows of one variant: facelab on every pair, and facelab beside dlib on the
    `--dlib-pairs` subset (the same images for both)."""
    subset = spread(trials, args.dlib_pairs)
    if name not in args.all_pairs:
        trials = subset
    originals, index = trial_index(trials)
    paths = variant_paths(name, originals, args)
    rows = []
    if "facelab" in args.pipelines:
        tick = time.perf_counter()
        model = load_model(args.model, detector=args.detector).for_inference()
        out = embed_images(model, paths, batch_size=32, progress=False)
        seconds = time.perf_counter() - tick
        logging.info("%s facelab: %.0f s, %s", name, seconds, out.route_counts())
        for part in (trials, subset) if len(subset) < len(trials) else (trials,):
            used = sorted({index[p] for t in part for p in (t.a, t.b)})
            note = counts_note([out.routes[i] for i in used])
            scores = pair_scores(out.embeddings, index, part, "cosine")
            pipeline = f"facelab {args.model} + {args.detector or 'mtcnn'}"
            rows.append(row(name, pipeline, part, scores, note))
    if "dlib" not in args.pipelines:
        return rows
    sub_originals, sub_index = trial_index(subset)
    sub_paths = [paths[index[p]] for p in sub_originals]
    tick = time.perf_counter()
    cache_dir = Path(args.out) / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    ref, found = dlib_embeddings(sub_paths, cache_dir / "dlib.npz")
    note = f"HOG {int(found.sum())}, whole frame {int((~found).sum())}"
    scores = pair_scores(ref, sub_index, subset, "euclidean")
    rows.append(row(name, "dlib (HOG, 5-point, ResNet)", subset, scores, note))
    logging.info("%s dlib: %.0f s, %s", name, time.perf_counter() - tick, note)
    return rows


def logged(rows: list[dict]) -> list[dict]:
    """The rows, each also logged as it is measured (a long run shows its results early)."""
    for r in rows:
        logging.info("%s", json.dumps(r))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairsDevTest.txt"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--model", default="dlib_resnet", help="facelab model name or checkpoint")
    parser.add_argument(
        "--detector", default=None, help="facelab's face detector (default: the model's, MTCNN)"
    )
    parser.add_argument("--margin", type=float, default=0.1, help="crop box growth, of its side")
    parser.add_argument(
        "--dlib-pairs",
        type=int,
        default=300,
        help="pairs (spread over the list) both pipelines are compared on",
    )
    parser.add_argument(
        "--pipelines", nargs="+", choices=("facelab", "dlib"), default=["facelab", "dlib"]
    )
    parser.add_argument(
        "--all-pairs",
        nargs="*",
        default=["uncropped", "tight112"],
        help="variants facelab also scores on all pairs (the others: on the --dlib-pairs only)",
    )
    parser.add_argument("--out", default="runs/tight_crops")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("facelab.pipeline").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    trials = read_trials(args.pairs)
    rows = [r for name in args.variants for r in logged(measure(name, trials, args))]
    result = {"pairs_file": args.pairs, "margin": args.margin, "rows": rows}
    stamp = "_".join(args.pipelines + ([args.detector] if args.detector else []))
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(Path(args.out) / f"results_{stamp}.json", text)
    print(f"\n{Path(args.pairs).name}, crop margin {args.margin}")
    print("| variant | pipeline | pairs | AUC | EER | TPR@FPR=1e-3 | faces found by |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['pipeline']} | {r['pairs']} | {r['auc']:.4f} "
            f"| {100 * r['eer']:.2f}% | {r['tpr_at_fpr_1e-3']:.3f} | {r['faces']} |"
        )


if __name__ == "__main__":
    main()
