"""Reading images from disk with errors that name the file.

Every image facelab reads (CLI, API, server uploads, training data) becomes RGB uint8 here, the
same way whatever the file holds:

- EXIF orientation is applied (a phone photo stored sideways is turned upright);
- 16-bit greyscale ("I;16", "I;16B", "I;16L", and "I" holding 0..65535) is scaled by the
  type's range, v * 255 / 65535, never clipped; other 32-bit integer ("I") and float ("F")
  images are scaled from their own min..max range (floats already in 0..1 by 255);
- transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, the backdrop
  of ID and studio photos (a black one would merge with dark hair);
- CMYK, palette, 1-bit, YCbCr and LAB images go through Pillow's conversion to RGB.

Only regular files are read, at most MAX_FILE_BYTES: a FIFO, a device (a symlink to /dev/zero
named .jpg) or a folder is refused before any byte is read, so nothing hangs or fills memory.
Images with more than MAX_PIXELS pixels are refused from their header, and images with a side
shorter than MIN_IMAGE_SIDE after decoding (empty, 1x1) are refused: no face fits in them.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Decompression bombs: refuse images with more pixels than this before decoding them.
MAX_PIXELS = 64_000_000
# Largest image file read: well above any photo (a 50-megapixel JPEG is about 25 MB).
MAX_FILE_BYTES = 50 * 1024 * 1024
# Smallest image side accepted: below this no face detector or landmark model can work (the
# pipeline enlarges anything from here up to its detector's needs).
MIN_IMAGE_SIDE = 8


class ImageError(ValueError):
    """An image could not be read; the message names the file and the reason."""


class ImageTooLarge(ImageError):
    """An image has more pixels than allowed (refused from its header, before decoding)."""


# Malformed input: what Pillow itself takes as "not this format" when opening (SyntaxError,
# IndexError, TypeError, struct.error), and what its decoders raise on mutated images
# (OSError, ValueError, NotImplementedError: seen fuzzing tests/test_fuzz.py's seeds).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    NotImplementedError,
    IndexError,
    TypeError,
    struct.error,
)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


def _scaled_to_bytes(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as an 8-bit "L" image (module docstring)."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT or (
        img.mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535
    ):
        low, high = 0.0, 65535.0
    elif img.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        low, high = 0.0, 1.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    span = high - low if high > low else 1.0
    grey = np.clip(np.nan_to_num((values - low) / span * 255, nan=0.0), 0, 255)
    return Image.fromarray(np.round(grey).astype(np.uint8))


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow image as RGB uint8 (H, W, 3), by the rules of the module docstring."""
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        img = _scaled_to_bytes(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        img = Image.alpha_composite(backdrop, rgba)
    return np.asarray(img.convert("RGB"))


def _downscaled(img: Image.Image, max_side: int) -> Image.Image:
    """The image with its longer side at most `max_side`. Pillow's `thumbnail` has a JPEG
    decoded at a reduced DCT scale (`draft`), never at full size, and reduces any image by
    whole factors (`reduce`) before the final resampling."""
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=2.0)
    return img


def check_image_array(image: np.ndarray, name: str) -> np.ndarray:
    """An in-memory image as the pipeline takes it: RGB uint8 (H, W, 3) (grey (H, W) is made
    RGB), each side at least MIN_IMAGE_SIDE; anything else raises ImageError naming it."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = getattr(image, "dtype", type(image).__name__)
        raise ImageError(f"{name}: expected a uint8 RGB array, got {got}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name}: expected an (H, W, 3) RGB array, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        h, w = image.shape[:2]
        raise ImageError(
            f"{name}: a {w}x{h} image is too small for a face "
            f"(each side needs at least {MIN_IMAGE_SIDE} pixels)"
        )
    return image


_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_image(
    data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS, max_side: int | None = None
) -> np.ndarray:
    """Decode encoded image bytes into an RGB uint8 array of shape (H, W, 3), upright.

    max_side: when given, the longer side of the result is at most this many pixels, and
    JPEGs are never decoded at full size to get there (`_downscaled`)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {img.width}x{img.height} exceeds the {max_pixels} pixel limit"
                )
            picture = img if max_side is None else _downscaled(img, max_side)
            if picture.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                picture = ImageOps.exif_transpose(picture)
            image = to_rgb(picture)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on open
        raise ImageTooLarge(f"{name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        reason = _BUFFER_REPR.sub("", str(exc))  # Pillow names its in-memory buffer object
        raise ImageError(f"{name}: not a readable image ({reason})") from exc
    return check_image_array(image, name)


def read_image_bytes(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; anything else raises ImageError.

    The file is opened without blocking and checked on the open descriptor, so a FIFO (or a
    file swapped for one after a check) cannot hang the reader, and a device cannot be read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{path}: not a regular file (a folder)")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path}: not a regular file (a FIFO, socket or device)")
        raise ImageError(
            f"{path}: {info.st_size} bytes exceeds the {max_bytes} byte limit for an image"
        )
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{path}: cannot be read ({exc.strerror})") from exc
    if len(data) > max_bytes:  # grew after the check
        raise ImageError(f"{path}: larger than the {max_bytes} byte limit for an image")
    return data


def read_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), upright; a missing, special, oversized,
    tiny or corrupt file raises ImageError naming it. max_side: as `decode_image`."""
    return decode_image(read_image_bytes(path), str(path), max_side=max_side)
