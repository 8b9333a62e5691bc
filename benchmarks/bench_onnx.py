"""ONNX export of the pretrained dlib ResNet: parity with PyTorch and speed, on real LFW faces.

Faces of LFW pairsDevTest (View 1 test pairs) are detected with MTCNN and aligned once; then
the same aligned faces go through PyTorch eager, onnxruntime (float) and onnxruntime with
dynamic int8 weights. Prints, in one run on this machine's CPU:

- parity: max |difference| of the L2-normalised embeddings and min/mean cosine to PyTorch;
- speed: embeddings/s of each runtime on the same batches (alternating rounds, best round);
- accuracy: pairsDevTest AUC and best accuracy of each runtime (the int8 change).

    python benchmarks/bench_onnx.py [--limit 1000] [--threads 2] [--rounds 3] [--out runs/onnx]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lfw_pretrained import pair_scores, trial_index

from facelab import load_model
from facelab.data.images import read_image
from facelab.data.trials import read_trials
from facelab.eval.metrics import verification_report
from facelab.fileio import atomic_write_text
from facelab.models.export import export_onnx, load_onnx
from facelab.models.face_model import FaceModel
from facelab.models.registry import DETECTORS
from facelab.pipeline import alignment_points, main_face_landmarks

SHARED = Path(__file__).resolve().parents[2] / "shared"
log = logging.getLogger("bench_onnx")


def aligned_inputs(model: FaceModel, paths: list[Path], batch: int = 32) -> torch.Tensor:
    """Network inputs of the main face of each image (centre crop where none is found)."""
    spec = model.preprocess
    detector = DETECTORS.create("mtcnn")
    inputs = []
    for start in range(0, len(paths), batch):
        images = [read_image(p) for p in paths[start : start + batch]]
        for image, det in zip(images, detector.detect(images), strict=True):
            marks = alignment_points(spec, image, main_face_landmarks(det, image.shape))
            inputs.append(spec.to_tensor(image, marks))
        log.info("aligned %d / %d faces", len(inputs), len(paths))
    return torch.stack(inputs)


def throughput(model: FaceModel, x: torch.Tensor, batch: int) -> float:
    """Embeddings per second over `x`, in batches."""
    tick = time.perf_counter()
    model.embed_tensors(x, batch_size=batch)
    return len(x) / (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairsDevTest.txt"))
    parser.add_argument("--limit", type=int, help="N pairs evenly spread over the list")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--speed-faces", type=int, default=256, help="faces per speed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/onnx")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    trials = read_trials(args.pairs)
    if args.limit:
        trials = trials[:: max(1, len(trials) // args.limit)][: args.limit]
    unique, index = trial_index(trials)
    labels = np.array([t.label for t in trials])

    torch_model = load_model("dlib_resnet")
    x = aligned_inputs(torch_model, unique)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="facelab-onnx-") as tmp:
        runtimes: dict[str, FaceModel] = {"pytorch eager": torch_model}
        sizes = {"pytorch eager": None}
        for name, quantization in (("onnxruntime", "none"), ("onnxruntime int8", "int8")):
            report = export_onnx(
                torch_model, Path(tmp) / f"{quantization}.onnx", quantization=quantization
            )
            runtimes[name] = load_onnx(report.path, threads=args.threads)
            sizes[name] = report.bytes

        embeddings = {
            name: m.embed_tensors(x, batch_size=args.batch) for name, m in runtimes.items()
        }
        speed_x = x[: args.speed_faces]
        speeds: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.rounds):  # alternate, so that load from elsewhere hits all alike
            for name, m in runtimes.items():
                speeds[name].append(throughput(m, speed_x, args.batch))

    reference = embeddings["pytorch eager"]
    rows = []
    for name, emb in embeddings.items():
        cosine = np.einsum("ij,ij->i", emb, reference)
        report = verification_report(pair_scores(emb, index, trials, "cosine"), labels)
        rows.append(
            {
                "runtime": name,
                "file_mb": None if sizes[name] is None else round(sizes[name] / 2**20, 1),
                "max_abs_diff": float(np.abs(emb - reference).max()),
                "min_cosine": float(cosine.min()),
                "mean_cosine": float(cosine.mean()),
                "embeddings_per_s": max(speeds[name]),
                "auc": report["auc"],
                "best_accuracy": report["best_accuracy"],
            }
        )
    summary = {
        "faces": len(unique),
        "pairs": len(trials),
        "threads": args.threads,
        "batch": args.batch,
        "speed_faces": len(speed_x),
        "rounds": args.rounds,
        "rows": rows,
    }
    atomic_write_text(out / "onnx.json", json.dumps(summary, indent=2) + "\n")
    base = rows[0]
    print(
        f"\ndlib_resnet on {len(unique)} LFW faces ({len(trials)} pairsDevTest pairs), "
        f"{args.threads} thread(s), batch {args.batch}"
    )
    print(
        "| runtime | file MB | max abs diff | min cosine | embeddings/s | speed-up | "
        "AUC | AUC change | best acc. |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['runtime']} | {r['file_mb'] or '-'} | {r['max_abs_diff']:.2e} | "
            f"{r['min_cosine']:.6f} | {r['embeddings_per_s']:.1f} | "
            f"{r['embeddings_per_s'] / base['embeddings_per_s']:.2f}x | {r['auc']:.4f} | "
            f"{r['auc'] - base['auc']:+.4f} | {r['best_accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()
