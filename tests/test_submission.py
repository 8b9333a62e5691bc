"""Submission files (predict, score), data check and layout, on tiny synthetic data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_folder

from facelab import api
from facelab.cli import main
from facelab.data.check import check_dataset
from facelab.data.images import read_image
from facelab.data.layout import layout_from_labels
from facelab.data.trials import read_trials
from facelab.gallery.service import write_mapping_csv
from facelab.models.checkpoint import CheckpointError, save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess
from facelab.models.registry import HEADS
from facelab.submission import predict_folder, trial_images, write_scores
from facelab.train import TrainConfig


def tiny_model() -> FaceModel:
    torch.manual_seed(0)
    model = FaceModel.create(
        "shufflenetv2", preprocess=Preprocess(size=32, crop=1.0), embedding_dim=16, input_size=32
    )
    return model.eval()


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture()
def people(tmp_path: Path) -> Path:
    return write_synthetic_folder(tmp_path / "people", people=3, per_person=4, size=40)


def write_trials(root: Path, path: Path, header: bool, sep: str) -> Path:
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    n = len(images)
    pairs = [(images[i], images[(i + k) % n]) for i in range(n) for k in (1, 5)]
    lines = (["img1,img2"] if header else []) + [f"{a}{sep}{b}" for a, b in pairs]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("header", "sep"), [(True, ","), (False, " ")])
def test_score_file_streams_same_scores_as_unchunked(
    people: Path, tmp_path: Path, header: bool, sep: str
) -> None:
    trials = write_trials(people, people / "trials.txt", header, sep)
    model = tiny_model()
    summary = api.score_trial_file(model, trials, tmp_path / "scores.csv", chunk_size=5)
    rows = read_rows(tmp_path / "scores.csv")
    expected = api.score_trials(model, read_trials(trials))  # all trials in memory at once
    assert rows[0] == ["Id", "Category"]
    assert summary.trials == len(rows) - 1 == len(expected) == 24 and summary.images == 12
    listed = [ln.replace(",", " ") for ln in trials.read_text().splitlines()[int(header) :]]
    assert [r[0] for r in rows[1:]] == listed  # id = "img1 img2" as the list writes them
    scores = np.array([float(r[1]) for r in rows[1:]])
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert summary.trials_per_s > 0

    # chunk boundaries anywhere (1, 7, one chunk) write the same bytes
    names = trial_images(trials)
    emb = api.embed(model, [people / n for n in names])
    outputs = []
    for chunk in (1, 7, 1000):
        out = tmp_path / f"chunk{chunk}.csv"
        assert write_scores(trials, names, emb, out, ("id", "match"), "index", chunk) == 24
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    rows = read_rows(tmp_path / "chunk7.csv")
    assert rows[0] == ["id", "match"] and [r[0] for r in rows[1:]] == [str(i) for i in range(24)]


def test_score_command(people: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trials = write_trials(people, tmp_path / "pairs.csv", True, ",")
    model_path = save_checkpoint(tmp_path / "m.pt", tiny_model())
    out = tmp_path / "sub.csv"
    argv = ["score", str(model_path), str(trials), "--out", str(out), "--images-root", str(people)]
    assert main([*argv, "--columns", "Id,Category", "--id", "index", "--chunk-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 24 and summary["trials_per_s"] > 0
    assert read_rows(out)[1][0] == "0"
    assert main([*argv, "--columns", "just-one"]) == 2


def classifier_checkpoint(data: Path, path: Path) -> tuple[Path, FaceModel, torch.nn.Module]:
    model = tiny_model()
    classes = sorted(p.name for p in data.iterdir())
    head = HEADS.create("softmax", embedding_dim=16, num_classes=len(classes))
    with torch.no_grad():
        head.fc.bias.copy_(torch.tensor([3.0, -2.0, 0.5]))  # logits' argmax != normalised one
    save_checkpoint(
        path,
        model,
        head={"name": "softmax", "embedding_dim": 16, "classes": classes},
        head_state=head.state_dict(),
        config=TrainConfig(data=str(data), min_images=1).to_dict(),
    )
    return path, model, head.eval()


def test_predict_flat_folder(people: Path, tmp_path: Path) -> None:
    checkpoint, model, head = classifier_checkpoint(people, tmp_path / "clf.pt")
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for i, src in enumerate(sorted(people.rglob("*.jpg"))):
        shutil.copy(src, test_dir / f"{i:03d}.jpg")
    rows = predict_folder(checkpoint, test_dir, tmp_path / "pred.csv", progress=False)
    written = read_rows(tmp_path / "pred.csv")
    assert written[0] == ["id", "label"] and [tuple(r) for r in written[1:]] == rows
    assert [r[0] for r in rows] == [f"{i:03d}.jpg" for i in range(12)]

    faces = torch.stack(
        [model.preprocess.to_tensor(read_image(p)) for p in sorted(test_dir.iterdir())]
    )
    with torch.no_grad():
        expected = head(model.backbone(faces)).argmax(1)  # raw features, head bias included
    classes = sorted(p.name for p in people.iterdir())
    assert [r[1] for r in rows] == [classes[k] for k in expected]

    out = tmp_path / "pred2.csv"
    argv = ["predict", str(checkpoint), str(test_dir), "--out", str(out), "--columns", "Id,Label"]
    assert main(argv) == 0 and read_rows(out)[0] == ["Id", "Label"]

    plain = save_checkpoint(tmp_path / "plain.pt", model, config={"loss": "triplet-batch-hard"})
    with pytest.raises(CheckpointError, match="no classification head"):
        predict_folder(plain, test_dir)


def test_mapping_csv_uses_the_same_writer(tmp_path: Path) -> None:
    rows = [("00001.jpg", "Ann", 0.9), ("00002.jpg", "Bob", 0.4)]
    default = read_rows(write_mapping_csv(rows, tmp_path / "a.csv"))
    custom = read_rows(write_mapping_csv(rows, tmp_path / "b.csv", ("Id", "Expected")))
    assert default[0] == ["image", "identity"] and custom[0] == ["Id", "Expected"]
    assert default[1:] == custom[1:] == [["00001.jpg", "Ann"], ["00002.jpg", "Bob"]]


def test_data_check_finds_leaks_and_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "ds"
    write_synthetic_folder(root / "train", people=3, per_person=3)
    write_synthetic_folder(root / "val", people=2, per_person=2)
    (root / "test").mkdir()
    leaked = root / "train" / "person_1" / "person_1_0002.jpg"
    shutil.copy(leaked, root / "test" / "0001.jpg")  # same bytes under another name
    shutil.copy(root / "val" / "person_0" / "person_0_0000.jpg", root / "test" / "0002.jpg")
    (root / "train" / "person_2" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "notes.txt").write_text("not an image")

    splits = {name: root / name for name in ("train", "val", "test")}
    check = check_dataset(splits, workers=2)
    summary = check.summary()
    assert summary["splits"]["train"]["identities"] == 3
    assert summary["splits"]["train"]["images"] == 9  # the broken file is not counted
    assert summary["splits"]["train"]["ignored_files"] == 1
    assert summary["splits"]["test"]["flat_images"] == 2
    assert [Path(p).name for p, _ in check.unreadable] == ["broken.jpg"]
    assert check.cross_split_duplicates and not check.ok
    groups = [sorted(g) for g in check.cross_split_duplicates]
    assert [f"test:{root / 'test' / '0001.jpg'}", f"train:{leaked}"] in groups
    # val and train synthetic folders share generated images: person_0 of both is the same
    assert len(groups) >= 2

    argv = ["data", "check", str(root), "--splits", "train=train", "val=val", "test=test"]
    assert main([*argv, "--out", str(tmp_path / "report.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unreadable"] == 1 and printed["cross_split_duplicates"] >= 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["per_identity"]["train"]["person_2"] == 3
    with pytest.raises(SystemExit):
        main([*argv, "--strict"])
    clean = check_dataset({"all": root / "val"})
    assert clean.ok and clean.summary()["splits"]["all"]["images_per_identity"]["max"] == 2


def test_data_layout_from_labels_csv(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(b"x")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,identity\n0.jpg,Ann\n1.jpg,Ann\n2.jpg,Bob\n9.jpg,Bob\n")
    layout = layout_from_labels(src, labels, tmp_path / "ids")
    assert (layout.linked, layout.identities, layout.missing) == (3, 2, ["9.jpg"])
    linked = sorted(p.relative_to(tmp_path / "ids").as_posix() for p in layout.dest.rglob("*.jpg"))
    assert linked == ["Ann/0.jpg", "Ann/1.jpg", "Bob/2.jpg"]
    assert (layout.dest / "Ann" / "0.jpg").is_symlink()
    labels.write_text("0.jpg,../escape\n")
    with pytest.raises(ValueError, match="cannot be a folder name"):
        layout_from_labels(src, labels, tmp_path / "ids")
