"""Photos kept by enrollments (`keep_images`) and their gallery rows, as one unit.

A kept photo is written first under a pending name (`.pending-REQUEST-SHA.ext`), the rows are
committed, and only then is the file renamed to its final name (`SHA.ext`). SHA starts the
sha256 the gallery row stores for that image, so any file can be matched with its rows. A
process killed at any point leaves either pending files (rows committed or not) or final files
of a name whose deletion was cut short; `reconcile`, run when the server starts, renames the
pending files whose rows exist and deletes every file no row refers to. One server per
gallery and keep folder.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facelab.data.folders import IMAGE_SUFFIXES
from facelab.fileio import atomic_write
from facelab.gallery import GalleryStore
from facelab.gallery.service import array_sha256
from facelab.serve.inputs import Upload

log = logging.getLogger(__name__)

PENDING = ".pending-"
SHA_CHARS = 24  # of the 64 hex digits: enough to tell photos apart, short enough to read


def write_pending(
    folder: Path, images: Sequence[np.ndarray], uploads: Sequence[Upload]
) -> list[Path]:
    """Each upload (as received) under a pending name, named by the sha of its decoded
    `image` (what the gallery row will store); returns the files written."""
    request = uuid.uuid4().hex[:12]
    written = []
    for image, upload in zip(images, uploads, strict=True):
        suffix = Path(upload.filename).suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".img"
        path = folder / f"{PENDING}{request}-{array_sha256(image)[:SHA_CHARS]}{suffix}"
        if path not in written:  # the same photo twice in one request: kept once
            atomic_write(path, lambda fh, data=upload.data: fh.write(data))
            written.append(path)
    return written


def _final(path: Path) -> Path:
    """`.pending-REQUEST-SHA.ext` -> `SHA.ext` (a final name is its own final name)."""
    if not path.name.startswith(PENDING):
        return path
    return path.with_name(path.name[len(PENDING) :].split("-", 1)[1])


def settle(store: GalleryStore, name: str, files: Sequence[Path]) -> list[Path]:
    """Rename those of `files` (photos of `name`) whose image has a gallery row to their final
    names and delete the others; returns the files kept. Photos kept before pending names
    existed were named by the sha256 of their bytes, which their rows store too."""
    enrolled = store.contains(name)
    shas = {sha[:SHA_CHARS] for _, sha, _ in store.images(name)} if enrolled else set()
    kept = []
    for path in files:
        final = _final(path)
        if final.name.split(".", 1)[0] not in shas:
            path.unlink(missing_ok=True)
            log.info("%s: no gallery row refers to it, deleted", path)
            continue
        if final != path:
            path.replace(final)
        kept.append(final)
    return kept


def reconcile(store: GalleryStore, keep_dir: Path) -> None:
    """After a crash: finish or undo every interrupted enrollment and deletion in `keep_dir`
    (see the module docstring); temporary files of interrupted writes go too."""
    if not keep_dir.is_dir():
        return
    enrolled = {i.name for i in store.identities()}
    for folder in sorted(p for p in keep_dir.iterdir() if p.is_dir()):
        if folder.name not in enrolled:
            log.warning("%s: kept photos of a name not enrolled (interrupted), deleted", folder)
            shutil.rmtree(folder)
            continue
        for tmp in folder.glob(".*.tmp"):  # an atomic_write cut short
            tmp.unlink(missing_ok=True)
        settle(store, folder.name, sorted(p for p in folder.iterdir() if p.is_file()))
