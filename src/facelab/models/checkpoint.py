"""Checkpoint files: a schema-versioned dict written atomically with torch.save."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from facelab.fileio import atomic_write
from facelab.models.face_model import FaceModel

SCHEMA_VERSION = 1
KIND = "facelab-checkpoint"
RUN_KEYS = ("config", "history")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of another schema; names the file."""


def save_checkpoint(path: str | Path, model: FaceModel, **extra: Any) -> Path:
    """Write the model (recipe, preprocessing, weights) plus any training state in `extra`."""
    payload = {
        "kind": KIND,
        "schema": SCHEMA_VERSION,
        "model": model.describe(),
        "model_state": model.backbone.state_dict(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a facelab checkpoint")
    if payload.get("schema") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema {payload.get('schema')}, this facelab reads schema {SCHEMA_VERSION}"
        )
    return payload


def save_model_checkpoint(path: str | Path, model: FaceModel, run: dict[str, Any] | None) -> Path:
    """Write the model alone, with its run's config and history (small, kept for benchmarks
    and provenance) but no training state (optimizer, head, RNG): a file to ship, evaluate or
    start another run from (`init_from`), at about half a training checkpoint's size."""
    kept = {key: run[key] for key in RUN_KEYS if run is not None and key in run}
    return save_checkpoint(path, model, **kept)


def model_from_checkpoint(payload: dict[str, Any]) -> FaceModel:
    model = FaceModel.from_description(payload["model"])
    model.backbone.load_state_dict(payload["model_state"])
    return model
