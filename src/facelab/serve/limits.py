"""Bounded work per request: what one upload may cost the server.

A 3 KB PNG may declare 24 million blank pixels; detection on it at full size took seconds and
a gigabyte. So each request is held to

- a pixel budget: the pixels all its images declare (read from their headers, before any is
  decoded) may not exceed `max_request_pixels` (413);
- a working size: each image is decoded straight to a longer side of at most `max_side`
  (`decode_image(max_side=...)`: JPEG draft mode, whole-factor reduction, then a resize), so
  detection never sees, and memory never holds, the full size (boxes are reported in the
  original image's pixels);
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


def declared_size(upload: Upload) -> tuple[int, int]:
    """(width, height) from the image header (no decoding); (0, 0) when unreadable (decoding
    then names the fault)."""
    try:
        with Image.open(io.BytesIO(upload.data)) as img:
            return img.width, img.height
    except Exception:  # any fault is reported by decode_image next
        return 0, 0


def decode_uploads(uploads: Sequence[Upload], limits: WorkLimits) -> list[Decoded]:
    """The uploads decoded at working size, within the per-image and per-request pixel limits
    (413) and the time limit; an undecodable image is 422 naming its field and file."""
    sizes = [declared_size(u) for u in uploads]
    total = sum(w * h for w, h in sizes)
    if total > limits.max_request_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the images declare {total} pixels together, over the "
            f"{limits.max_request_pixels} pixel limit of one request",
        )
    decoded = []
    for upload, declared in zip(uploads, sizes, strict=True):
        check_deadline(f"decoding {upload.field}")
        try:  # decoded straight to working size: a large JPEG is never held at full size
            image = decode_image(upload.data, upload.filename, limits.max_pixels, limits.max_side)
        except ImageTooLarge as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except ImageError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from None
        decoded.append(Decoded(image, max(image.shape[:2]) / max(max(declared), 1)))
    return decoded
