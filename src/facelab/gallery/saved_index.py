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
from typing import IO

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


def load_index(path: Path, room: float = 0.0) -> SavedIndex:
    """The saved index in `path`; SavedIndexUnusable (naming the file) if it is not one.

    room: spare rows after the vectors, as a fraction of them: `vectors` is then the leading
    rows of a larger buffer (`vectors.base`), into which an `ExactIndex` appends the changes
    since without copying the saved rows (untouched, the spare rows take no memory)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = sorted(set(_ARRAYS) - set(arrays.files))
            if missing:
                raise SavedIndexUnusable(f"{path}: not a saved index (no {', '.join(missing)})")
            header, labels, names_utf8, ends = (arrays[a] for a in _ARRAYS if a != "vectors")
            size = arrays.zip.getinfo("vectors.npy").file_size
            with arrays.zip.open("vectors.npy") as member:
                vectors = _read_rows(path, member, size, room)
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


_CHUNK_BYTES = 1 << 18  # read, copied and checked for non-finite values a piece at a time


def _read_rows(path: Path, member: IO[bytes], size: int, room: float) -> np.ndarray:
    """The float32 rows of an .npy `member` of `size` bytes, read straight into a buffer with
    `room` (a fraction) more rows and checked finite piece by piece, so neither a second copy
    nor a full-size temporary is made."""
    version = np.lib.format.read_magic(member)
    if version not in _NPY_HEADERS:
        raise SavedIndexUnusable(f"{path}: vectors in an unknown .npy version {version}")
    shape, fortran_order, dtype = _NPY_HEADERS[version](member)
    if dtype != np.dtype("<f4") or fortran_order or len(shape) != 2:
        raise SavedIndexUnusable(
            f"{path}: damaged saved index (vectors are {dtype} {shape}, not float32 rows)"
        )
    rows, dim = shape
    if rows * dim * 4 > size - member.tell():  # before allocating what the header claims
        raise SavedIndexUnusable(
            f"{path}: damaged saved index (vectors claim {rows}x{dim} values, the file has "
            f"{size - member.tell()} bytes of them)"
        )
    buffer = np.empty((rows + int(rows * room), dim), np.float32)
    flat = buffer[:rows].reshape(-1)
    step = max(1, _CHUNK_BYTES // 4)
    for start in range(0, len(flat), step):
        wanted = min(step, len(flat) - start)
        piece = np.frombuffer(member.read(wanted * 4), "<f4")
        if len(piece) < wanted:
            raise EOFError(f"vectors end after {start + len(piece)} of {len(flat)} values")
        if not np.isfinite(piece).all():
            raise SavedIndexUnusable(f"{path}: damaged saved index (vectors that are not finite)")
        flat[start : start + len(piece)] = piece
    if member.read(1):
        raise SavedIndexUnusable(f"{path}: damaged saved index (bytes after the vectors)")
    return buffer[:rows]


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_shapes(path: Path, saved: SavedIndex) -> None:
    vectors, labels = saved.vectors, saved.labels
    problem = None
    if labels.dtype != np.int64 or labels.shape != (len(vectors),):
        problem = f"{labels.shape} labels for {len(vectors)} rows"
    elif len(labels) and (labels.min() < 0 or labels.max() >= len(saved.names)):
        problem = f"labels outside the {len(saved.names)} names"
    elif len(labels) and np.any(np.diff(labels) < 0):
        problem = "labels not grouped"
    if problem is not None:
        raise SavedIndexUnusable(f"{path}: damaged saved index ({problem})")
