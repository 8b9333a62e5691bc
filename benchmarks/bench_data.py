"""Does the data pipeline keep the model busy? Images/s of the loader, the training step, and both.

For ResNet-18 and MobileFaceNet at 112x112 and at 32x32 (the thumbnail setting), on LFW faces
decoded once into the memory-mapped cache (runs/cache), with the training loop's own pieces
(`Trainer.batches`, `Trainer.step`, softmax head, default augmentation):

  (a) loader alone: index the cache, augment, normalise (in this process);
  (b) step alone: forward + backward + SGD on one fixed batch;
  (c) both: the real loop, with batches prepared in this process (serial) or one loader
      worker process ahead (prefetch, `loader_workers: 1`);

plus the model FLOPs of a training step (torch.utils.flop_counter.FlopCounterMode: forward and
backward) divided by the step time, against the peak float32 GFLOP/s of a large matmul
measured in the same run.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_data.py [--steps 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from bench_pipeline import flops_of, matmul_peak_gflops, timed

from facelab.train import TrainConfig, Trainer

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
SETTINGS = [("resnet18", 112), ("mobilefacenet", 112), ("resnet18", 32), ("mobilefacenet", 32)]


def images_per_s(batches, steps: int, batch: int, work=lambda x, y: None) -> float:
    """Rate over `steps` batches after the first (which pays start-up: workers, allocation)."""
    iterator = iter(batches)
    work(*next(iterator))
    tick = time.perf_counter()
    for x, y in islice(iterator, steps):
        work(x, y)
    return steps * batch / (time.perf_counter() - tick)


def bench(name: str, size: int, batch: int, steps: int, lfw: Path, out: Path) -> dict:
    cfg = TrainConfig(
        data=str(lfw / "images"),
        out=str(out),
        backbone=name,
        embedding_dim=512,
        image_size=size,
        min_images=40,  # 19 people, 1,755 images: more than enough batches
        val_fraction=0.0,
        batch_size=batch,
        augment={"flip": True, "crop_scale": (0.8, 1.0), "jitter": 0.2},
        cache_dir="runs/cache",
        workers=2,
    )
    trainer = Trainer(cfg)
    trainer.train_mode()
    loader = images_per_s(trainer.batches(0), steps, batch)
    x, y = next(iter(trainer.batches(1)))
    trainer.step(x, y)  # warm-up: allocator, oneDNN primitives
    step_seconds = min(timed(lambda: trainer.step(x, y)) for _ in range(steps))
    flops = flops_of(lambda: trainer.step(x, y))
    both = {}
    for workers in (0, 1):
        trainer.cfg.loader_workers = workers
        both[workers] = images_per_s(trainer.batches(2 + workers), steps, batch, trainer.step)
    return {
        "model": name,
        "size": size,
        "batch": batch,
        "loader": loader,
        "step": batch / step_seconds,
        "serial": both[0],
        "prefetch": both[1],
        "gflop_per_image": flops / batch / 1e9,
        "achieved": flops / step_seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", type=Path, default=LFW)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed batches per measurement")
    args = parser.parse_args()
    if not (args.lfw / "images").is_dir():
        raise SystemExit(f"{args.lfw}: LFW not found (the benchmark reads its faces)")
    logging.basicConfig(level=logging.WARNING)
    peak = matmul_peak_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SETTINGS:
            rows.append(bench(name, size, args.batch, args.steps, args.lfw, Path(tmp)))
    peak = max(peak, matmul_peak_gflops())  # measured before and after: the machine may be shared
    print(
        f"\n{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
        f"peak float32 matmul {peak:.1f} GFLOP/s; images/s (batch {args.batch})\n"
    )
    head = (
        "| model | input | (a) loader | (b) step | (c) both, serial | (c) both, 1 loader worker "
        "| GFLOP/image (fwd+bwd) | achieved GFLOP/s | of peak |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['model']} | {r['size']}x{r['size']} | {r['loader']:.0f} | {r['step']:.1f} | "
            f"{r['serial']:.1f} | {r['prefetch']:.1f} | {r['gflop_per_image']:.2f} | "
            f"{r['achieved']:.1f} | {100 * r['achieved'] / peak:.0f}% |"
        )


if __name__ == "__main__":
    main()
