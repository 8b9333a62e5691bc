"""Group pictures composed from single-person photos, for testing multi-face indexing.

Real photos with several faces are scarce beside the project, so a group picture is made by
pasting the central face region of several LFW photos (different people) onto one canvas at
varied scales and positions, without overlap, over a smooth random background. The faces are
real; only their arrangement is synthetic. Each pasted face's box (in canvas pixels) and source
image are returned, so a test knows which faces an indexer must find and who they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facelab.data.images import read_image

# LFW's deep-funneled faces fill about the central 100-120 px of the 250 px frame; pasting the
# central 60% keeps the face and some hair and background around it.
CROP = 0.6


@dataclass(frozen=True)
class PastedFace:
    source: str  # the photo it was cut from
    box: tuple[int, int, int, int]  # where the pasted crop lies on the canvas: x1, y1, x2, y2


@dataclass(frozen=True)
class GroupPicture:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    faces: list[PastedFace]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient: no face-like texture for a detector to fire on."""
    corners = rng.integers(40, 215, (2, 2, 3)).astype(np.float64)
    fy = np.linspace(0, 1, height)[:, None, None]
    fx = np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - fx) + corners[0, 1] * fx
    bottom = corners[1, 0] * (1 - fx) + corners[1, 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.uint8)


def compose_group(
    photos: list[str | Path],
    rng: np.random.Generator,
    canvas: tuple[int, int] = (480, 640),
    sizes: tuple[int, int] = (90, 170),
    tries: int = 200,
) -> GroupPicture:
    """Paste the central face region of each photo (one person each) at a random size in
    `sizes` (pixels, side of the pasted square) and a random free position on a canvas of
    (height, width). Raises ValueError when a face finds no free place after `tries` attempts."""
    height, width = canvas
    image = _background(rng, height, width)
    placed: list[PastedFace] = []
    for photo in photos:
        source = read_image(photo)
        h, w = source.shape[:2]
        side = int(min(h, w) * CROP)
        top, left = (h - side) // 2, (w - side) // 2
        crop = source[top : top + side, left : left + side]
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        if size > min(height, width):
            raise ValueError(f"face size {size} does not fit a {width}x{height} canvas")
        for _ in range(tries):
            x = int(rng.integers(0, width - size + 1))
            y = int(rng.integers(0, height - size + 1))
            box = (x, y, x + size, y + size)
            if all(_apart(box, other.box) for other in placed):
                break
        else:
            raise ValueError(f"no free place for {len(placed) + 1}th face on the canvas")
        pasted = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
        image[y : y + size, x : x + size] = pasted
        placed.append(PastedFace(str(photo), box))
    return GroupPicture(image, placed)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """No overlap, with a 10 px gap."""
    gap = 10
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
