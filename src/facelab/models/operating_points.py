"""Calibrated decision thresholds ("operating points") that travel with a model, like its
`Preprocess`, so that a model decides same/different without a user-supplied threshold.

An operating point is the threshold on cosine similarity that keeps the false-accept rate at or
under a target (1e-2, 1e-3, 1e-4; pretrained models also 1e-5 and 1e-6, which clustering
N faces needs, `threshold_for_far`) on a labelled trial list, with the FAR and FRR measured there
and the trial counts behind them. Pretrained models get theirs from
`benchmarks/calibrate_pretrained.py`, stored with their provenance in `model_cards.json` beside
this module (read here, never computed at run time); trained checkpoints get theirs from their
validation trials at the end of each epoch (`facelab.train.loop`), stored in the checkpoint's
model description. The computation itself is `facelab.eval.metrics.threshold_at_far`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

# The target FARs every model is calibrated for, and the one `verify` decides at by default.
TARGET_FARS = (1e-2, 1e-3, 1e-4)
# Pretrained models ship these too: clustering N faces wants FAR about 0.3 / N
# (docs/collections.md), and their calibration's millions of impostor pairs can measure them.
SHIPPED_FARS = (*TARGET_FARS, 1e-5, 1e-6)
DEFAULT_FAR = 1e-3
CARDS_FILE = Path(__file__).with_name("model_cards.json")


@dataclass(frozen=True)
class OperatingPoint:
    """Accept a pair when cosine >= `threshold`: `far`/`frr` were measured at it on `trials`
    (`n_genuine` same and `n_impostor` different pairs) for a target FAR of `target_far`."""

    target_far: float
    threshold: float
    far: float
    frr: float
    n_genuine: int
    n_impostor: int
    trials: str

    @property
    def name(self) -> str:
        return f"FAR {self.target_far:g}"

    @property
    def resolved(self) -> bool:
        """Whether the impostor trials are enough to measure this FAR (one false accept is at
        most `target_far` of them); otherwise the threshold is only the strictest that
        accepted none of them."""
        return self.target_far * self.n_impostor >= 1

    def describe(self) -> str:
        caveat = "" if self.resolved else f"; too few impostors to measure {self.target_far:g}"
        return (
            f"model operating point {self.name}: threshold {self.threshold:.4f} (measured FAR "
            f"{self.far:.3g}, FRR {self.frr:.3g} on {self.trials}: {self.n_genuine:,} genuine, "
            f"{self.n_impostor:,} impostor pairs{caveat})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoint:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"operating point lacks {', '.join(missing)}: {dict(data)}")
        point = cls(**{n: data[n] for n in names})
        if not 0 < point.target_far < 1:
            raise ValueError(f"operating point target_far {point.target_far} is not in (0, 1)")
        return point


def operating_points(rows: Iterable[Mapping[str, Any]] | None) -> tuple[OperatingPoint, ...]:
    """Points from their dict form (a checkpoint's model description, a model card), the most
    lenient target FAR first (as `TARGET_FARS`); None or [] (an old checkpoint) gives none."""
    points = [OperatingPoint.from_dict(row) for row in rows or ()]
    return tuple(sorted(points, key=lambda p: -p.target_far))


def point_at(points: Sequence[OperatingPoint], far: float) -> OperatingPoint | None:
    """The point calibrated for target `far` (to relative 1e-6), or None."""
    for point in points:
        if abs(point.target_far - far) <= 1e-6 * far:
            return point
    return None


def threshold_for_far(points: Sequence[OperatingPoint], far: float) -> tuple[float, str]:
    """The threshold at target `far` and how it was found: between two measured points,
    linear in log FAR; outside their range, the nearest one (beyond the strictest it is only a
    bound, and said so). Points whose FAR the trials could not measure are not used."""
    if not 0 < far < 1:
        raise ValueError(f"target FAR must be in (0, 1), got {far}")
    measured = sorted((p for p in points if p.resolved), key=lambda p: p.target_far)
    if not measured:
        raise ValueError("no measured operating points")
    exact = point_at(measured, far)
    if exact is not None:
        return exact.threshold, exact.describe()
    strict, loose = measured[0], measured[-1]
    if far < strict.target_far:
        return strict.threshold, (
            f"FAR {far:.3g} is below the strictest measured point; {strict.describe()}"
        )
    if far > loose.target_far:
        return loose.threshold, f"FAR {far:.3g} is above the loosest point; {loose.describe()}"
    hi = next(p for p in measured if p.target_far > far)
    lo = measured[measured.index(hi) - 1]
    w = math.log(far / lo.target_far) / math.log(hi.target_far / lo.target_far)
    threshold = float(lo.threshold + w * (hi.threshold - lo.threshold))
    return threshold, (
        f"interpolated in log FAR between the model's operating points {lo.name} "
        f"({lo.threshold:.4f}) and {hi.name} ({hi.threshold:.4f}), measured on {lo.trials}"
    )


@cache
def _cards() -> dict[str, Any]:
    with CARDS_FILE.open(encoding="utf-8") as fh:
        return json.load(fh)


def model_card(name: str) -> dict[str, Any]:
    """What facelab knows of a registered model's weights: licence, source package and, for
    pretrained ones, the measured LFW accuracy and operating points with their provenance
    (`model_cards.json`); {} for a model without a card."""
    return dict(_cards().get(name, {}))


def pretrained_operating_points(name: str) -> tuple[OperatingPoint, ...]:
    """The operating points shipped for a registered model's pretrained weights (none if it
    has no calibration record)."""
    record = model_card(name).get("operating_points") or {}
    return operating_points(record.get("points"))
