"""From a labels CSV to the identity-folder layout training expects, without copying images.

The one source layout handled is the common one: a folder of images plus an `image,identity`
CSV (header optional; image paths relative to the folder) — what Kaggle-style assignments
ship and what `facelab map` / the LFW mapping split write. The result is `DST/<identity>/`
holding symbolic links to the original files.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from facelab.data.trials import read_text

log = logging.getLogger(__name__)


def read_labels(path: str | Path) -> dict[str, str]:
    """`image,identity` CSV (header optional) -> {image: identity}."""
    rows = [r for r in csv.reader(read_text(Path(path)).splitlines()) if r]
    if rows and [c.strip().lower() for c in rows[0]] == ["image", "identity"]:
        rows = rows[1:]
    for i, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise ValueError(f"{path}: row {i} is not image,identity")
    return {row[0].strip(): row[1].strip() for row in rows}


@dataclass
class Layout:
    dest: Path
    linked: int = 0
    identities: int = 0
    missing: list[str] = field(default_factory=list)  # listed in the CSV, not under SRC


def _folder_name(identity: str) -> str:
    if not identity or identity in (".", "..") or "/" in identity or "\\" in identity:
        raise ValueError(f"identity {identity!r} cannot be a folder name")
    return identity


def layout_from_labels(src: str | Path, labels: str | Path, dest: str | Path) -> Layout:
    """Link every labelled image of `src` into `dest/<identity>/<file name>`.

    Re-running replaces the links; images the CSV lists but `src` lacks are reported, not
    fatal; two images of one identity with the same file name are an error (one would hide
    the other)."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: image folder does not exist")
    mapping = read_labels(labels)
    if not mapping:
        raise ValueError(f"{labels}: no image,identity rows")
    result = Layout(dest)
    targets: dict[Path, str] = {}
    for image, identity in mapping.items():
        source = src / image
        if not source.is_file():
            result.missing.append(image)
            continue
        link = dest / _folder_name(identity) / source.name
        if link in targets:
            raise ValueError(f"{targets[link]} and {image} both become {link}")
        targets[link] = image
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(source.resolve())
    result.linked = len(targets)
    result.identities = len({link.parent for link in targets})
    if result.missing:
        log.warning("%s: %d listed images not found under %s", labels, len(result.missing), src)
    return result
