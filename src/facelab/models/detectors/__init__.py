"""Importing this package registers every built-in face detector."""

from facelab.models.detectors import mtcnn  # noqa: F401
