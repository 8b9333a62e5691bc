"""The preprocessing a model was trained with, stored beside its weights.

Every path that turns an image into a network input goes through `Preprocess.to_tensor`,
so a model cannot be fed a different size, colour order, normalisation or alignment
than the one it records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

COLOUR_ORDERS = ("RGB", "BGR")
ALIGNMENTS = ("centre_crop", "five_point", "dlib_chip")
# Alignments that need points from a face detector (and a landmark model for dlib_chip).
LANDMARK_ALIGNMENTS = ("five_point", "dlib_chip")
# dlib_chip: the margin dlib's compute_face_descriptor leaves around the face, in face widths.
DLIB_CHIP_PADDING = 0.25
# The face detector landmark alignments use unless the preprocessing names another; left out of
# `fingerprint`, so models and galleries made before the field existed keep theirs.
DEFAULT_DETECTOR = "mtcnn"


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes the (3, size, size) float tensor a network expects.

    alignment "centre_crop": keep the central `crop` fraction of the shorter side, then resize
    (LFW deep-funneled 250x250: crop 0.6 keeps the central 150x150, where the face is).
    alignment "five_point": warp the face so its five landmarks (left eye, right eye, nose,
    left and right mouth corner, in the detector's order) land on `template`, given in
    pixels of the output image; needs landmarks from a detector.
    alignment "dlib_chip": cut dlib's own face chip (`dlib.get_face_chip`, padding 0.25) from
    the five points of dlib's 5-point shape model (its part order), which the pipeline runs on
    the rectangle mapped from the detector's face; where no face is found, the centre-crop
    region is that rectangle.
    Values are (pixel - mean) / std per channel, in the network's colour order.
    detector: the registered face detector (`DETECTORS`) that finds the faces and landmarks
    of the landmark alignments, e.g. "mtcnn" or "blazeface".
    """

    size: int = 112
    colour: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    alignment: str = "centre_crop"
    crop: float = 0.6
    template: tuple[tuple[float, float], ...] | None = field(default=None)
    detector: str = DEFAULT_DETECTOR

    def __post_init__(self) -> None:
        if self.colour not in COLOUR_ORDERS:
            raise ValueError(
                f"preprocess.colour must be one of {COLOUR_ORDERS}, not {self.colour!r}"
            )
        if self.alignment not in ALIGNMENTS:
            raise ValueError(
                f"preprocess.alignment must be one of {ALIGNMENTS}, not {self.alignment!r}"
            )
        if self.alignment == "five_point" and (self.template is None or len(self.template) != 5):
            raise ValueError(
                "preprocess.template needs five (x, y) points for five_point alignment"
            )
        if not 0 < self.crop <= 1:
            raise ValueError(f"preprocess.crop must be in (0, 1], not {self.crop}")
        if not isinstance(self.detector, str) or not self.detector:
            raise ValueError(f"preprocess.detector must be a detector name, not {self.detector!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        data = dict(data)
        for key in ("mean", "std"):
            data[key] = tuple(data[key])
        if data.get("template") is not None:
            data["template"] = tuple(tuple(p) for p in data["template"])
        return cls(**data)

    def fingerprint(self) -> str:
        """A short stable hash: two models embed comparably only if their fingerprints match."""
        fields = self.to_dict()
        if fields["detector"] == DEFAULT_DETECTOR:
            del fields["detector"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def crop_face(self, image: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """Return the aligned face as RGB uint8 (size, size, 3)."""
        if self.alignment in LANDMARK_ALIGNMENTS and landmarks is None:
            raise ValueError(f"this model needs five points per face ({self.alignment} alignment)")
        if self.alignment == "five_point":
            from facelab.data.align import warp_to_template

            return warp_to_template(
                image, np.asarray(landmarks), np.asarray(self.template), self.size
            )
        if self.alignment == "dlib_chip":
            from facelab.data.align import dlib_face_chip

            return dlib_face_chip(image, np.asarray(landmarks), self.size, DLIB_CHIP_PADDING)
        h, w = image.shape[:2]
        side = max(1, round(min(h, w) * self.crop))
        top, left = (h - side) // 2, (w - side) // 2
        face = Image.fromarray(image[top : top + side, left : left + side])
        return np.array(face.resize((self.size, self.size), Image.BILINEAR))

    def normalise(self, faces: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, size, size, 3) or (size, size, 3) -> float (N, 3, size, size) input.

        A NumPy array that torch cannot share (the face cache's read-only memory map, a strided
        view) is copied first."""
        if isinstance(faces, np.ndarray):
            faces = torch.from_numpy(np.require(faces, requirements=("C", "W")))
        if faces.ndim == 3:
            faces = faces.unsqueeze(0)
        x = faces.permute(0, 3, 1, 2).float()
        if self.colour == "BGR":
            x = x.flip(1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_tensor(self, image: np.ndarray, landmarks: np.ndarray | None = None) -> torch.Tensor:
        """RGB uint8 image -> (3, size, size) network input."""
        face = self.crop_face(image, landmarks)
        return self.normalise(face)[0]


def resized(spec: Preprocess, size: int) -> Preprocess:
    """The same preprocessing at another output size (a five-point template scaled with it): a
    face cropped at one size and resized to the other is (up to resampling) the other's crop."""
    scale = size / spec.size
    template = spec.template
    if template is not None:
        template = tuple((x * scale, y * scale) for x, y in template)
    return replace(spec, size=size, template=template)
