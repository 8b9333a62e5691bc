"""What the detector's retries cost on a photo without a face (where `facelab index` retries
every such photo, as `facelab embed` does): MTCNN on the photo as given, then
`pipeline.locate_faces` with the padded view reduced to `FaceSearch.padded_side` (default) and
at full size, side by side in one process (the shared machine's load moves absolute numbers,
the ratios less). The photos are smooth gradients with mild noise, sizes of phone and camera
pictures scaled down.

    OMP_NUM_THREADS=1 python benchmarks/retry_cost.py --sizes 640x480 2000x1500 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from facelab.models.registry import DETECTORS
from facelab.pipeline import FaceSearch, locate_faces


def face_free(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1
    )
    return np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)


def median_seconds(fn: Callable[..., object], args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "2000x1500"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    detector = DETECTORS.create("mtcnn")
    bounded, full = FaceSearch(), FaceSearch(padded_side=10**9)
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| photo | as given | retries, padded view <= 640 | retries, full size |")
    print("|---|---|---|---|")
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        image = face_free(width, height, rng)
        detector.detect([image])  # warm up
        plain = median_seconds(detector.detect, ([image],), args.repeats)
        cells = []
        for search in (bounded, full):
            found = locate_faces(detector, [image], search)
            assert len(found[0].detections) == 0, "the face-free photo has a face"
            took = median_seconds(locate_faces, (detector, [image], search), args.repeats)
            cells.append(f"{took:.2f} s ({took / plain:.1f}x)")
        print(f"| {size} | {plain:.2f} s | {cells[0]} | {cells[1]} |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
