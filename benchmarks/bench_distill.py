"""Teacher vs distilled student (and any other facelab model): LFW verification and speed, one run.

    python benchmarks/bench_distill.py dlib_resnet runs/lfw_student/last.pt \
        [runs/lfw_scratch_cpu/last.pt] [--images 256] [--repeats 3] [--out runs/bench_distill]

Models are pretrained names or checkpoints; speed-ups are relative to the first (the teacher).
For a student distilled from it with centred targets, the teacher is also scored with its
embeddings centred on that student's training mean (the space the student learnt to reproduce).

Accuracy (cosine of L2-normalised embeddings, each model with its own preprocessing; the
embeddings are cached per model fingerprint in --cache):
- `pairsDevTest.txt` (View 1 test: 1,000 pairs, people disjoint from peopleDevTrain);
- View 2 (`pairs.txt`) restricted to the pairs whose two people are in no given checkpoint's
  training identities (read from each checkpoint's config), with 10-fold accuracy over the
  pairs left in each fold.

Speed (torch at 2 threads, each model as `FaceModel.for_inference`, the traced and frozen copy
`facelab embed` uses), in embeddings per second:
- network alone: preprocessed (N, 3, S, S) inputs -> embeddings, batch 32;
- end to end: decoded RGB images in memory -> embeddings through `facelab.pipeline.embed_images`:
  detection + five-point alignment + network for five-point models (the teacher), centre crop +
  network for centre-crop models. JPEG decoding, the same for every model, is left out.
Models are timed in turn, `--repeats` rounds, keeping each one's best round: on a shared
machine the best round is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from lfw_pretrained import pair_scores, trial_index

from facelab import load_model
from facelab.data.folders import IdentityFolder, Sample, split_images
from facelab.data.images import read_image
from facelab.data.trials import Trial, read_trials
from facelab.eval.metrics import verification_report
from facelab.fileio import atomic_write_text
from facelab.models.checkpoint import load_checkpoint
from facelab.models.face_model import FaceModel
from facelab.pipeline import embed_images
from facelab.train.config import TrainConfig
from facelab.train.distill import cached_embeddings, centred, teacher_targets, teaches_online
from facelab.train.loop import training_folder

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def training_run(spec: str) -> tuple[TrainConfig, IdentityFolder, list[Sample]] | None:
    """A checkpoint's run: its config, identities and training images (None for a pretrained
    name), rebuilt as the trainer built them."""
    if not Path(spec).is_file():
        return None
    cfg = TrainConfig.from_dict(load_checkpoint(spec)["config"])
    folder = training_folder(cfg)
    return cfg, folder, split_images(folder.samples, cfg.val_fraction, cfg.seed)[0]


def scores(
    model: FaceModel, trials: list[Trial], cache: str, mean: np.ndarray | None = None
) -> np.ndarray:
    """Cosine scores; with `mean`, of the embeddings centred on it (`distill.centred`)."""
    unique, index = trial_index(trials)
    emb = cached_embeddings(model, unique, cache)
    if mean is not None:
        emb = centred(emb, mean)
    return pair_scores(emb, index, trials, "cosine")


def accuracy(
    model: FaceModel, trials: list[Trial], cache: str, mean: np.ndarray | None = None
) -> dict:
    labels = np.array([t.label for t in trials])
    folds = np.array([t.fold for t in trials]) if trials[0].fold is not None else None
    return verification_report(scores(model, trials, cache, mean), labels, folds)


def network_rate(model: FaceModel, n: int) -> float:
    size = model.preprocess.size
    x = torch.randn(n, 3, size, size)
    model.embed_tensors(x[:32], batch_size=32)  # warm-up: oneDNN picks its kernels
    tick = time.perf_counter()
    model.embed_tensors(x, batch_size=32)
    return n / (time.perf_counter() - tick)


def pipeline_rate(model: FaceModel, images: list[np.ndarray]) -> float:
    embed_images(model, images[:32], batch_size=32, progress=False)  # warm-up
    seconds = embed_images(model, images, batch_size=32, progress=False).seconds
    return len(images) / sum(seconds.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="pretrained names or checkpoints; first: teacher")
    parser.add_argument("--dev-pairs", default=str(LFW / "pairsDevTest.txt"))
    parser.add_argument("--view2-pairs", default=str(LFW / "pairs.txt"))
    parser.add_argument("--images", type=int, default=256, help="images per speed measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--out", default="runs/bench_distill")
    args = parser.parse_args()
    torch.set_num_threads(2)

    first = args.models[0]
    runs = {spec: training_run(spec) for spec in args.models}
    seen = set().union(*(set(run[1].identities) for run in runs.values() if run))
    dev = read_trials(args.dev_pairs)
    view2_all = read_trials(args.view2_pairs)
    view2 = [t for t in view2_all if not {t.a.parent.name, t.b.parent.name} & seen]
    models = {spec: load_model(spec) for spec in args.models}

    # what each row scores: a model, and the mean its embeddings are centred on (if any)
    scored: dict[str, tuple[str, np.ndarray | None]] = {spec: (spec, None) for spec in models}
    for spec, run in runs.items():
        if run and run[0].teacher == first and run[0].centre_targets:
            online = teaches_online(models[first].preprocess, models[spec].preprocess)
            _, mean = teacher_targets(run[0], models[first], run[2], online)
            scored[f"{first}, centred as {spec}'s targets"] = (first, mean)
    rows = {}
    for label, (spec, mean) in scored.items():
        model = models[spec]
        rows[label] = {
            "model": label,
            "input": f"{model.preprocess.size}px {model.preprocess.alignment}",
            "dev": accuracy(model, dev, args.cache, mean),
            "view2_unseen": accuracy(model, view2, args.cache, mean),
        }

    dev_images, _ = trial_index(dev)
    speed_images = [read_image(p) for p in dev_images[: args.images]]  # read only those timed
    fast = {spec: model.for_inference() for spec, model in models.items()}
    network = {spec: 0.0 for spec in models}
    pipeline = {spec: 0.0 for spec in models}
    for _ in range(args.repeats):
        for spec, model in fast.items():
            network[spec] = max(network[spec], network_rate(model, args.images))
            pipeline[spec] = max(pipeline[spec], pipeline_rate(model, speed_images))
    for label, (spec, _) in scored.items():
        rows[label].update(
            network_per_s=network[spec],
            end_to_end_per_s=pipeline[spec],
            network_speedup=network[spec] / network[first],
            end_to_end_speedup=pipeline[spec] / pipeline[first],
        )

    split = {
        "view2_pairs": len(view2),
        "view2_same": sum(t.label for t in view2),
        "view2_different": sum(1 - t.label for t in view2),
        "view2_pairs_dropped": len(view2_all) - len(view2),
        "people_seen_in_training": len(seen),
    }
    result = {"threads": torch.get_num_threads(), "split": split, "rows": list(rows.values())}
    atomic_write_text(Path(args.out) / "bench_distill.json", json.dumps(result, indent=2) + "\n")

    print(
        f"\n{Path(args.dev_pairs).name}: {len(dev)} pairs. View 2 without the {len(seen)} "
        f"people of the checkpoints' training identities: {split['view2_pairs']} of "
        f"{len(view2_all)} pairs ({split['view2_same']} same, {split['view2_different']} "
        f"different). Speed: {args.images} images, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}."
    )
    print(
        "| model | input | dev AUC | dev EER | dev TPR@FPR=1e-2 | View 2 unseen AUC "
        "| View 2 unseen 10-fold acc | network emb/s | end-to-end emb/s | speed-up net / e2e |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        d, v = r["dev"], r["view2_unseen"]
        print(
            f"| {r['model']} | {r['input']} | {d['auc']:.4f} | {100 * d['eer']:.2f}% "
            f"| {d['tpr_at_fpr_0.01']:.3f} | {v['auc']:.4f} "
            f"| {100 * v['kfold_mean']:.2f}% ± {100 * v['kfold_std']:.2f} "
            f"| {r['network_per_s']:.0f} | {r['end_to_end_per_s']:.0f} "
            f"| {r['network_speedup']:.2f}x / {r['end_to_end_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
