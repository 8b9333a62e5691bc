"""MTCNN face detector (Zhang et al. 2016), a native PyTorch port of facenet-pytorch 2.6.0's.

Three cascaded networks: P-Net scores every 12x12 window of an image pyramid, R-Net re-scores
and refines 24x24 crops of the survivors, O-Net does the same on 48x48 crops and adds five
landmarks. The arithmetic (pyramid sizes, box rounding, area resampling, NMS conventions and
thresholds) follows facenet-pytorch so the detections match its own; unlike it, nothing here
needs torchvision, and each pyramid level and all crops of a stage are area-resampled in one
gather from an integral image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.models.converters.mtcnn_weights import (
    WeightsError,
    facenet_pytorch_weights_dir,
    load_mtcnn_state_dicts,
)
from facelab.models.registry import DETECTORS

logger = logging.getLogger(__name__)

# Images of one size go through the networks together, up to this many pixels per batch:
# peak memory is about 170 bytes per input pixel, and batches of 16 LFW images already get
# most of the speed-up of batching.
MAX_BATCH_PIXELS = 1_000_000
# Smallest face searched for by default, in pixels (facenet-pytorch: 20; see `MTCNN`).
MIN_FACE_SIZE = 40
# Pairwise-overlap matrices of NMS are built for groups of boxes of about this many pairs.
NMS_CHUNK_PAIRS = 1 << 20


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields instead
class Detections:
    """Faces found in one image, most confident first.

    boxes: float32 (K, 4) x1, y1, x2, y2 in input pixels (may extend past the image border);
    scores: float32 (K,) O-Net face probability; landmarks: float32 (K, 5, 2) x, y of the left
    eye, right eye, nose, left mouth corner and right mouth corner (left and right as seen in
    the image: the "left eye" has the smaller x in a frontal face).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def face_order(d: Detections, shape: tuple[int, ...]) -> np.ndarray:
    """Face indices, the photo's subject first: by box area (clipped to the image) minus twice
    the squared distance of the box centre from the image centre, insightface's rule.

    Plain "largest first" picks a bystander or a half-visible face at the border whenever it
    is a little bigger than the centred subject (1.8% of LFW images); the centre penalty
    keeps the subject and still prefers a clearly larger face elsewhere.
    """
    if len(d) == 0:
        return np.zeros(0, dtype=np.int64)
    h, w = shape[:2]
    boxes = np.clip(d.boxes, 0, [w, h, w, h])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - [w / 2, h / 2]
    return np.argsort(-(area - 2.0 * (centre**2).sum(1)), kind="stable")


def main_face(d: Detections, shape: tuple[int, ...]) -> int | None:
    """Index of the photo's subject (`face_order`'s first), None without faces."""
    order = face_order(d, shape)
    return int(order[0]) if len(order) else None


class PNet(nn.Module):
    """Proposal net: for each 12x12 window (stride 2), a face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) normalised image -> offsets (B, 4, h, w), face probability (B, h, w)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement net: re-scores 24x24 crops and regresses their boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(K, 3, 24, 24) normalised crops -> offsets (K, 4), face probability (K,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights were converted from Caffe/TF, whose flattening order is (w, h, c).
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: final score, box offsets and five landmarks for 48x48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(K, 3, 48, 48) crops -> offsets (K, 4), landmarks (K, 10: 5 x then 5 y), prob (K,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)[:, 1]


def _pairwise_overlap(b: Tensor, mode: Literal["union", "min"]) -> Tensor:
    """(G, M, 4) boxes -> (G, M, M) overlaps: IoU or intersection over the smaller area."""
    plus = 1.0 if mode == "min" else 0.0
    x1, y1, x2, y2 = b.unbind(-1)
    iw = (
        torch.minimum(x2[:, :, None], x2[:, None, :])
        - torch.maximum(x1[:, :, None], x1[:, None, :])
        + plus
    ).clamp_(min=0)
    ih = (
        torch.minimum(y2[:, :, None], y2[:, None, :])
        - torch.maximum(y1[:, :, None], y1[:, None, :])
        + plus
    ).clamp_(min=0)
    inter = iw.mul_(ih)
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    if mode == "min":
        return inter / torch.minimum(area[:, :, None], area[:, None, :])
    return inter / (area[:, :, None] + area[:, None, :] - inter)


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    threshold: float,
    mode: Literal["union", "min"] = "union",
) -> Tensor:
    """Greedy non-maximum suppression run independently within each group (image, scale).

    Returns the indices kept, by decreasing score. A box is dropped when its overlap with a
    kept, higher-scoring box of its group exceeds `threshold`. "union" is IoU with areas
    (x2 - x1) * (y2 - y1), as torchvision computes it (facenet-pytorch's first two stages);
    "min" is intersection over the smaller area with +1 pixel sizes (its O-Net stage).
    Equal scores keep their input order, so a box's fate never depends on other groups (the
    libraries facenet-pytorch calls use unstable sorts: on exact ties, rare and only among
    saturated probabilities, either may keep the other box of the tie).
    """
    n = len(scores)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    by_score = torch.argsort(scores, descending=True, stable=True)
    _, group_of, counts = torch.unique(groups[by_score], return_inverse=True, return_counts=True)
    # Lay the groups out biggest first, so groups padded to a common size together are alike.
    by_size = torch.argsort(counts, descending=True, stable=True)
    position = torch.empty_like(by_size)
    position[by_size] = torch.arange(len(by_size), device=by_size.device)
    box_group, within = torch.sort(position[group_of], stable=True)
    order = by_score[within]  # by group (biggest first), then by decreasing score
    sizes = counts[by_size]
    ends = torch.cumsum(sizes, 0)
    slot = torch.arange(n, device=scores.device) - (ends - sizes)[box_group]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    sizes_list, ends_list = sizes.tolist(), ends.tolist()
    first = 0
    while first < len(sizes_list):
        width = sizes_list[first]
        last = min(len(sizes_list), first + max(1, NMS_CHUNK_PAIRS // (width * width)))
        lo, hi = ends_list[first] - width, ends_list[last - 1]
        keep[lo:hi] = _padded_nms(
            boxes[order[lo:hi]],
            box_group[lo:hi] - first,
            slot[lo:hi],
            (last - first, width),
            threshold,
            mode,
        )
        first = last
    kept = order[keep].sort().values
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def _padded_nms(
    boxes: Tensor,
    group: Tensor,
    slot: Tensor,
    shape: tuple[int, int],
    threshold: float,
    mode: Literal["union", "min"],
) -> Tensor:
    """Keep-mask of greedy NMS for boxes laid out as (groups, slots by decreasing score).

    Greedy NMS is sequential, but its result is the unique fixed point of "keep i unless a
    kept earlier j overlaps it", so iterating that rule on whole overlap matrices gives it
    exactly, in as many steps as the longest chain of suppressions (a handful).
    """
    padded = boxes.new_zeros(*shape, 4)
    padded[group, slot] = boxes
    valid = torch.zeros(shape, dtype=torch.bool, device=boxes.device)
    valid[group, slot] = True
    hits = (_pairwise_overlap(padded, mode) > threshold).tril_(-1).float()  # [g, i, j]: j hits i
    keep = valid
    while True:
        updated = valid & (torch.bmm(hits, keep[:, :, None].float())[:, :, 0] == 0)
        if torch.equal(updated, keep):
            return keep[group, slot]
        keep = updated


def _square(boxes: Tensor) -> Tensor:
    """Grow each box to a square about its centre (facenet-pytorch's `rerec`)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    side = torch.maximum(wh[:, :1], wh[:, 1:])
    xy1 = boxes[:, :2] + wh * 0.5 - side * 0.5
    return torch.cat([xy1, xy1 + side], dim=1)


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Apply R-/O-Net box offsets, given in units of the +1 pixel box size (`bbreg`)."""
    wh = boxes[:, 2:] - boxes[:, :2] + 1
    return boxes + offsets * torch.cat([wh, wh], dim=1)


def _integral_image(images: Tensor) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, H + 1, W + 1, 3) exact integer sums over [0, y) x [0, x)."""
    b, h, w, c = images.shape
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    sums = images.new_zeros((b, h + 1, w + 1, c), dtype=dtype)
    sums[:, 1:, 1:] = images
    return sums.cumsum_(1).cumsum_(2)


def _bin_corners(
    top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, size: tuple[int, int], stride: int
) -> tuple[Tensor, Tensor]:
    """Where to read the area-resampling bins of K regions [top, bottom) x [left, right).

    Rows are indices into the integral images stacked along their height, `stride` is the
    integral image's width (W + 1). Each output pixel averages the same input bin as
    F.interpolate(mode="area") (adaptive average pooling): [floor(a n / s), ceil((a + 1) n / s)).
    Returns the flat offsets of its four corners (4, K * h * w) and its pixel count (K * h * w,).
    """

    def bins(lo: Tensor, hi: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
        a = torch.arange(n_out, device=lo.device)
        n = (hi - lo)[:, None]
        return lo[:, None] + a * n // n_out, lo[:, None] + ((a + 1) * n + n_out - 1) // n_out

    ys, ye = bins(top, bottom, size[0])
    xs, xe = bins(left, right, size[1])
    y_start, y_end = (ys * stride)[:, :, None], (ye * stride)[:, :, None]
    x_start, x_end = xs[:, None, :], xe[:, None, :]
    corners = torch.stack([y_end + x_end, y_start + x_end, y_end + x_start, y_start + x_start])
    counts = (ye - ys)[:, :, None] * (xe - xs)[:, None, :]
    return corners.flatten(1), counts.flatten()


def _bin_means(integral: Tensor, corners: Tensor, counts: Tensor) -> Tensor:
    """Mean of each bin (from `_bin_corners`), normalised as MTCNN's input: (N, 3) float32."""
    sums = integral.view(-1, 3).index_select(0, corners.flatten()).view(4, -1, 3)
    total = sums[0] - sums[1] - sums[2] + sums[3]
    return (total.float() / counts[:, None].float() - 127.5) * 0.0078125


def _crops(integral: Tensor, boxes: Tensor, image_idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Cut each box out of its image and area-resample it to size x size.

    The crop is the box clipped to the image (facenet-pytorch's `pad`: truncate, then clip, no
    zero padding). Returns normalised crops (K', 3, size, size), channels-last like the
    networks, and the mask of boxes that overlap the image at all (the others are dropped).
    """
    _, h1, w1, _ = integral.shape
    b = boxes.trunc().long()
    x0, y0 = b[:, 0].clamp(min=1) - 1, b[:, 1].clamp(min=1) - 1
    x1, y1 = b[:, 2].clamp(max=w1 - 1), b[:, 3].clamp(max=h1 - 1)
    ok = (x1 > x0) & (y1 > y0)
    row = image_idx[ok] * h1
    corners, counts = _bin_corners(row + y0[ok], row + y1[ok], x0[ok], x1[ok], (size, size), w1)
    crops = _bin_means(integral, corners, counts).view(-1, size, size, 3)
    return crops.permute(0, 3, 1, 2), ok


def check_detector_input(images: Sequence[np.ndarray]) -> None:
    """What every detector's `detect` takes: a sequence of non-empty RGB uint8 (H, W, 3)
    arrays (a (B, H, W, 3) array counts as B images); anything else is a ValueError naming
    the image."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(
            f"detect takes a sequence of (H, W, 3) images, not an array of shape "
            f"{images.shape}; wrap a single image as [image]"
        )
    for k, image in enumerate(images):
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
            and min(image.shape[:2]) > 0
        ):
            got = (image.dtype, image.shape) if isinstance(image, np.ndarray) else image
            raise ValueError(f"image {k}: expected RGB uint8 (H, W, 3) array, got {got!r:.80}")


class MTCNN(nn.Module):
    """The three-stage cascade; `detect` maps RGB uint8 images to per-image `Detections`.

    Stage thresholds `thresholds` and pyramid scale step `factor` are facenet-pytorch's; faces
    are found from `min_face_size` pixels up, 40 here where facenet-pytorch uses 20: faces
    smaller than 40 pixels are too small for the 112-150 pixel inputs of recognition networks,
    and finding them costs more than half the detector's time (the largest pyramid levels, and
    twice the proposals for R-Net). Pass min_face_size=20 for facenet-pytorch's detections.
    """

    def __init__(
        self,
        min_face_size: float = MIN_FACE_SIZE,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> None:
        super().__init__()
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, not {min_face_size}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), not {factor}")
        if len(thresholds) != 3:
            raise ValueError(f"thresholds needs one value per stage (3), got {len(thresholds)}")
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = factor
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        # Channels-last convolutions and max-pools are several times faster on CPU for these
        # few-channel layers; inputs are laid out to match (see `_propose` and `_crops`).
        self.to(memory_format=torch.channels_last)
        self.eval()

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load pnet.pt, rnet.pt and onet.pt (facenet-pytorch state dicts) from `folder`."""
        for name, state in load_mtcnn_state_dicts(folder).items():
            try:
                getattr(self, name).load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsError(
                    f"{Path(folder) / f'{name}.pt'}: does not fit MTCNN's {name} ({exc})"
                ) from exc

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in RGB uint8 (H, W, 3) images; one `Detections` per image, in order.

        Images of equal size go through the networks as one batch, which is much faster per
        image than one at a time; a (B, H, W, 3) array is taken as B images.
        """
        check_detector_input(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(k)
        device = self.pnet.conv1.weight.device
        results: dict[int, Detections] = {}
        for (h, w), indices in by_size.items():
            per_batch = max(1, MAX_BATCH_PIXELS // max(1, h * w))
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                batch = torch.from_numpy(np.stack([images[k] for k in chunk])).to(device)
                results.update(zip(chunk, self._detect_batch(batch), strict=True))
        return [results[k] for k in range(len(results))]

    def _scales(self, h: int, w: int) -> list[float]:
        """Pyramid scales: the smallest face maps to P-Net's 12 pixels, down to 12-pixel images."""
        scale = 12.0 / self.min_face_size
        side = min(h, w) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def _detect_batch(self, images: Tensor) -> list[Detections]:
        """Run the cascade on (B, H, W, 3) uint8 images of one size."""
        integral = _integral_image(images)
        boxes, image_idx = self._propose(integral)
        landmarks = boxes.new_zeros(0, 5, 2)
        scores = boxes.new_zeros(0)
        if len(boxes):
            boxes, image_idx = self._refine(integral, boxes, image_idx)
            if len(boxes):
                boxes, scores, landmarks, image_idx = self._output(integral, boxes, image_idx)
        return _split(boxes, scores, landmarks, image_idx, len(images))

    def _propose(self, integral: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: P-Net windows on every pyramid level, NMS per level then across levels."""
        n_images, h1, w1, _ = integral.shape
        h, w, device = h1 - 1, w1 - 1, integral.device
        top = torch.arange(n_images, device=device) * h1  # each image's first row
        left = torch.zeros_like(top)
        scales = self._scales(h, w)
        found = []
        for scale in scales:
            size = (int(h * scale + 1), int(w * scale + 1))
            level = _bin_means(integral, *_bin_corners(top, top + h, left, left + w, size, w1))
            offsets, prob = self.pnet(level.view(n_images, *size, 3).permute(0, 3, 1, 2))
            hit = prob >= self.thresholds[0]
            found.append((hit.nonzero(), prob[hit], offsets.permute(0, 2, 3, 1)[hit]))
        if not found:  # image smaller than the smallest face
            return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
        where, scores, offsets = map(torch.cat, zip(*found, strict=True))  # image, row, column
        level_idx = torch.repeat_interleave(torch.tensor([len(f[1]) for f in found], device=device))
        # A window (stride 2, 12 pixels in the level) back in image pixels, as facenet-pytorch.
        scale = torch.tensor(scales, dtype=scores.dtype, device=device)[level_idx, None]
        cells = 2 * where[:, [2, 1]].to(scores.dtype)
        boxes = torch.cat([(cells + 1) / scale, (cells + 12) / scale], dim=1).floor()
        image_idx = where[:, 0]
        keep = batched_nms(boxes, scores, level_idx * n_images + image_idx, 0.5)
        keep = keep[batched_nms(boxes[keep], scores[keep], image_idx[keep], 0.7)]
        boxes, offsets, image_idx = boxes[keep], offsets[keep], image_idx[keep]
        wh = boxes[:, 2:] - boxes[:, :2]
        return _square(boxes + offsets * torch.cat([wh, wh], dim=1)), image_idx

    def _refine(self, integral: Tensor, boxes: Tensor, image_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: R-Net on 24x24 crops, threshold, NMS, box regression."""
        crops, ok = _crops(integral, boxes, image_idx, 24)
        boxes, image_idx = boxes[ok], image_idx[ok]
        offsets, scores = self.rnet(crops)
        hit = scores > self.thresholds[1]
        boxes, scores, offsets, image_idx = boxes[hit], scores[hit], offsets[hit], image_idx[hit]
        keep = batched_nms(boxes, scores, image_idx, 0.7)
        return _square(_regress(boxes[keep], offsets[keep])), image_idx[keep]

    def _output(
        self, integral: Tensor, boxes: Tensor, image_idx: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stage 3: O-Net on 48x48 crops: final scores, boxes and landmarks, NMS by min area."""
        crops, ok = _crops(integral, boxes, image_idx, 48)
        boxes, image_idx = boxes[ok], image_idx[ok]
        offsets, points, scores = self.onet(crops)
        hit = scores > self.thresholds[2]
        boxes, scores, offsets, points, image_idx = (
            boxes[hit],
            scores[hit],
            offsets[hit],
            points[hit],
            image_idx[hit],
        )
        # Landmarks are fractions of the (+1 pixel) box before regression, from its corner - 1.
        wh = boxes[:, 2:] - boxes[:, :2] + 1
        landmarks = torch.stack(
            [
                wh[:, :1] * points[:, :5] + boxes[:, :1] - 1,
                wh[:, 1:] * points[:, 5:] + boxes[:, 1:2] - 1,
            ],
            dim=-1,
        )
        boxes = _regress(boxes, offsets)
        keep = batched_nms(boxes, scores, image_idx, 0.7, mode="min")
        return boxes[keep], scores[keep], landmarks[keep], image_idx[keep]


def _split(
    boxes: Tensor, scores: Tensor, landmarks: Tensor, image_idx: Tensor, n_images: int
) -> list[Detections]:
    """Per-image `Detections`, each sorted by decreasing score."""
    boxes_np, scores_np = boxes.cpu().numpy(), scores.cpu().numpy()
    landmarks_np, image_np = landmarks.cpu().numpy(), image_idx.cpu().numpy()
    order = np.lexsort((-scores_np, image_np))
    bounds = np.cumsum(np.bincount(image_np, minlength=n_images))[:-1]
    return [
        Detections(b, s, p)
        for b, s, p in zip(
            np.split(boxes_np[order], bounds),
            np.split(scores_np[order], bounds),
            np.split(landmarks_np[order], bounds),
            strict=True,
        )
    ]


@DETECTORS.register("mtcnn")
def mtcnn(pretrained: bool | str | os.PathLike = True, **settings: Any) -> MTCNN:
    """An MTCNN with facenet-pytorch's weights (True), those in a folder (a path) or random (False).

    `settings` go to `MTCNN` (min_face_size, thresholds, factor).
    """
    model = MTCNN(**settings)
    if pretrained is True:
        model.load_weights(facenet_pytorch_weights_dir())
    elif pretrained is not False:
        model.load_weights(pretrained)
    logger.debug("built MTCNN %s, pretrained=%s", settings, pretrained)
    return model
