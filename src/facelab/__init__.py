"""facelab: face recognition with convolutional networks (train, evaluate, enroll, identify).

The public functions live in `facelab.api`; they are loaded on first use so that
sub-packages such as `facelab.eval` or `facelab.data` import on their own, without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_API = [
    "Verification",
    "classify",
    "cluster_people",
    "embed",
    "evaluate",
    "list_models",
    "index_photos",
    "load_model",
    "predict_folder",
    "score_trial_file",
    "score_trials",
    "search_photos",
    "verify",
]
_GALLERY = [
    "GalleryStore",
    "calibrate",
    "enroll",
    "enroll_tree",
    "identify",
    "map_unknown",
    "verify_claim",
]
__all__ = _API + _GALLERY


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("facelab.api"), name)
    if name in _GALLERY:
        return getattr(importlib.import_module("facelab.gallery"), name)
    raise AttributeError(f"module 'facelab' has no attribute {name!r}")
