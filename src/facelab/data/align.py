"""Face alignment: warping a face so its landmarks land on a model's template.

Coordinates are in pixels with pixel (i, j)'s centre at (x=j, y=i), as dlib and MTCNN report
landmarks. `warp_to_template` is the general five-point alignment every `five_point` model
uses; `dlib_face_chip` reproduces dlib's own chip extraction (`dlib.get_face_chip`) so that a
port of a dlib network can be checked on exactly the input dlib feeds it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# dlib's mean face for its 5-point shape model, in unit-face coordinates (x, y), in the
# model's part order: right-of-image eye outer and inner corner, other eye outer and inner
# corner, base of the nose (dlib/image_transforms/interpolation.h, get_face_chip_details).
DLIB_FIVE_POINT_UNIT_FACE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)

# insightface's five-point template for 112x112 ArcFace inputs (arcface_torch, skimage
# SimilarityTransform onto these points), in MTCNN's landmark order: left eye, right eye, nose,
# left and right mouth corner.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (scale, rotation, translation; no reflection) taking src to dst.

    Umeyama's method, as dlib's find_similarity_transform. Returns the 2x3 matrix M with
    dst ~= M[:, :2] @ p + M[:, 2] for each point p of src.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(
            f"need two matching (N>=2, 2) point arrays, got {src.shape} and {dst.shape}"
        )
    mean_src, mean_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    var_src = (src_c**2).sum() / len(src)
    cov = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    det = np.linalg.det(cov)
    if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        signs[1] = -1  # numpy sorts singular values, so the smaller one is last
    rotation = u @ np.diag(signs) @ vt
    scale = (d * signs).sum() / var_src if var_src > 0 else 1.0
    linear = scale * rotation
    return np.hstack([linear, (mean_dst - linear @ mean_src)[:, None]])


def warp_to_template(
    image: np.ndarray, landmarks: np.ndarray, template: np.ndarray, size: int
) -> np.ndarray:
    """Cut the (size, size) face whose landmarks best match `template` (output pixels).

    image: RGB uint8 (H, W, 3); landmarks and template: matching (N, 2) points, x then y.
    The similarity is fitted from template to image points, then the image is sampled
    bilinearly; outside the image is black. When the face is more than twice the output size
    the image is box-reduced first, so the bilinear sampling does not alias.
    """
    matrix = similarity_transform(np.asarray(template), np.asarray(landmarks))
    scale = math.hypot(matrix[0, 0], matrix[1, 0])  # image pixels per output pixel
    picture = Image.fromarray(np.ascontiguousarray(image))
    factor = int(scale // 2) * 2 if scale >= 2 else 1
    if factor > 1:
        # A reduced pixel i averages source pixels [i*f, i*f + f - 1], centred at i*f + (f-1)/2.
        picture = picture.reduce(factor)
        matrix = matrix / factor
        matrix[:, 2] -= (factor - 1) / (2 * factor)
    # PIL samples output pixel (x, y) at its centre (x + 0.5, y + 0.5) and reads source
    # coordinates with pixel centres at +0.5; shift our centre-at-integer convention to match.
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    warped = picture.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.array(warped)  # a writable copy: torch.from_numpy warns on read-only arrays


def dlib_chip_points(size: int = 150, padding: float = 0.25) -> np.ndarray:
    """Where dlib puts its five shape points in a (size, size) chip (dlib's part order)."""
    return (padding + DLIB_FIVE_POINT_UNIT_FACE) / (2 * padding + 1) * size


def _rect_area(rect: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = rect
    if left > right or top > bottom:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """dlib's pyramid_down<2>::rect_down."""
    left, top, right, bottom = rect
    return (left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75)


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> on RGB: separable [1 4 6 4 1] filter, every other row/column,
    integer sums divided by 256 with truncation."""
    rows, cols = image.shape[:2]
    if rows <= 8 or cols <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    x = image.astype(np.int64)
    out_cols = (cols - 3) // 2
    taps = np.array([1, 4, 6, 4, 1])
    horiz = sum(w * x[:, i : i + 2 * out_cols : 2] for i, w in enumerate(taps))
    out_rows = (rows - 3) // 2
    vert = sum(w * horiz[i : i + 2 * out_rows : 2] for i, w in enumerate(taps))
    return (vert // 256).astype(np.uint8)


def _bilinear_truncate(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear: 0 unless all four neighbours exist, result truncated."""
    left, top = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    rows, cols = image.shape[:2]
    inside = (left >= 0) & (top >= 0) & (left + 1 < cols) & (top + 1 < rows)
    left, top = np.where(inside, left, 0), np.where(inside, top, 0)
    lr = (xs - left)[..., None]
    tb = (ys - top)[..., None]
    px = image.astype(np.float64)
    tl, tr = px[top, left], px[top, left + 1]
    bl, br = px[top + 1, left], px[top + 1, left + 1]
    value = (1 - tb) * ((1 - lr) * tl + lr * tr) + tb * ((1 - lr) * bl + lr * br)
    return np.where(inside[..., None], value, 0).astype(np.uint8)


def dlib_face_chip(
    image: np.ndarray, dlib_points5: np.ndarray, size: int = 150, padding: float = 0.25
) -> np.ndarray:
    """The chip `dlib.get_face_chip(image, shape, size, padding)` returns, without dlib.

    dlib_points5: the five parts of dlib's 5-point shape model, (5, 2) x then y. Follows
    dlib's get_face_chip_details and extract_image_chips step by step (including the
    image pyramid for faces much larger than the chip), so the chips agree to within
    floating-point rounding of the last bit.
    """
    image = np.asarray(image)
    matrix = similarity_transform(dlib_chip_points(size, padding), np.asarray(dlib_points5))
    angle = math.atan2(matrix[1, 0], matrix[0, 0])
    side = size * math.hypot(matrix[0, 0], matrix[1, 0]) - 1  # centered_drect subtracts 1
    cx, cy = matrix[:, :2] @ np.array([size / 2, size / 2]) + matrix[:, 2]
    rect = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def rotated_corners(r: tuple[float, float, float, float]) -> np.ndarray:
        """tl, tr, bl, br corners of r rotated by the chip angle about r's centre."""
        centre = np.array([(r[0] + r[2]) / 2, (r[1] + r[3]) / 2])
        corners = np.array([[r[0], r[1]], [r[2], r[1]], [r[0], r[3]], [r[2], r[3]]]) - centre
        rot = np.array([[cos_a, -sin_a], [sin_a, cos_a]])
        return corners @ rot.T + centre

    # The sub-image dlib samples from: the rotated rectangle grown by a border that doubles
    # (plus 2) per pyramid level, clipped to the image and rounded to whole pixels.
    chip_area = size * size
    depth, grow, down = 0, 2.0, _rect_down(rect)
    while _rect_area(down) > chip_area:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    corners = rotated_corners(rect)
    rows, cols = image.shape[:2]
    box = [
        max(corners[:, 0].min() - grow, 0.0),
        max(corners[:, 1].min() - grow, 0.0),
        min(corners[:, 0].max() + grow, cols - 1.0),
        min(corners[:, 1].max() + grow, rows - 1.0),
    ]
    left, top, right, bottom = (math.floor(v + 0.5) for v in box)
    if left > right or top > bottom:  # the face lies entirely outside the image
        return np.zeros((size, size, 3), np.uint8)
    source = image[top : bottom + 1, left : right + 1]

    local = (rect[0] - left, rect[1] - top, rect[2] - left, rect[3] - top)
    while _rect_area(_rect_down(local)) > chip_area:
        source, local = _pyramid_down(source), _rect_down(local)

    tl, tr, bl, _ = rotated_corners(local)
    step_x, step_y = (tr - tl) / (size - 1), (bl - tl) / (size - 1)
    cols_, rows_ = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    xs = step_x[0] * cols_ + step_y[0] * rows_ + tl[0]
    ys = step_x[1] * cols_ + step_y[1] * rows_ + tl[1]
    return _bilinear_truncate(source, xs, ys)
