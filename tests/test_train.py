"""A tiny end-to-end run on real LFW faces: train, checkpoint, resume, evaluate, classify."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import facelab
from facelab.cli import main
from facelab.models.checkpoint import CheckpointError, load_checkpoint
from facelab.train import TrainConfig, train


def tiny_config(data: Path, out: Path, epochs: int) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out=str(out),
        backbone="mobilefacenet",
        embedding_dim=32,
        image_size=32,
        batch_size=16,
        epochs=epochs,
        lr=0.05,
        val_fraction=0.2,
        cutmix=0.5,
        warmup_epochs=0.5,
        scheduler="warm_restarts",
        t0=1,
        workers=1,
    )


def write_pairs(data: Path, path: Path) -> Path:
    people = sorted(p for p in data.iterdir())
    lines = ["img1,img2,label"]
    for person in people:
        imgs = sorted(person.iterdir())
        lines += [f"{imgs[i]},{imgs[i + 1]},1" for i in range(0, 6, 2)]
    for pa, pb in itertools.combinations(people, 2):
        lines.append(f"{sorted(pa.iterdir())[0]},{sorted(pb.iterdir())[1]},0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_resume_eval_classify(lfw_subset: Path, tmp_path: Path) -> None:
    pairs = write_pairs(lfw_subset, tmp_path / "pairs.csv")
    straight = train(tiny_config(lfw_subset, tmp_path / "a", 2))
    assert [r["epoch"] for r in straight.history] == [1, 2]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in straight.history)

    train(tiny_config(lfw_subset, tmp_path / "b", 1))
    resumed = train(tiny_config(lfw_subset, tmp_path / "b", 2), resume=tmp_path / "b" / "last.pt")
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), f"{key} differs after resume"
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 3

    out = tmp_path / "eval"
    assert main(["eval", str(straight.checkpoint), str(pairs), "--out", str(out), "--flip"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert 0 <= report["auc"] <= 1 and report["pairs"] == 6 * 3 + 15
    for png in ("roc.png", "scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    acc = facelab.classify(straight.checkpoint)
    assert acc["images"] > 0 and 0 <= acc["top1"] <= acc["top5"] <= 1

    model = facelab.load_model(straight.checkpoint)
    img = sorted((lfw_subset / "Tony_Blair").iterdir())[0]
    same = facelab.verify(model, img, img, threshold=0.5)
    assert same.score == pytest.approx(1.0, abs=1e-5) and same.same is True

    # a model-only copy: the same model, config and history, no training state
    small = tmp_path / "model.pt"
    assert (
        main(["export", str(straight.checkpoint), "--format", "checkpoint", "--out", str(small)])
        == 0
    )
    c = load_checkpoint(small)
    assert set(c) == {"kind", "schema", "model", "model_state", "config", "history", "sha256"}
    assert (c["config"], c["history"]) == (a["config"], a["history"])
    assert all(torch.equal(v, a["model_state"][k]) for k, v in c["model_state"].items())
    assert small.stat().st_size < straight.checkpoint.stat().st_size / 1.5
    np.testing.assert_array_equal(
        facelab.embed(facelab.load_model(small), [img]), facelab.embed(model, [img])
    )


def test_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    assert main(["eval", str(bad), str(bad)]) == 2


def test_config_rejects_unknown_option(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: x\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_yaml(cfg)


def test_five_point_alignment_scales_insightface_template() -> None:
    from facelab.data.align import ARCFACE_TEMPLATE_112
    from facelab.train.transfer import training_preprocess

    spec = training_preprocess(TrainConfig(image_size=56, alignment="five_point"))
    assert spec.alignment == "five_point" and spec.size == 56
    assert spec.template == tuple((x / 2, y / 2) for x, y in ARCFACE_TEMPLATE_112)
    assert training_preprocess(TrainConfig(image_size=56)).alignment == "centre_crop"
    with pytest.raises(ValueError, match="alignment must be centre_crop, five_point or teacher"):
        TrainConfig(alignment="dlib_chip")
