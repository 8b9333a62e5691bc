"""Which store a gallery address opens: `postgresql://...` a PostgreSQL database, anything else
an SQLite file (the embedded default). Nothing above `gallery/` needs to know which it got."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facelab.gallery.postgres import PostgresStore, is_postgres_address
from facelab.gallery.store import EnrolledFace, GalleryError, GalleryStore

GalleryAddress = str | Path


def open_store(
    address: GalleryAddress, create: bool = False, timeout: float = 60.0
) -> GalleryStore:
    """The gallery at `address`; `create` makes an empty one where there is none."""
    if is_postgres_address(address):
        return PostgresStore(str(address), create=create, timeout=timeout)
    return GalleryStore(address, create=create, timeout=timeout)


def gallery_exists(address: GalleryAddress) -> bool:
    """Whether a gallery is there to open without `create` (a database is asked; a file looked
    for)."""
    if is_postgres_address(address):
        try:
            open_store(address).close()
        except Exception:
            return False
        return True
    return Path(address).is_file()


def prune_log(store: GalleryStore, keep: int) -> dict[str, Any]:
    """Keep the last `keep` revisions of a PostgreSQL gallery's change log (see postgres.py)."""
    if not isinstance(store, PostgresStore):
        raise GalleryError(f"{store.path}: an SQLite gallery keeps no change log to prune")
    start = store.prune_log(keep)
    return {"gallery": store.path, "keep": keep, "log_start": start, "revision": store.revision()}


def copy_gallery(source: GalleryAddress, destination: GalleryAddress) -> dict[str, Any]:
    """Copy every identity (images, embeddings), the model binding and source, and the
    calibrated thresholds into an empty gallery, between any two backends.

    The identities go in one transaction; thresholds follow oldest first, so the most recent
    stays the default. The source must not change meanwhile (its revision is checked after)."""
    with open_store(source) as src, open_store(destination, create=True) as dst:
        if dst.identities() or dst.thresholds():
            raise GalleryError(f"{dst.path}: not empty; copy into a new gallery")
        revision, model = src.revision(), src.model()
        faces = {
            i.name: [
                EnrolledFace(path, sha256, face, vector)
                for (path, sha256, face), vector in zip(
                    src.images(i.name), src.embeddings(i.name), strict=True
                )
            ]
            for i in src.identities()
        }
        thresholds = src.thresholds()[::-1]
        source_of_model = src.model_source()
        if src.revision() != revision:
            raise GalleryError(
                f"{src.path}: changed while being read; nothing was copied, run again"
            )
        if model is not None:
            dst.add(faces, model)
            for threshold in thresholds:
                dst.set_threshold(threshold, model)
        if source_of_model is not None:
            dst.set_model_source(source_of_model)
        return {
            "copied": src.path,
            "to": dst.path,
            "identities": len(faces),
            "images": sum(map(len, faces.values())),
            "thresholds": len(thresholds),
        }
