"""Checkpoint files: a schema-versioned dict written atomically with torch.save.

Loading never runs code from the file: `torch.load(weights_only=True)` rebuilds only dicts,
lists, tuples, strings, numbers and tensors, so whatever is saved is first turned into those
(`plain`: NumPy arrays become tensors, NumPy scalars Python numbers). Every payload carries a
SHA-256 of its contents (`payload_digest`), checked on load: a flipped bit in the weights is a
CheckpointError naming the file, not a silently different model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facelab.fileio import atomic_write
from facelab.models.face_model import FaceModel

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "facelab-checkpoint"
RUN_KEYS = ("config", "history")
DIGEST_KEY = "sha256"

# Files written before checkpoints were made plain hold NumPy RNG state and NumPy scalars in
# their history. These rebuild numeric arrays and scalars only (no callable of the file's
# choosing), so such files stay readable under weights_only.
_LEGACY_NUMPY = [
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np._core.multiarray.scalar,  # type: ignore[attr-defined]
    *{type(np.dtype(t)) for t in ("u4", "i8", "f4", "f8", "b1")},
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of another schema; names the file."""


def plain(value: Any) -> Any:
    """`value` with NumPy arrays as tensors and NumPy scalars as Python numbers, recursively
    through dicts, lists and tuples: what `torch.load(weights_only=True)` can read back."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over the whole payload but its digest: every key, value, and tensor's dtype,
    shape and bytes, in order."""
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            sha.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            sha.update(f"dict {len(value)};".encode())
            for k, v in value.items():
                feed(k)
                feed(v)
        elif isinstance(value, (list, tuple)):
            sha.update(f"{type(value).__name__} {len(value)};".encode())
            for v in value:
                feed(v)
        else:
            sha.update(f"{type(value).__name__} {value!r};".encode())

    feed({k: v for k, v in payload.items() if k != DIGEST_KEY})
    return sha.hexdigest()


def save_checkpoint(path: str | Path, model: FaceModel, **extra: Any) -> Path:
    """Write the model (recipe, preprocessing, weights) plus any training state in `extra`."""
    payload = plain(
        {
            "kind": KIND,
            "schema": SCHEMA_VERSION,
            "model": model.describe(),
            "model_state": model.backbone.state_dict(),
            **extra,
        }
    )
    payload[DIGEST_KEY] = payload_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file, read without running anything the file names, its
    digest checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: not ours, or hostile
        named = re.search(r"GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"{path}: refused: it asks to load {named.group(1) if named else 'an object'}, "
            "which a facelab checkpoint never holds (loading it could run code)"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a facelab checkpoint")
    if payload.get("schema") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema {payload.get('schema')}, this facelab reads schema {SCHEMA_VERSION}"
        )
    stored = payload.get(DIGEST_KEY)
    if stored is None:
        log.warning("%s: checkpoint without a checksum (written by an older facelab)", path)
    elif stored != payload_digest(payload):
        raise CheckpointError(
            f"{path}: checksum mismatch, the file is damaged (its contents changed after "
            "it was written)"
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
