"""Submission files for unlabelled test sets, in the formats course assignments ask for.

- `predict_folder`: a flat folder of test images -> `id,label` rows (file name -> the identity
  a classification checkpoint's head predicts).
- `score_trial_file`: an unlabelled trial list (`img1,img2` CSV or `img1 img2` lines) ->
  `Id,Category` rows holding cosine scores. Each distinct image is embedded once; the trials
  are then streamed in chunks (read, scored with one einsum, written), so a list of about a
  million trials needs the memory of one chunk, not of the list.

Column names are configurable everywhere, and `facelab map` writes its CSV the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from facelab.data.folders import IMAGE_SUFFIXES
from facelab.data.trials import iter_trial_rows
from facelab.fileio import atomic_write_csv
from facelab.models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.registry import HEADS
from facelab.pipeline import embed_images

log = logging.getLogger(__name__)

PREDICT_COLUMNS = ("id", "label")
SCORE_COLUMNS = ("Id", "Category")
ID_STYLES = ("pair", "index")  # "img1 img2" as in the trial list, or the trial's row number
# Trials scored at a time: two (chunk, D) float32 gathers stay cache-sized; 8192 beat 65536 by
# ~20% CPU time on 900,000 LFW trials (benchmarks/bench_score.py), with less memory.
SCORE_CHUNK = 8192


def parse_columns(text: str | Sequence[str]) -> tuple[str, str]:
    """Two column names, from "Id,Category" or a sequence; anything else is a usage error."""
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    if len(names) != 2 or not all(names):
        raise ValueError(f"expected two column names such as 'Id,Category', not {text!r}")
    return names[0], names[1]


# -- classification: predict ---------------------------------------------------------------------


@dataclass(frozen=True)
class Classifier:
    """A classification checkpoint as one FaceModel whose output is the head's logits.

    The pipeline L2-normalises whatever a model outputs; dividing a row of logits by its
    positive norm keeps its ranking, so argmax / top-k of the "embeddings" are the head's
    predictions, and classification gets the same alignment and batching as embedding.
    """

    model: FaceModel
    classes: tuple[str, ...]
    config: dict[str, Any]


def load_classifier(checkpoint: str | Path) -> Classifier:
    payload = load_checkpoint(checkpoint)
    head_info = payload.get("head")
    if head_info is None:
        raise CheckpointError(
            f"{checkpoint}: no classification head (loss {payload['config'].get('loss')!r}); "
            "score trials with it instead (`facelab score`)"
        )
    model = model_from_checkpoint(payload)
    head = HEADS.create(
        head_info["name"],
        embedding_dim=head_info["embedding_dim"],
        num_classes=len(head_info["classes"]),
        **payload["config"].get("head_options", {}),
    )
    head.load_state_dict(payload["head_state"])
    logits = FaceModel(nn.Sequential(model.backbone, head), model.preprocess, model.name, {})
    return Classifier(logits.eval(), tuple(head_info["classes"]), payload["config"])


def flat_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (a test set's usual layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: test folder does not exist")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(f"{folder}: no image files directly inside (expected a flat folder)")
    return files


def predict_folder(
    classifier: Classifier | str | Path,
    test_dir: str | Path,
    out: str | Path | None = None,
    columns: Sequence[str] = PREDICT_COLUMNS,
    flip: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """(file name, predicted identity) for every image of a flat test folder; with `out`,
    also the submission CSV (header `columns`, default `id,label`)."""
    header = parse_columns(columns)
    clf = classifier if isinstance(classifier, Classifier) else load_classifier(classifier)
    files = flat_images(test_dir)
    logits = embed_images(
        clf.model, files, flip=flip, batch_size=batch_size, progress=progress
    ).embeddings
    rows = [(f.name, clf.classes[k]) for f, k in zip(files, logits.argmax(1), strict=True)]
    if out is not None:
        atomic_write_csv(out, header, rows)
        log.info("%s: %d predictions", out, len(rows))
    return rows


# -- verification: score -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    trials: int
    images: int
    embed_seconds: float
    score_seconds: float  # reading, scoring and writing the trials, after embedding

    @property
    def trials_per_s(self) -> float:
        return self.trials / max(self.score_seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "trials": self.trials,
            "images": self.images,
            "embed_seconds": round(self.embed_seconds, 2),
            "score_seconds": round(self.score_seconds, 2),
            "trials_per_s": round(self.trials_per_s),
            "trials_per_s_overall": round(
                self.trials / max(self.embed_seconds + self.score_seconds, 1e-9)
            ),
        }


def trial_images(trials: str | Path) -> list[str]:
    """The distinct image names of a trial list, as written there, sorted."""
    return sorted({name for _, row in iter_trial_rows(trials) for name in row[:2]})


def iter_scores(
    trials: str | Path, index: dict[str, int], embeddings: np.ndarray, chunk_size: int = SCORE_CHUNK
) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """Chunks of (trial rows, cosine scores): only one chunk's rows and gathered embeddings
    exist at a time. `index` maps an image name to its row of the L2-normalised `embeddings`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    rows = (row for _, row in iter_trial_rows(trials))
    while chunk := list(islice(rows, chunk_size)):
        a = np.fromiter((index[r[0]] for r in chunk), np.int64, len(chunk))
        b = np.fromiter((index[r[1]] for r in chunk), np.int64, len(chunk))
        yield chunk, np.einsum("ij,ij->i", embeddings[a], embeddings[b])


def write_scores(
    trials: str | Path,
    names: Sequence[str],
    embeddings: np.ndarray,
    out: str | Path,
    columns: Sequence[str] = SCORE_COLUMNS,
    id_style: str = "pair",
    chunk_size: int = SCORE_CHUNK,
) -> int:
    """Stream the scores of a trial list into a submission CSV; returns the number of rows.

    id_style "pair": the id is "img1 img2" as the list writes them; "index": the trial's
    0-based row number. Scores have six decimals."""
    if id_style not in ID_STYLES:
        raise ValueError(f"id_style must be one of {ID_STYLES}, not {id_style!r}")
    header = parse_columns(columns)
    index = {name: i for i, name in enumerate(names)}
    written = 0

    def rows() -> Iterable[tuple[object, str]]:
        nonlocal written
        for chunk, scores in iter_scores(trials, index, embeddings, chunk_size):
            ids: Iterable[object] = (
                (f"{r[0]} {r[1]}" for r in chunk)
                if id_style == "pair"
                else range(written, written + len(chunk))
            )
            yield from zip(ids, (f"{s:.6f}" for s in scores.tolist()), strict=True)
            written += len(chunk)

    atomic_write_csv(out, header, rows())
    return written


def score_trial_file(
    model: FaceModel,
    trials: str | Path,
    out: str | Path,
    columns: Sequence[str] = SCORE_COLUMNS,
    id_style: str = "pair",
    images_root: str | Path | None = None,
    flip: bool = False,
    chunk_size: int = SCORE_CHUNK,
    batch_size: int = 64,
    progress: bool = True,
) -> ScoreSummary:
    """Cosine score of every trial of an unlabelled list into a submission CSV (`Id,Category`
    by default). Image names resolve against `images_root` (default: the list's folder)."""
    root = Path(images_root) if images_root is not None else Path(trials).parent
    tick = time.perf_counter()
    names = trial_images(trials)
    if not names:
        raise ValueError(f"{trials}: no trials")
    embeddings = embed_images(
        model, [root / n for n in names], flip=flip, batch_size=batch_size, progress=progress
    ).embeddings
    embedded = time.perf_counter()
    count = write_scores(trials, names, embeddings, out, columns, id_style, chunk_size)
    summary = ScoreSummary(
        Path(out), count, len(names), embedded - tick, time.perf_counter() - embedded
    )
    log.info(
        "%s: %d trials over %d images, %.0f trials/s after embedding",
        out,
        count,
        len(names),
        summary.trials_per_s,
    )
    return summary
