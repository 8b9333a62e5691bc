"""Decode and crop faces once, so training epochs do no JPEG decoding.

Faces are held as one uint8 array (N, S, S, 3); with a cache path it is a memory-mapped
`.npy` file reused by later runs that ask for the same images with the same preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facelab.data.images import read_image

log = logging.getLogger(__name__)

CropFn = Callable[[np.ndarray], np.ndarray]


def load_faces(
    paths: Sequence[Path],
    crop: CropFn,
    size: int,
    key: str,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """Return the cropped faces of `paths` as uint8 (N, size, size, 3).

    `crop` turns an RGB image into the (size, size, 3) face; `key` names that cropping (e.g. a
    preprocessing fingerprint) so a cache made with another one is never reused.
    """
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(key.encode())
        for p in paths:
            digest.update(str(p).encode())
        cache_file = Path(cache_dir) / f"faces-{digest.hexdigest()[:20]}.npy"
        if cache_file.exists():
            faces = np.load(cache_file, mmap_mode="r")
            if faces.shape == (len(paths), size, size, 3):
                log.info("using decoded-face cache %s", cache_file)
                return faces
    faces = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        faces[i] = crop(read_image(paths[i]))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(
            tqdm(
                pool.map(work, range(len(paths))),
                total=len(paths),
                desc="decoding faces",
                unit="img",
                disable=not progress,
            )
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, faces)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, cache_file)
        cache_file.with_suffix(".json").write_text(json.dumps({"key": key, "n": len(paths)}))
        faces = np.load(cache_file, mmap_mode="r")
    return faces
