"""Identity-folder datasets (VGGFace2 / CASIA / LFW layout: one sub-folder per person)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm"}


def list_images(root: str | Path) -> list[Path]:
    """Every image file below `root`, sorted, following symbolic links to folders."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass(frozen=True)
class IdentityFolder:
    """The images of an identity-folder tree, labelled by sorted identity name."""

    root: Path
    identities: tuple[str, ...]
    samples: tuple[Sample, ...]

    @classmethod
    def scan(
        cls,
        root: str | Path,
        min_images: int = 1,
        include: set[str] | None = None,
        exclude: set[str] | None = None,
    ) -> IdentityFolder:
        """Scan `root`; keep identities with at least `min_images` images, optionally only
        those in `include` and none in `exclude` (identity-disjoint experiments)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: identity folder root does not exist")
        kept: dict[str, list[Path]] = {}
        for person in sorted(p for p in root.iterdir() if p.is_dir()):
            if include is not None and person.name not in include:
                continue
            if exclude is not None and person.name in exclude:
                continue
            files = sorted(
                f for f in person.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if len(files) >= min_images:
                kept[person.name] = files
        if not kept:
            raise ValueError(f"{root}: no identity folder has at least {min_images} image(s)")
        names = tuple(kept)
        samples = tuple(
            Sample(path, label) for label, name in enumerate(names) for path in kept[name]
        )
        return cls(root, names, samples)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.samples)


def _stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (key, seed): splits that do not depend on listing order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_images(
    samples: tuple[Sample, ...] | list[Sample], val_fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Per-identity deterministic split of images into train/val for classification accuracy.

    Each identity with at least two images keeps at least one image in train and puts
    round(val_fraction * n) (at least one when val_fraction > 0) into val.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for items in by_label.values():
        ordered = sorted(items, key=lambda s: _stable_fraction(s.path.name, seed))
        n_val = 0
        if val_fraction > 0 and len(ordered) >= 2:
            n_val = min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
        val.extend(ordered[:n_val])
        train.extend(ordered[n_val:])
    return train, val


def split_identities(
    identities: list[str] | tuple[str, ...], held_out_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic identity-disjoint split: (kept, held_out) name lists."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), not {held_out_fraction}")
    held = [n for n in identities if _stable_fraction(n, seed) < held_out_fraction]
    kept = [n for n in identities if _stable_fraction(n, seed) >= held_out_fraction]
    return kept, held
