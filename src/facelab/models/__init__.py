"""Backbones, heads and detectors, each behind a registry (`facelab.models.registry`)."""

from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES, DETECTORS, HEADS

__all__ = ["BACKBONES", "DETECTORS", "HEADS", "FaceModel", "Preprocess"]
