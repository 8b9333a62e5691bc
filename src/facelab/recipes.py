"""Recipes (the classic course settings, one YAML file each in `configs/`) and their smoke runs.

A recipe is a file of `TrainConfig` fields whose header comment says what it reproduces and
how to run it in full. Its smoke run, `facelab train --config configs/X.yaml --smoke`, lays
`configs/smoke/X.yaml` (LFW from ../shared, few epochs, a time budget) over it; that file's
`subset` entry shrinks the data: the `identities` people with the most images (the trial
list's people left out), `images_per_identity` of each, linked into the run folder, and
`trials` evenly spaced trials of `val_trials`. It trains on CPU, then writes what the
assignment asks for and checks it against the answers it knows, so a broken submission path
shows up in minutes rather than on a leaderboard:

- a classification head: `predictions.csv` (`id,label`) for a flat test folder made of links
  to the run's held-out images, named by number so that no file name gives the identity
  away, and the accuracy of those predictions;
- a trial list (`val_trials`): `scores.csv` (`Id,Category`) for the list with its labels
  removed, the AUC of the scores read back from that file, the 1:1 threshold at FAR 1%, and a
  one-shot 1:K check over the same images (`oneshot_identification`).

Everything lands in `smoke.json` in the run folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from facelab.api import load_model, run_folder, run_images
from facelab.data.trials import read_trials
from facelab.eval.identification import detection_identification_rate, rank_k_accuracy
from facelab.eval.metrics import roc_auc, tpr_at_fpr
from facelab.fileio import atomic_write_text
from facelab.models.checkpoint import load_checkpoint
from facelab.pipeline import embed_images
from facelab.submission import load_classifier, predict_folder, trial_images, write_scores
from facelab.train import TrainConfig, train
from facelab.train.config import read_options

log = logging.getLogger(__name__)

SMOKE_FOLDER = "smoke"
FAR = 0.01  # the false-accept rate the smoke's thresholds are set for
SUBSET_KEYS = ("identities", "images_per_identity", "trials")


def smoke_overrides_path(config: str | Path) -> Path:
    """configs/X.yaml -> configs/smoke/X.yaml."""
    config = Path(config)
    return config.parent / SMOKE_FOLDER / config.name


def smoke_config(config: str | Path, **overrides: Any) -> tuple[TrainConfig, dict[str, int]]:
    """The recipe with its smoke overrides, then `overrides` (e.g. from --set) on top; the
    `subset` entry ({identities, images_per_identity, trials}) is returned apart, since it
    shapes the data rather than the training."""
    path = smoke_overrides_path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no smoke overrides for {config}")
    merged = {**read_options(config), **read_options(path), **overrides}
    subset = merged.pop("subset", None) or {}
    unknown = set(subset) - set(SUBSET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown subset key(s) {sorted(unknown)}; use {SUBSET_KEYS}")
    return TrainConfig.from_dict(merged, source=str(path)), subset


def link_subset(cfg: TrainConfig, identities: int, images_per_identity: int, dest: Path) -> Path:
    """An identity folder of links to the first images of the `identities` people with the
    most images, chosen after `cfg.exclude_people` is applied (so the trial list's people
    stay out of training)."""
    folder = run_folder(cfg.to_dict())
    images: dict[str, list[Path]] = {}
    for sample in folder.samples:
        images.setdefault(folder.identities[sample.label], []).append(sample.path)
    chosen = sorted(images, key=lambda name: (-len(images[name]), name))[:identities]
    if dest.exists():
        shutil.rmtree(dest)  # links only: rebuilt so that a smaller subset leaves nothing behind
    for name in chosen:
        (dest / name).mkdir(parents=True)
        for path in images[name][:images_per_identity]:
            (dest / name / path.name).symlink_to(path.resolve())
    return dest


def sample_trials(path: str | Path, count: int, dest: Path) -> Path:
    """`count` evenly spaced trials of a labelled list (LFW lists hold their same pairs, then
    their different ones, so both kinds are kept) as an `img1,img2,label` CSV of absolute
    paths (the CSV lives elsewhere than the images)."""
    trials = read_trials(path)
    picked = np.unique(np.linspace(0, len(trials) - 1, min(count, len(trials))).round())
    rows = [trials[int(i)] for i in picked]
    lines = (f"{t.a.absolute()},{t.b.absolute()},{t.label}\n" for t in rows)
    return atomic_write_text(dest, "".join(lines))


def oneshot_identification(
    names: Sequence[str], embeddings: np.ndarray, far: float = FAR
) -> dict[str, Any]:
    """One-shot 1:K identification over images whose folder names the person: each person's
    first image is enrolled, their other images are mated probes, and people with a single
    image are non-mated probes (impostors). Returns closed-set rank-1 and, at the threshold
    that keeps the impostors' false-alarm rate at `far`, the open-set DIR."""
    people: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        people.setdefault(Path(name).parent.name, []).append(i)
    gallery = [ix[0] for ix in people.values() if len(ix) > 1]
    probes = [i for ix in people.values() if len(ix) > 1 for i in ix[1:]]
    impostors = [ix[0] for ix in people.values() if len(ix) == 1]
    if not probes or not impostors:
        raise ValueError("one-shot identification needs people with two images and with one")
    person = np.array([Path(n).parent.name for n in names])
    sims = embeddings[probes] @ embeddings[gallery].T
    impostor_max = (embeddings[impostors] @ embeddings[gallery].T).max(axis=1)
    rate, threshold = detection_identification_rate(
        sims, person[probes], person[gallery], impostor_max, far
    )
    return {
        "enrolled": len(gallery),
        "probes": len(probes),
        "impostors": len(impostors),
        "rank1": rank_k_accuracy(sims, person[probes], person[gallery], 1),
        f"dir_at_far_{far:g}": rate,
        f"threshold_at_far_{far:g}": threshold,
    }


def _fresh_links(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_symlink():
            old.unlink()


def smoke_predict(checkpoint: Path, out: Path) -> dict[str, Any]:
    """predictions.csv for the run's held-out images, laid out as an unlabelled test folder."""
    clf = load_classifier(checkpoint)
    identities, held_out = run_images(clf.config, "val")
    test_dir = out / "test_images"
    _fresh_links(test_dir)
    truth = {}
    for i, sample in enumerate(held_out):
        link = test_dir / f"{i:05d}{sample.path.suffix}"
        link.symlink_to(sample.path.resolve())
        truth[link.name] = identities[sample.label]
    rows = predict_folder(clf, test_dir, out / "predictions.csv", progress=False)
    return {
        "file": str(out / "predictions.csv"),
        "images": len(rows),
        "accuracy": float(np.mean([truth[image] == label for image, label in rows])),
    }


def smoke_score(checkpoint: Path, trials_path: str | Path, out: Path) -> dict[str, Any]:
    """scores.csv for the trial list without its labels (as an assignment ships it), checked
    against those labels, and the one-shot identification check on the same embeddings."""
    trials = read_trials(trials_path)
    root = Path(os.path.commonpath([str(p) for t in trials for p in (t.a, t.b)]))
    pairs = out / "test_pairs.txt"
    atomic_write_text(
        pairs,
        "".join(
            f"{t.a.relative_to(root).as_posix()} {t.b.relative_to(root).as_posix()}\n"
            for t in trials
        ),
    )
    names = trial_images(pairs)
    model = load_model(checkpoint)
    embeddings = embed_images(model, [root / n for n in names], progress=False).embeddings
    scores_csv = out / "scores.csv"
    write_scores(pairs, names, embeddings, scores_csv)
    with scores_csv.open(newline="") as fh:
        scores = np.array([float(row[1]) for row in list(csv.reader(fh))[1:]])
    labels = np.array([t.label for t in trials])
    tpr, threshold = tpr_at_fpr(scores, labels, FAR)
    return {
        "file": str(scores_csv),
        "trials": len(scores),
        "auc": roc_auc(scores, labels),
        f"verify_threshold_at_far_{FAR:g}": threshold,
        f"verify_tpr_at_far_{FAR:g}": tpr,
        "oneshot": oneshot_identification(names, embeddings),
    }


def run_smoke(config: str | Path, **overrides: Any) -> dict[str, Any]:
    """Train the recipe's smoke run, write its submission files, check them; see the module
    doc. Returns (and writes to `smoke.json`) the report."""
    cfg, subset = smoke_config(config, **overrides)
    out = Path(cfg.out)
    if "identities" in subset:
        data = out / "smoke_data"
        link_subset(cfg, subset["identities"], subset.get("images_per_identity", 10**9), data)
        cfg = replace(cfg, data=str(data))
    if cfg.val_trials and "trials" in subset:
        trials = sample_trials(cfg.val_trials, subset["trials"], out / "smoke_trials.csv")
        cfg = replace(cfg, val_trials=str(trials))
    began = time.monotonic()
    result = train(cfg)
    trained = time.monotonic()
    report: dict[str, Any] = {
        "recipe": Path(config).stem,
        "command": f"facelab train --config {config} --smoke",
        "backbone": cfg.backbone if cfg.init_from is None else cfg.init_from,
        "loss": cfg.loss,
        "train_images": len(run_images(cfg.to_dict(), "train")[1]),
        "epochs": len([r for r in result.history if "train_loss" in r]),
        "last_epoch": result.history[-1] if result.history else None,
    }
    if load_checkpoint(result.checkpoint).get("head") is not None:
        report["predict"] = smoke_predict(result.checkpoint, out)
    if cfg.val_trials:
        report["score"] = smoke_score(result.checkpoint, cfg.val_trials, out)
    report["train_seconds"] = round(trained - began, 1)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    atomic_write_text(out / "smoke.json", json.dumps(report, indent=2) + "\n")
    log.info("smoke run of %s done in %.0f s: %s", config, report["total_seconds"], out)
    return report
