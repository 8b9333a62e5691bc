"""How closely a distilled student reproduces its teacher on faces it trained on and on unseen ones.

    python benchmarks/distill_fit.py runs/lfw_student_online_stage3/last.pt [--faces 600]

For an online-teacher student (`alignment: teacher`): `--faces` random training faces of the
checkpoint's run (read from its decoded-face cache) and as many `pairsDevTest.txt` faces are
cut as the teacher cuts them (MTCNN, dlib's template, 150 px), embedded by the teacher
(centred on the run's training mean, as its targets were) and, resized to the student's size
as in training, by the student. The mean student-teacher cosine on training faces measures
fit; the drop to unseen faces, generalisation.
"""

from __future__ import annotations

import argparse
import logging
import random

import numpy as np
import torch
import torch.nn.functional as F
from bench_distill import LFW, training_run

from facelab import load_model
from facelab.data.trials import read_trials, trial_people
from facelab.models.face_model import FaceModel
from facelab.train.batches import decode_faces
from facelab.train.distill import OnlineTeacher, distillation, teacher_preprocess
from facelab.train.losses import build_criterion


def agreement(teacher: OnlineTeacher, student: FaceModel, x: torch.Tensor) -> np.ndarray:
    """Per face (teacher inputs `x`): cosine of the student's embedding to the teacher's
    centred one."""
    cos = []
    with torch.no_grad():
        for start in range(0, len(x), 64):
            teacher_input = x[start : start + 64]
            taught = teacher(teacher_input)
            learnt = student.backbone(teacher.student_view(teacher_input)).float()
            cos.append(F.cosine_similarity(learnt, taught, dim=1))
    return torch.cat(cos).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("student", help="checkpoint of an online-teacher distillation run")
    parser.add_argument("--dev-pairs", default=str(LFW / "pairsDevTest.txt"))
    parser.add_argument("--faces", type=int, default=600, help="faces of each kind")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    run = training_run(args.student)
    if run is None or run[0].teacher is None or run[0].alignment != "teacher":
        raise SystemExit(f"{args.student}: not a checkpoint of an online-teacher run")
    cfg, folder, samples = run
    student, cut = load_model(args.student), teacher_preprocess(cfg.teacher)
    paths = [s.path for s in samples]
    trained_on = decode_faces(paths, cut, cfg.cache_dir, cfg.workers)
    # the run's own online teacher, centred on its training mean (the identity criterion is
    # kept only when identity_weight > 0, and unused here)
    identity = build_criterion(cfg.loss, student.embedding_dim, folder.num_classes)
    online = distillation(cfg, identity, samples, student, torch.device("cpu"), trained_on)[2]

    dev = read_trials(args.dev_pairs)
    unseen = sorted({p for t in dev for p in (t.a, t.b)})
    if trial_people(dev) & {s.path.parent.name for s in samples}:
        raise SystemExit(f"{args.dev_pairs}: its people are in the run's training images")
    rng = random.Random(0)
    trained = rng.sample(range(len(paths)), args.faces)
    tested = rng.sample(unseen, min(args.faces, len(unseen)))
    kinds = {
        "training faces": trained_on[trained],
        "pairsDevTest faces (unseen people)": decode_faces(
            tested, cut, cache_dir=None, workers=cfg.workers
        ),
    }
    print(f"{args.student}: student-teacher cosine (centred teacher targets)")
    print("| faces | n | mean | median | 10th percentile |\n|---|---|---|---|---|")
    for kind, faces in kinds.items():
        cos = agreement(online, student, cut.normalise(faces))
        q10, median = np.quantile(cos, [0.1, 0.5])
        print(f"| {kind} | {len(cos)} | {cos.mean():.3f} | {median:.3f} | {q10:.3f} |")


if __name__ == "__main__":
    main()
