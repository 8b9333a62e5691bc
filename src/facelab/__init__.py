"""facelab: face recognition with convolutional networks (train, evaluate, enroll, identify).

The public functions live in `facelab.api`; they are loaded on first use so that
sub-packages such as `facelab.eval` or `facelab.data` import on their own, without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Verification",
    "classify",
    "embed",
    "evaluate",
    "load_model",
    "predict_folder",
    "score_trial_file",
    "score_trials",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("facelab.api"), name)
    raise AttributeError(f"module 'facelab' has no attribute {name!r}")
