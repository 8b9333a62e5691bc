"""A replica's index saved on its own disk, so that a restarted replica reads only the changes
made since (`PostgresStore.changes_since`) instead of the whole gallery.

One `.npz` file per gallery address in the replica's snapshot folder, written atomically
(a temporary file, then a rename). It holds plain arrays only, read with
`allow_pickle=False`: the index rows (float32), each row's label, the names as UTF-8 bytes with
their end offsets, and a JSON header with the revision, the gallery's identity and the model
fingerprint. Whether it may be used (same gallery, model and aggregation; a revision the
change log still reaches) is the replica's decision; this module only refuses files that are
not a well-formed saved index, saying why and naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
_ARRAYS = ("header", "vectors", "labels", "names_utf8", "name_ends")


class SavedIndexUnusable(ValueError):
    """The file is not a well-formed saved index; the message names it and says why."""


@dataclass(frozen=True)
class SavedIndex:
    """A replica's live index rows at one gallery revision, labels grouped by identity."""

    revision: int
    gallery_id: str
    fingerprint: str  # of the model the embeddings were made with
    aggregate: str  # how rows stand for identities (gallery.search.AGGREGATES)
    names: list[str]  # label -> identity name
    labels: np.ndarray  # (rows,) int64, grouped
    vectors: np.ndarray  # (rows, dim) float32


def saved_index_path(folder: str | Path, address: str) -> Path:
    """The file in `folder` for the gallery at `address` (password-free), one per gallery."""
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    return Path(folder) / f"gallery-{digest}.npz"


def save_index(path: Path, saved: SavedIndex) -> None:
    """Write `saved` to `path` atomically: a reader sees the old file or the new one, whole."""
    encoded = [name.encode() for name in saved.names]
    header = {
        "format": FORMAT,
        "revision": saved.revision,
        "gallery_id": saved.gallery_id,
        "fingerprint": saved.fingerprint,
        "aggregate": saved.aggregate,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as out:
        np.savez(
            out,
            header=np.frombuffer(json.dumps(header).encode(), np.uint8),
            vectors=np.ascontiguousarray(saved.vectors, np.float32),
            labels=np.asarray(saved.labels, np.int64),
            names_utf8=np.frombuffer(b"".join(encoded), np.uint8),
            name_ends=np.cumsum([len(e) for e in encoded], dtype=np.int64),
        )
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def load_index(path: Path) -> SavedIndex:
    """The saved index in `path`; SavedIndexUnusable (naming the file) if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = sorted(set(_ARRAYS) - set(arrays.files))
            if missing:
                raise SavedIndexUnusable(f"{path}: not a saved index (no {', '.join(missing)})")
            header, vectors, labels, names_utf8, ends = (arrays[a] for a in _ARRAYS)
        fields = json.loads(header.tobytes().decode())
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise SavedIndexUnusable(f"{path}: not a saved index of format {FORMAT}")
        names_bytes = names_utf8.tobytes()
        starts = np.r_[0, ends[:-1]] if len(ends) else ends
        names = [names_bytes[a:b].decode() for a, b in zip(starts, ends, strict=True)]
        saved = SavedIndex(
            int(fields["revision"]),
            str(fields["gallery_id"]),
            str(fields["fingerprint"]),
            str(fields["aggregate"]),
            names,
            labels,
            vectors,
        )
    except SavedIndexUnusable:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise SavedIndexUnusable(f"{path}: unreadable saved index ({exc})") from exc
    _check_shapes(path, saved)
    return saved


def _check_shapes(path: Path, saved: SavedIndex) -> None:
    vectors, labels = saved.vectors, saved.labels
    problem = None
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        problem = f"vectors are {vectors.dtype} {vectors.shape}, not float32 rows"
    elif labels.dtype != np.int64 or labels.shape != (len(vectors),):
        problem = f"{labels.shape} labels for {len(vectors)} rows"
    elif len(labels) and (labels.min() < 0 or labels.max() >= len(saved.names)):
        problem = f"labels outside the {len(saved.names)} names"
    elif len(labels) and np.any(np.diff(labels) < 0):
        problem = "labels not grouped"
    elif not np.isfinite(vectors).all():
        problem = "vectors that are not finite"
    if problem is not None:
        raise SavedIndexUnusable(f"{path}: damaged saved index ({problem})")
