"""Check a data set before training or scoring on it.

Per split (train / val / test folders, identity layout or flat): images per identity, files
that do not decode (listed; a run would stop on them later), and images whose bytes appear in
more than one split, found by SHA-256 — the same photo in train and test inflates scores.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from facelab.data.folders import IMAGE_SUFFIXES
from facelab.data.images import ImageError, decode_image, read_image_bytes

FLAT = ""  # identity of images lying directly in a split's folder (unlabelled test sets)


@dataclass
class SplitCounts:
    name: str
    root: Path
    per_identity: dict[str, int] = field(default_factory=dict)  # readable images only
    ignored: int = 0  # files without an image suffix

    @property
    def images(self) -> int:
        return sum(self.per_identity.values())

    def summary(self) -> dict[str, Any]:
        counts = [n for name, n in self.per_identity.items() if name != FLAT]
        out: dict[str, Any] = {"root": str(self.root), "images": self.images}
        if FLAT in self.per_identity:
            out["flat_images"] = self.per_identity[FLAT]
        if counts:
            out.update(
                identities=len(counts),
                images_per_identity={
                    "min": min(counts),
                    "median": median(counts),
                    "max": max(counts),
                },
                identities_with_one_image=sum(n == 1 for n in counts),
            )
        if self.ignored:
            out["ignored_files"] = self.ignored
        return out


@dataclass
class DataCheck:
    splits: list[SplitCounts]
    unreadable: list[tuple[str, str]]  # (path, reason)
    cross_split_duplicates: list[list[str]]  # groups of "split:path" with identical bytes
    duplicates_within_splits: int  # extra copies inside one split (informative)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.cross_split_duplicates

    def summary(self, listed: int = 20) -> dict[str, Any]:
        """Counts plus the first `listed` unreadable files and duplicate groups."""
        return {
            "splits": {s.name: s.summary() for s in self.splits},
            "unreadable": len(self.unreadable),
            "unreadable_files": [f"{p}: {why}" for p, why in self.unreadable[:listed]],
            "cross_split_duplicates": len(self.cross_split_duplicates),
            "duplicate_groups": self.cross_split_duplicates[:listed],
            "duplicates_within_splits": self.duplicates_within_splits,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, including per-identity counts: for a report file."""
        return {
            **self.summary(listed=len(self.unreadable) + len(self.cross_split_duplicates)),
            "per_identity": {s.name: s.per_identity for s in self.splits},
        }


def _walk(root: Path) -> list[Path]:
    files = []
    for folder, _, names in os.walk(root, followlinks=True):
        files += [Path(folder) / n for n in names]
    return sorted(files)


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(sha256 of the bytes, None) for a readable image, (None, reason) otherwise."""
    try:
        data = read_image_bytes(path)
        decode_image(data, str(path))
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    except ImageError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    return hashlib.sha256(data).hexdigest(), None


def check_dataset(splits: dict[str, str | Path], workers: int = 2) -> DataCheck:
    """Decode and hash every image of every split (name -> folder); see the module doc."""
    counts: list[SplitCounts] = []
    unreadable: list[tuple[str, str]] = []
    by_hash: dict[str, list[tuple[str, str]]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, root in splits.items():
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: split {name!r} folder does not exist")
            split = SplitCounts(name, root)
            everything = _walk(root)
            files = [f for f in everything if f.suffix.lower() in IMAGE_SUFFIXES]
            split.ignored = len(everything) - len(files)
            for path, (digest, reason) in zip(files, pool.map(_inspect, files), strict=True):
                if digest is None:
                    unreadable.append((str(path), reason or ""))
                    continue
                parts = path.relative_to(root).parts
                identity = parts[0] if len(parts) > 1 else FLAT
                split.per_identity[identity] = split.per_identity.get(identity, 0) + 1
                by_hash.setdefault(digest, []).append((name, str(path)))
            counts.append(split)
    cross = [
        [f"{s}:{p}" for s, p in group]
        for group in by_hash.values()
        if len({s for s, _ in group}) > 1
    ]
    within = sum(
        len(group) - len({s for s, _ in group}) for group in by_hash.values() if len(group) > 1
    )
    return DataCheck(counts, unreadable, cross, within)
