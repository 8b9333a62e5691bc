"""Recipes: every config loads, and the two fastest run their smoke path end to end on LFW."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from facelab.cli import main
from facelab.data.trials import read_trials
from facelab.recipes import smoke_config, smoke_overrides_path
from facelab.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The course recipes; other configs/ files are experiments with their own documented commands.
COURSE_RECIPES = (
    "thumbnail_shufflenetv2",
    "thumbnail_mobilenetv2",
    "resnet18_112",
    "classify_224",
    "oneshot_inception",
)
RECIPES = [CONFIGS / f"{name}.yaml" for name in COURSE_RECIPES]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_is_a_valid_training_configuration(config: Path) -> None:
    cfg = TrainConfig.from_yaml(config)  # unknown or invalid options raise
    assert cfg.data and cfg.out.startswith("runs/"), config


def test_every_recipe_has_a_documented_header_and_a_smoke_run() -> None:
    for recipe in RECIPES:
        header = recipe.read_text().split("\n\n")[0]
        assert header.startswith("# Recipe:"), recipe
        assert f"--config configs/{recipe.name} --smoke" in header, recipe
        assert smoke_overrides_path(recipe).is_file(), recipe
        cfg, subset = smoke_config(recipe)  # the merged options are valid TrainConfig fields
        assert cfg.max_minutes and subset.get("identities"), recipe


def near_ties(scores: np.ndarray, labels: list[int], within: float = 2e-6) -> float:
    """The fraction of genuine-impostor pairs whose scores lie `within` of each other: how far
    two AUCs of one model on one trial list can drift through rounding alone (six decimals,
    +-5e-7 a score, and float32 noise between two embedding paths)."""
    same = np.array(labels) == 1
    gaps = np.abs(scores[same][:, None] - scores[~same][None, :])
    return float(np.mean(gaps <= within))


@pytest.mark.parametrize("recipe", ["thumbnail_shufflenetv2", "thumbnail_mobilenetv2"])
def test_fast_recipe_smoke_end_to_end(recipe: str, lfw: Path, tmp_path: Path) -> None:
    out = tmp_path / recipe
    tiny = [
        f"data={lfw / 'images'}",
        f"exclude_people=[{lfw / 'pairsDevTest.txt'}]",
        f"val_trials={lfw / 'pairsDevTest.txt'}",
        "subset={identities: 4, images_per_identity: 10, trials: 40}",
        "val_fraction=0.2",
        "batch_size=8",
        "cache_dir=null",
    ]
    argv = ["train", "--config", str(CONFIGS / f"{recipe}.yaml"), "--smoke", "--out", str(out)]
    assert main([*argv, "--epochs", "1", "--set", *tiny]) == 0
    report = json.loads((out / "smoke.json").read_text())
    last = report["last_epoch"]
    assert report["epochs"] == 1 and report["train_images"] == 32

    with (out / "predictions.csv").open() as fh:
        predictions = list(csv.reader(fh))
    assert predictions[0] == ["id", "label"] and len(predictions) == 1 + 8
    assert [row[0] for row in predictions[1:]] == [f"{i:05d}.jpg" for i in range(8)]
    # the submission path classifies the held-out images exactly as training's evaluation did
    assert report["predict"]["accuracy"] == pytest.approx(last["val_top1"])

    with (out / "scores.csv").open() as fh:
        scores = list(csv.reader(fh))
    assert scores[0] == ["Id", "Category"] and len(scores) == 1 + 40
    assert len(scores[1][0].split(" ")) == 2 and -1 <= float(scores[1][1]) <= 1
    # the same model on the same trials: the AUCs differ at most by the genuine-impostor pairs
    # whose order rounding can swap (exactly equal for shufflenetv2 here; mobilenetv2's one
    # epoch leaves all 40 scores within 6e-5 of each other, and 0.005 apart)
    auc = report["score"]["auc"]
    labels = [t.label for t in read_trials(out / "smoke_trials.csv")]
    values = np.array([float(row[1]) for row in scores[1:]])
    assert auc == pytest.approx(last["val_auc"], abs=near_ties(values, labels) + 1e-12)
    oneshot = report["score"]["oneshot"]
    assert oneshot["enrolled"] > 0 and oneshot["impostors"] > 0
    assert 0 <= oneshot["dir_at_far_0.01"] <= oneshot["rank1"] <= 1
