"""Reading images from disk with errors that name the file."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# Decompression bombs: refuse images with more pixels than this before decoding them.
MAX_PIXELS = 64_000_000


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


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into an RGB uint8 array of shape (H, W, 3)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {img.width}x{img.height} exceeds the {max_pixels} pixel limit"
                )
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on open
        raise ImageTooLarge(f"{name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name}: not a readable image ({exc})") from exc


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); a missing or corrupt file raises ImageError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror})") from exc
    return decode_image(data, str(path))
