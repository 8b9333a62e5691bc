"""facelab: face recognition with convolutional networks (train, evaluate, enroll, identify)."""

from facelab.api import Verification, classify, embed, evaluate, load_model, score_trials, verify

__all__ = ["Verification", "classify", "embed", "evaluate", "load_model", "score_trials", "verify"]
__version__ = "0.1.0"
