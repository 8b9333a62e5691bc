"""Descriptor agreement with dlib on the same faces: facelab's face handed to dlib itself.

The pipelines of `bench_pipeline.py` and `lfw_pretrained.py` each find their own face (MTCNN's
main face, dlib HOG's largest), so where the detectors pick different people the descriptors
differ for a reason that has nothing to do with the port. Here dlib gets facelab's face: for
each image, MTCNN's main face is mapped to the rectangle dlib's detector would draw
(`dlib_box_from_mtcnn`, what `dlib_resnet_chip` does), then dlib's own shape predictor and
ResNet describe it, and facelab's `dlib_resnet_chip` describes the same rectangle with its ports.
Images where MTCNN finds no face are left out. Prints the cosine mean, median, min and the
share of faces at or above 0.999.

    python benchmarks/dlib_agreement.py [--pairs ../shared/data/lfw/pairs.txt] [--images 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from dlib_reference import DlibPipeline

from facelab import load_model
from facelab.data.images import read_image
from facelab.data.trials import read_trials
from facelab.models.detectors.dlib_landmarks import dlib_box_from_mtcnn
from facelab.models.registry import DETECTORS
from facelab.pipeline import alignment_points, main_face_landmarks

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairs.txt"))
    parser.add_argument("--images", type=int, default=1000, help="the first N distinct images")
    args = parser.parse_args()

    paths = list(dict.fromkeys(p for t in read_trials(args.pairs) for p in (t.a, t.b)))
    images = [read_image(p) for p in paths[: args.images]]
    model = load_model("dlib_resnet_chip").for_inference()
    detector = DETECTORS.create("mtcnn")
    dlib = DlibPipeline()
    ours, theirs = [], []
    for start in range(0, len(images), 32):
        batch = images[start : start + 32]
        for image, found in zip(batch, detector.detect(batch), strict=True):
            marks = main_face_landmarks(found, image.shape)
            if marks is None:
                continue
            box = dlib.dlib.rectangle(*(round(v) for v in dlib_box_from_mtcnn(marks)))
            theirs.append(dlib.descriptor(image, dlib.landmarks(image, box)))
            points = alignment_points(model.preprocess, image, marks)  # same box, ported
            ours.append(model.embed_faces([image], [points], batch_size=1)[0])
    a = np.stack(ours)
    b = np.stack(theirs)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(
        f"{len(cos)} faces of the first {len(images)} images of {Path(args.pairs).name}: "
        f"cosine facelab dlib_resnet_chip vs dlib on the same face: mean {cos.mean():.6f}, "
        f"median {np.median(cos):.6f}, min {cos.min():.6f} (largest 1 - cosine "
        f"{1 - cos.min():.1e}), >= 0.999: {100 * (cos >= 0.999).mean():.2f}%"
    )


if __name__ == "__main__":
    main()
