"""Throughput and memory of `facelab score` on a million-trial unlabelled list over real LFW.

Builds N random pairs (default 900,000) over every LFW image (13,233), written as an
`img1 img2` text file the way assignments ship their test lists, then runs the two halves of
`score_trial_file` (what `facelab score` calls): each distinct image embedded once, then the
trials streamed in chunks into an `Id,Category` CSV, once per chunk size. Prints the embedding
time, and per chunk size the scoring time, trials/s (scoring alone and with the embedding) and
the process's peak resident memory so far (ru_maxrss: if scoring needed more memory than
embedding, the peak grows; give chunk sizes in ascending order to see each one's), beside the
sizes of the embedding matrix and of the trial file.

    python benchmarks/bench_score.py [--model runs/smoke/thumbnail_shufflenetv2/last.pt]
        [--trials 900000] [--chunk-sizes 8192 65536] [--work runs/bench_score]

The default model is the checkpoint of the thumbnail smoke run
(`facelab train --config configs/thumbnail_shufflenetv2.yaml --smoke`); any checkpoint or
pretrained name works (a five-point model such as dlib_resnet adds MTCNN to the embedding).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from facelab import load_model
from facelab.data.folders import IdentityFolder
from facelab.fileio import atomic_write_text
from facelab.pipeline import embed_images
from facelab.submission import trial_images, write_scores

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_random_trials(images: Path, count: int, path: Path, seed: int = 0) -> None:
    """`count` random pairs of distinct LFW images as `img1 img2` lines."""
    names = [s.path.relative_to(images).as_posix() for s in IdentityFolder.scan(images).samples]
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(names), count)
    b = (a + rng.integers(1, len(names), count)) % len(names)  # never the same image twice
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    atomic_write_text(path, "".join(f"{names[i]} {names[j]}\n" for i, j in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/smoke/thumbnail_shufflenetv2/last.pt")
    parser.add_argument("--lfw", default=str(LFW))
    parser.add_argument("--trials", type=int, default=900_000)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--work", default="runs/bench_score", help="trial list and CSV go here")
    args = parser.parse_args()

    images = Path(args.lfw) / "images"
    work = Path(args.work)
    trials = work / "trials.txt"
    tick = time.perf_counter()
    write_random_trials(images, args.trials, trials)
    print(f"wrote {args.trials:,} random trials to {trials} in {time.perf_counter() - tick:.1f} s")

    model = load_model(args.model)
    tick = time.perf_counter()
    names = trial_images(trials)
    embeddings = embed_images(
        model, [images / n for n in names], batch_size=args.batch_size, progress=False
    ).embeddings
    embed_s = time.perf_counter() - tick
    print(
        f"model {model.name} ({args.model}): {len(names):,} distinct images embedded once in "
        f"{embed_s:.1f} s ({len(names) / embed_s:.0f} img/s); embeddings {embeddings.shape}, "
        f"{embeddings.nbytes / 2**20:.1f} MiB; trial file {trials.stat().st_size / 2**20:.0f} MiB; "
        f"peak RSS after embedding {peak_mib():.0f} MiB"
    )
    print()
    print(
        "| chunk | trials | score s | trials/s scoring | trials/s with embedding | peak RSS MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for chunk in args.chunk_sizes:
        tick = time.perf_counter()
        count = write_scores(trials, names, embeddings, work / "scores.csv", chunk_size=chunk)
        score_s = time.perf_counter() - tick
        print(
            f"| {chunk:,} | {count:,} | {score_s:.1f} | {count / score_s:,.0f} | "
            f"{count / (score_s + embed_s):,.0f} | {peak_mib():.0f} |"
        )


if __name__ == "__main__":
    main()
