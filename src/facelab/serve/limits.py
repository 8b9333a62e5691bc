"""Bounded work per request: what one upload may cost the server.

A 3 KB PNG may declare 24 million blank pixels; detection on it at full size took seconds and
a gigabyte. So each request is held to

- a pixel budget: the pixels all its images declare (read from their headers, before any is
  decoded) may not exceed `max_request_pixels` (413);
- a working size: each image is decoded, then reduced so that its longer side is at most
  `max_side` before detection (boxes are reported in the original image's pixels);
- a face cap: at most `max_faces` faces per image are aligned and embedded (the main faces,
  in `face_order`);
- a time limit: past `seconds`, the request stops at its next stage (decoding an image,
  detecting, embedding) with 503, before anything is stored.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from PIL import Image

from facelab.data.images import ImageError, ImageTooLarge, decode_image
from facelab.serve.inputs import ApiError, Upload

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("deadline", default=None)


@dataclass(frozen=True)
class WorkLimits:
    max_pixels: int  # per image, from its header
    max_request_pixels: int  # all images of one request, from their headers
    max_side: int  # longer side of the image detection sees
    max_faces: int  # per image
    seconds: float  # per request


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Work in this context (this thread) must finish within `seconds` (`check_deadline`)."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline(stage: str) -> None:
    """503 when the current request is past its time limit (a no-op outside one)."""
    current = _DEADLINE.get()
    if current is not None and time.monotonic() > current[0]:
        raise ApiError(
            503,
            "timeout",
            f"request over its {current[1]:g} s time limit (at {stage}); nothing was stored",
        )


@dataclass(frozen=True)
class Decoded:
    """An upload decoded at working size; `scale` = working / original pixels (<= 1)."""

    image: np.ndarray
    scale: float

    def original_box(self, box: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if box is None else tuple(v / self.scale for v in box)


def declared_pixels(upload: Upload) -> int:
    """Width x height from the image header (no decoding); 0 when unreadable (decoding then
    names the fault)."""
    try:
        with Image.open(io.BytesIO(upload.data)) as img:
            return img.width * img.height
    except Exception:  # any fault is reported by decode_image next
        return 0


def working_size(image: np.ndarray, max_side: int) -> Decoded:
    """`image` reduced so that its longer side is at most `max_side`: box-filter reduction by
    a whole factor first (cheap), then a bilinear resize to the exact size."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return Decoded(image, 1.0)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(image)
    factor = int(1 / scale)
    if factor >= 2:
        img = img.reduce(factor)
    return Decoded(np.asarray(img.resize(size, Image.Resampling.BILINEAR)), size[0] / w)


def decode_uploads(uploads: Sequence[Upload], limits: WorkLimits) -> list[Decoded]:
    """The uploads decoded at working size, within the per-image and per-request pixel limits
    (413) and the time limit; an undecodable image is 422 naming its field and file."""
    total = sum(declared_pixels(u) for u in uploads)
    if total > limits.max_request_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the images declare {total} pixels together, over the "
            f"{limits.max_request_pixels} pixel limit of one request",
        )
    decoded = []
    for upload in uploads:
        check_deadline(f"decoding {upload.field}")
        try:
            image = decode_image(upload.data, upload.filename, limits.max_pixels)
        except ImageTooLarge as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except ImageError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from None
        decoded.append(working_size(image, limits.max_side))
        del image
    return decoded
