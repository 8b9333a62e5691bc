"""Face quality: how much a face's embedding can be trusted, from four measurable parts.

Each part is a number in [0, 1] (1 = no problem found); the face's quality is the smallest part,
so one bad factor (a tiny, blurred, turned or badly lit face) is enough to flag it:

- size: eye distance in image pixels, `min(1, d / SIZE_GOOD_EYES)`. The embedding models align
  on about 40-60 px between the eyes; a face with 10 px between them is mostly upsampling.
- blur: variance of the Laplacian of the aligned face's grey levels (the 4-neighbour kernel),
  `v / (v + BLUR_HALF)`; BLUR_HALF is where the part is 0.5. LFW's main faces aligned by
  dlib_resnet's preprocessing (150 px chips, upsampled) have a median part of about 0.59; a
  face blurred to a few grey levels of detail has v near zero.
- pose: landmark symmetry. In a frontal face the nose lies midway between the eyes and the
  mouth corners mirror the eyes; the horizontal offset of the nose from the eye midpoint,
  divided by the eye distance, grows with yaw (about 0.5 in full profile).
  `max(0, 1 - offset / POSE_LIMIT)`.
- exposure: mean grey level of the aligned face in [0, 255] and the share of clipped pixels
  (<= 5 or >= 250). 1 inside [EXPOSURE_LOW, EXPOSURE_HIGH], falling linearly to 0 at the
  black or white end, times (1 - clipped share).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SIZE_GOOD_EYES = 30.0
BLUR_HALF = 25.0
POSE_LIMIT = 0.5
EXPOSURE_LOW, EXPOSURE_HIGH = 60.0, 190.0


@dataclass(frozen=True)
class Quality:
    size: float
    blur: float
    pose: float
    exposure: float

    @property
    def score(self) -> float:
        return min(self.size, self.blur, self.pose, self.exposure)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "score": self.score}


def _grey(face: np.ndarray) -> np.ndarray:
    face = np.asarray(face, dtype=np.float64)
    if face.ndim == 3:
        face = face @ np.array([0.299, 0.587, 0.114])
    return face


def size_part(landmarks: np.ndarray) -> float:
    eyes = np.asarray(landmarks, dtype=np.float64)[:2]
    return float(min(1.0, np.linalg.norm(eyes[1] - eyes[0]) / SIZE_GOOD_EYES))


def laplacian_variance(face: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels of a grey or RGB image."""
    g = _grey(face)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def blur_part(face: np.ndarray) -> float:
    v = laplacian_variance(face)
    return v / (v + BLUR_HALF)


def pose_part(landmarks: np.ndarray) -> float:
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_l, eye_r, nose = lm[0], lm[1], lm[2]
    span = np.linalg.norm(eye_r - eye_l)
    if span <= 0:
        return 0.0
    axis = (eye_r - eye_l) / span  # measure along the eye line, so head roll does not count
    offset = abs(float((nose - (eye_l + eye_r) / 2) @ axis)) / span
    return max(0.0, 1.0 - offset / POSE_LIMIT)


def exposure_part(face: np.ndarray) -> float:
    g = _grey(face)
    mean = float(g.mean())
    if mean < EXPOSURE_LOW:
        level = mean / EXPOSURE_LOW
    elif mean > EXPOSURE_HIGH:
        level = (255.0 - mean) / (255.0 - EXPOSURE_HIGH)
    else:
        level = 1.0
    clipped = float(((g <= 5) | (g >= 250)).mean())
    return max(0.0, level) * (1.0 - clipped)


def face_quality(aligned_face: np.ndarray, landmarks: np.ndarray) -> Quality:
    """Quality of one face: `aligned_face` is the model's aligned crop (RGB uint8), `landmarks`
    the detector's five points in the original image's pixels."""
    return Quality(
        size=size_part(landmarks),
        blur=blur_part(aligned_face),
        pose=pose_part(landmarks),
        exposure=exposure_part(aligned_face),
    )
