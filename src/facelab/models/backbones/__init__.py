"""Importing this package registers every built-in backbone."""

from facelab.models.backbones import (  # noqa: F401
    dlib_resnet,
    inception,
    iresnet,
    mobilefacenet,
    mobilenetv2,
    shufflenetv2,
)
