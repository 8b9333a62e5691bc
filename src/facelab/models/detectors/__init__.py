"""Importing this package registers every built-in face detector."""

from facelab.models.detectors import blazeface, mtcnn  # noqa: F401
