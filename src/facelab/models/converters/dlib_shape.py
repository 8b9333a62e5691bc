"""Reader for dlib's serialised `shape_predictor` (e.g. `shape_predictor_5_face_landmarks.dat`).

dlib itself is never imported. The layout (dlib/image_processing/shape_predictor.h, serialize)
is: int version (1); the initial (mean) shape as a float column matrix of x, y pairs in
box-normalised coordinates; the forests, a vector (one per cascade) of vectors of regression
trees, each tree a vector of split features {idx1, idx2, float thresh} (heap order) and a
vector of leaf shape updates (float column matrices); then per cascade the anchor part and
the offset (float x, y) of every feature pixel. Matrices store rows and columns first
(negated by current dlib), then the elements row by row. The file holds only integers and
floats, so it is decoded in one pass by `DlibStream.integer_tokens` and then split up here.

facelab evaluates all trees of a cascade at once, so every tree must have the same depth
(dlib's trainer makes them so); a file that breaks this is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.models.converters.dlib_serialize import DlibStream, reals


@dataclass(frozen=True)
class ShapePredictorFile:
    """The arrays of a dlib shape predictor (C cascades, T trees of D levels, F pixels)."""

    initial_shape: np.ndarray  # float32 (parts, 2): mean shape, box-normalised x, y
    splits: np.ndarray  # int64 (C, T, 2**D - 1, 2): the two feature pixels each node compares
    thresholds: np.ndarray  # float32 (C, T, 2**D - 1): go left if pixel1 - pixel2 > threshold
    leaves: np.ndarray  # float32 (C, T, 2**D, parts, 2): shape update of each leaf
    anchors: np.ndarray  # int64 (C, F): the initial-shape part each feature pixel hangs on
    deltas: np.ndarray  # float32 (C, F, 2): its offset from that part in the initial shape

    @property
    def depth(self) -> int:
        return int(np.log2(self.leaves.shape[2]))


class _Tokens:
    """Cursor over the file's decoded integers; errors name the byte offset of a token."""

    def __init__(self, stream: DlibStream, offsets: np.ndarray, values: np.ndarray) -> None:
        self.stream = stream
        self.offsets = offsets
        self.values = values
        self.pos = 0

    def offset(self, index: int) -> int:
        return int(self.offsets[min(index, len(self.values))])

    def error(self, message: str, index: int | None = None) -> ValueError:
        return self.stream.error(message, self.offset(self.pos if index is None else index))

    def peek(self, ahead: int, what: str) -> int:
        if self.pos + ahead >= len(self.values):
            raise self.error(f"file ends inside {what} (truncated?)", len(self.values))
        return int(self.values[self.pos + ahead])

    def take(self, count: int, what: str) -> np.ndarray:
        if self.pos + count > len(self.values):
            raise self.error(f"file ends inside {what} (truncated?)", len(self.values))
        chunk = self.values[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def count(self, what: str, expected: int | None = None) -> int:
        value = self.peek(0, what)
        if value < 0 or (expected is not None and value != expected):
            wanted = "a count" if expected is None else str(expected)
            raise self.error(f"{what} is {value}, expected {wanted}")
        self.pos += 1
        return value

    def floats(self, count: int, what: str) -> np.ndarray:
        start = self.pos
        pairs = self.take(2 * count, what)
        values = reals(pairs[0::2], pairs[1::2])
        if not np.isfinite(values).all():
            bad = start + 2 * int(np.argmin(np.isfinite(values)))
            raise self.error(f"non-finite value in {what}", bad)
        return values.astype(np.float32)

    def column(self, what: str) -> np.ndarray:
        """A float column matrix; dlib writes its dimensions negated since 2012."""
        start = self.pos
        nr, nc = (abs(v) for v in self.take(2, f"dimensions of {what}"))
        if nc != 1:
            raise self.error(f"{what} is a {nr}x{nc} matrix, expected a column", start)
        return self.floats(nr, what)

    def require_same(self, block: np.ndarray, columns: list[int], start: int, what: str) -> None:
        """Every row of a block must hold row 0's values in these (structural) columns."""
        differ = block[:, columns] != block[0, columns]
        if differ.any():
            row, col = np.argwhere(differ)[0]
            index = start + row * block.shape[1] + columns[col]
            raise self.error(
                f"{what} {row} is shaped differently from {what} 0 (facelab needs trees of "
                "equal depth and leaves of equal size)",
                int(index),
            )


@dataclass(frozen=True)
class _Forest:
    """One cascade's trees, and where their tokens start (for error offsets)."""

    splits: np.ndarray
    thresholds: np.ndarray
    leaves: np.ndarray
    start: int
    tree_size: int

    def split_token(self, tree: int, split: int, which: int) -> int:
        return self.start + tree * self.tree_size + 1 + 4 * split + which


def _read_cascade(tokens: _Tokens, parts: int, cascade: int) -> _Forest:
    """One cascade's trees."""
    where = f"cascade {cascade}"
    trees = tokens.count(f"tree count of {where}")
    if trees == 0:
        raise tokens.error(f"{where} has no trees")
    n_splits = tokens.peek(0, f"split count of {where} tree 0")
    if n_splits < 0:
        raise tokens.error(f"{where} tree 0 has {n_splits} splits")
    n_leaves = tokens.peek(1 + 4 * n_splits, f"leaf count of {where} tree 0")
    if n_leaves != n_splits + 1 or n_leaves & (n_leaves - 1):
        raise tokens.error(
            f"{where} tree 0 has {n_splits} splits and {n_leaves} leaves; dlib's trees are "
            "complete binary trees (leaves = splits + 1, a power of two)"
        )
    leaf_size = 2 + 2 * 2 * parts  # matrix dimensions, then parts * 2 floats
    tree_size = 2 + 4 * n_splits + n_leaves * leaf_size
    start = tokens.pos
    block = tokens.take(trees * tree_size, f"the trees of {where}").reshape(trees, tree_size)
    leaf_start = 2 + 4 * n_splits
    headers = [0, leaf_start - 1]
    for leaf in range(n_leaves):
        headers += [leaf_start + leaf * leaf_size, leaf_start + leaf * leaf_size + 1]
    tokens.require_same(block, headers, start, f"{where} tree")
    nr, nc = abs(block[0, leaf_start]), abs(block[0, leaf_start + 1])
    if (nr, nc) != (2 * parts, 1):
        raise tokens.error(
            f"{where} leaves are {nr}x{nc} matrices, expected {2 * parts}x1",
            start + leaf_start,
        )
    split_fields = block[:, 1 : leaf_start - 1].reshape(trees, n_splits, 4)
    leaf_fields = block[:, leaf_start:].reshape(trees, n_leaves, leaf_size)[:, :, 2:]
    thresholds = reals(split_fields[..., 2], split_fields[..., 3])
    leaves = reals(leaf_fields[..., 0::2], leaf_fields[..., 1::2])
    if not (np.isfinite(thresholds).all() and np.isfinite(leaves).all()):
        raise tokens.error(f"non-finite threshold or leaf value in {where}", start)
    return _Forest(
        split_fields[..., :2].copy(),
        thresholds.astype(np.float32),
        leaves.astype(np.float32).reshape(trees, n_leaves, parts, 2),
        start,
        tree_size,
    )


def read_dlib_shape_predictor(path: str | Path) -> ShapePredictorFile:
    """Parse a dlib shape predictor file (no dlib needed).

    Raises ValueError naming the file and byte offset if the file is truncated, has
    trailing bytes, or is not a shape predictor facelab can evaluate.
    """
    path = Path(path)
    stream = DlibStream(path.read_bytes(), str(path))
    tokens = _Tokens(stream, *stream.integer_tokens("the shape predictor"))
    tokens.count("shape_predictor version", expected=1)
    initial = tokens.column("initial shape")
    if len(initial) == 0 or len(initial) % 2:
        raise tokens.error(f"initial shape has {len(initial)} values, expected x, y pairs")
    parts = len(initial) // 2

    cascades = tokens.count("cascade count")
    forests = [_read_cascade(tokens, parts, c) for c in range(cascades)]
    shapes = {f.leaves.shape for f in forests}
    if len(shapes) > 1:
        raise tokens.error(f"cascades have differently shaped forests {sorted(shapes)}")

    tokens.count("anchor list count", expected=cascades)
    anchors = []
    for c in range(cascades):
        n = tokens.count(f"feature count of cascade {c}", expected=len(anchors[0]) if c else None)
        start = tokens.pos
        anchors.append(tokens.take(n, f"anchor parts of cascade {c}"))
        if (bad := np.flatnonzero((anchors[c] < 0) | (anchors[c] >= parts))).size:
            raise tokens.error(f"anchor part outside 0..{parts - 1}", start + int(bad[0]))
        if (bad := np.argwhere((forests[c].splits < 0) | (forests[c].splits >= n))).size:
            index = forests[c].split_token(*bad[0])
            raise tokens.error(f"split compares a pixel outside 0..{n - 1}", index)
    tokens.count("delta list count", expected=cascades)
    deltas = []
    for c in range(cascades):
        n = tokens.count(f"delta count of cascade {c}", expected=len(anchors[c]))
        deltas.append(tokens.floats(2 * n, f"pixel offsets of cascade {c}").reshape(n, 2))
    if (trailing := len(stream.data) - tokens.offset(tokens.pos)) > 0:
        raise tokens.error(f"{trailing} trailing bytes after the shape predictor")

    return ShapePredictorFile(
        initial_shape=initial.reshape(parts, 2),
        splits=np.stack([f.splits for f in forests]),
        thresholds=np.stack([f.thresholds for f in forests]),
        leaves=np.stack([f.leaves for f in forests]),
        anchors=np.stack(anchors),
        deltas=np.stack(deltas),
    )
