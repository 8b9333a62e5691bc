"""The pretrained model's LFW evaluations end to end, on small cuts of LFW that run by default:
the README's main job (`facelab eval dlib_resnet .../pairs.txt --out DIR`) on a fold-bearing cut
of View 2 through the 10-fold path, and open-set identification (the `slow` test in
test_gallery.py runs it on all of LFW). Real images from ../shared: skipped without them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facelab import api
from facelab.cli import main
from facelab.eval import best_accuracy, verification_report
from facelab.gallery import eval_identification
from facelab.models.face_model import FaceModel

PER_CLASS = 3  # same and different pairs kept from each fold: 60 pairs, 96 images


def view2_subset(lfw: Path, dest: Path, per_class: int) -> tuple[Path, int]:
    """`pairs.txt` cut to the first `per_class` same and different pairs of each fold (header
    and fold layout kept) beside a link to LFW's images, where the README's command finds them.
    Returns the file and its number of folds."""
    header, *body = (lfw / "pairs.txt").read_text().splitlines()
    folds, size = (int(field) for field in header.split())
    lines = [f"{folds}\t{per_class}"]
    for fold in range(folds):
        pairs = body[2 * size * fold : 2 * size * (fold + 1)]
        lines += pairs[:per_class] + pairs[size : size + per_class]
    dest.mkdir()
    (dest / "images").symlink_to(lfw / "images")
    (dest / "pairs.txt").write_text("\n".join(lines) + "\n")
    return dest / "pairs.txt", folds


def test_readme_eval_runs_the_ten_fold_protocol(
    lfw: Path,
    pretrained_dlib_resnet: FaceModel,  # skips unless its weights are installed
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs, n_folds = view2_subset(lfw, tmp_path / "lfw", PER_CLASS)
    assert n_folds == 10
    seen: dict[str, Any] = {}

    def recording(scores: Any, labels: Any, folds: Any = None, **options: Any) -> dict[str, Any]:
        seen.update(scores=np.asarray(scores), labels=np.asarray(labels), folds=folds)
        return verification_report(scores, labels, folds, **options)

    monkeypatch.setattr(api, "verification_report", recording)
    out = tmp_path / "out"
    assert main(["eval", "dlib_resnet", str(pairs), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (out / "roc.png").stat().st_size > 0 and (out / "scores.png").stat().st_size > 0
    assert report["model"] == "dlib_resnet" and report["pairs"] == 2 * PER_CLASS * n_folds

    # the file's folds reach the metrics: each fold its same pairs, then its different pairs
    per_fold = 2 * PER_CLASS
    np.testing.assert_array_equal(seen["folds"], np.repeat(np.arange(n_folds), per_fold))
    np.testing.assert_array_equal(seen["labels"], np.tile([1] * PER_CLASS + [0] * PER_CLASS, 10))
    s, y, folds = seen["scores"], seen["labels"], seen["folds"]
    assert len(report["kfold_accuracies"]) == len(report["kfold_thresholds"]) == n_folds
    for fold in range(n_folds):
        held_out = folds == fold
        _, threshold = best_accuracy(s[~held_out], y[~held_out])  # chosen on the nine others
        assert report["kfold_thresholds"][fold] == threshold
        accuracy = np.mean((s[held_out] >= threshold) == y[held_out])
        assert report["kfold_accuracies"][fold] == accuracy
    assert report["kfold_mean"] == pytest.approx(np.mean(report["kfold_accuracies"]))

    # the pretrained model's LFW figure is 98.8% on all of View 2; here no more than a few
    # of the 60 pairs may go wrong
    assert report["kfold_mean"] >= 0.95, report["kfold_accuracies"]
    assert report["auc"] >= 0.99


def lfw_people_subset(lfw: Path, dest: Path, people: int, per_person: int) -> Path:
    """An LFW root of the first `people` people (sorted) with two images or more, their first
    `per_person` images, and the first `people` people with one image, linked from ../shared."""
    folders = sorted(p for p in (lfw / "images").iterdir() if p.is_dir())
    chosen = {True: [], False: []}
    for folder in folders:
        images = sorted(folder.glob("*.jpg"))
        group = chosen[len(images) > 1]
        if len(group) < people:
            group.append(images[:per_person])
        if all(len(g) == people for g in chosen.values()):
            break
    for images in chosen[True] + chosen[False]:
        (dest / "images" / images[0].parent.name).mkdir(parents=True)
        for image in images:
            (dest / "images" / image.parent.name / image.name).symlink_to(image)
    return dest


def test_lfw_identification_on_a_cut_of_lfw(
    lfw: Path, pretrained_dlib_resnet: FaceModel, tmp_path: Path
) -> None:
    root = lfw_people_subset(lfw, tmp_path / "lfw", people=8, per_person=4)
    report = eval_identification(pretrained_dlib_resnet, root, out_dir=tmp_path, progress=False)
    assert report["gallery_identities"] == 8 and report["non_mated_probes"] == 8
    assert report["mated_probes"] >= 8
    # the full run: rank-1 and mapping accuracy above 0.9 on all of LFW
    assert report["rank1"] >= 0.9 and report["mapping_accuracy"] >= 0.9, report
    assert 0 < report["dir_at_far_0.01"] <= report["rank1"]
    assert (tmp_path / "dir_far.png").stat().st_size > 0
