"""Training criteria: every loss maps one batch of raw embeddings and labels to a scalar.

Classification losses ("softmax", "arcface", "cosface") put a head from the HEADS registry on
the embeddings and apply cross-entropy. Triplet losses ("triplet-batch-all",
"triplet-batch-hard", "triplet-semi-hard"; Schroff et al. 2015, Hermans et al. 2017) need no
head: they compare the L2-normalised embeddings of the batch with each other and mine the
triplets (anchor, positive of the same identity, negative of another) online, so batches must
hold several images per identity (P x K batches). Center loss (Wen et al. 2016) is an optional
auxiliary term for either kind. The training loop sees only `Criterion`: one switch, one loop.

Under DDP a triplet loss mines over the global batch (every rank's embeddings gathered), so a
distributed run computes the same loss as one process over the same global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facelab.models.registry import HEADS
from facelab.train.distributed import gather_batch

TRIPLET_MINING = ("batch-all", "batch-hard", "semi-hard")
TRIPLET_PREFIX = "triplet-"

# Below this mean pairwise distance (of unit vectors, at most 2) the embeddings have collapsed.
MIN_SPREAD = 1e-3
# A triplet loss this close to its margin means d(a, p) == d(a, n) everywhere: collapse.
MARGIN_TOLERANCE = 1e-4
# Floor under squared distances before the square root: keeps its gradient finite at 0.
_MIN_SQUARED_DISTANCE = 1e-12


class TrainingFailure(ValueError):
    """Training cannot usefully continue (diverged or collapsed); the message says what to change.

    A ValueError, so the command line reports it as a clean error rather than a traceback.
    """


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, N) between the L2-normalised rows, in float32."""
    x = F.normalize(embeddings.float(), dim=1)
    squared = (2.0 - 2.0 * x @ x.T).clamp_min(_MIN_SQUARED_DISTANCE)
    return squared.sqrt()


def embedding_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean distance between distinct L2-normalised embeddings of a batch (0: collapsed)."""
    n = len(embeddings)
    if n < 2:
        return embeddings.new_tensor(2.0)
    d = pairwise_distances(embeddings)
    return (d.sum() - d.diagonal().sum()) / (n * (n - 1))


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) pair masks: same identity but not the same sample, other identity."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _mean_or_zero(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mean of `values`, or a zero that keeps the graph when no triplet qualified."""
    return values.mean() if values.numel() else like.sum() * 0.0


def batch_all_loss(d: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Every valid triplet; averaged over those with a positive loss, so the many triplets that
    are already satisfied do not dilute the gradient (Hermans et al.'s "batch all")."""
    pos, neg = _masks(labels)
    valid = pos.unsqueeze(2) & neg.unsqueeze(1)  # (anchor, positive, negative)
    losses = F.relu(d.unsqueeze(2) - d.unsqueeze(1) + margin)[valid]
    return _mean_or_zero(losses[losses > 0], d)


def batch_hard_loss(d: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per anchor, its farthest positive against its closest negative; mean over anchors."""
    pos, neg = _masks(labels)
    hardest_pos = torch.where(pos, d, -math.inf).amax(1)
    hardest_neg = torch.where(neg, d, math.inf).amin(1)
    valid = pos.any(1) & neg.any(1)
    return _mean_or_zero(F.relu(hardest_pos - hardest_neg + margin)[valid], d)


def semi_hard_loss(d: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per (anchor, positive) pair, the closest negative farther than the positive (FaceNet's
    semi-hard negative: it lies within the margin unless the pair is already satisfied); where
    no negative is farther, the farthest negative, as TensorFlow's triplet_semihard_loss does.
    Mean over all pairs."""
    pos, neg = _masks(labels)
    d_an = d.unsqueeze(1)  # (anchor, 1, negative)
    farther = neg.unsqueeze(1) & (d_an > d.unsqueeze(2))  # (anchor, positive, negative)
    closest_farther = torch.where(farther, d_an, math.inf).amin(2)
    farthest = torch.where(neg, d, -math.inf).amax(1, keepdim=True)
    chosen = torch.where(farther.any(2), closest_farther, farthest)
    valid = pos & neg.any(1, keepdim=True)
    return _mean_or_zero(F.relu(d - chosen + margin)[valid], d)


MINERS = {
    "batch-all": batch_all_loss,
    "batch-hard": batch_hard_loss,
    "semi-hard": semi_hard_loss,
}


class TripletLoss(nn.Module):
    """Triplet loss on Euclidean distances of L2-normalised embeddings with online mining."""

    def __init__(self, mining: str, margin: float = 0.2) -> None:
        super().__init__()
        if mining not in MINERS:
            raise ValueError(f"triplet mining must be one of {', '.join(MINERS)}, not {mining!r}")
        self.mining = mining
        self.margin = margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features, labels = gather_batch(features, labels)
        with torch.autocast(features.device.type, enabled=False):  # fp16 distances lose pairs
            return MINERS[self.mining](pairwise_distances(features), labels, self.margin)

    def extra_repr(self) -> str:
        return f"mining={self.mining}, margin={self.margin}"


class ClassificationLoss(nn.Module):
    """Cross-entropy of a classification head's logits (the margin heads apply their margin)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(features.float(), labels), labels)


class CenterLoss(nn.Module):
    """Half the mean squared distance of each L2-normalised embedding to its class centre.

    Unit-length embeddings cannot lower it by shrinking. The value is `weight` times the term,
    but the centres follow their classes at the optimiser's own rate whatever the weight (Wen
    et al. likewise update them with a separate rate): the weight scales only the pull on the
    embeddings.
    """

    def __init__(self, num_classes: int, embedding_dim: int, weight: float) -> None:
        super().__init__()
        self.centers = nn.Parameter(F.normalize(torch.randn(num_classes, embedding_dim), dim=1))
        self.weight = weight

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), dim=1)
        centers = self.centers[labels]
        pull = (x - centers.detach()).square().sum(1).mean()
        follow = (x.detach() - centers).square().sum(1).mean()
        return 0.5 * (self.weight * pull + follow - follow.detach())


class Criterion(nn.Module):
    """The loss of one training setup: a classification or triplet loss, plus optional center
    loss. Call it with (raw embeddings, labels); `head` is the classifier, if there is one."""

    def __init__(self, main: nn.Module, center: CenterLoss | None = None) -> None:
        super().__init__()
        self.main = main
        self.center = center

    @property
    def head(self) -> nn.Module | None:
        return self.main.head if isinstance(self.main, ClassificationLoss) else None

    @property
    def margin(self) -> float | None:
        """The triplet margin (a collapsed embedding scores exactly this), else None."""
        return self.main.margin if isinstance(self.main, TripletLoss) else None

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.main(features, labels)
        if self.center is not None:
            loss = loss + self.center(features, labels)
        return loss


def loss_names() -> list[str]:
    return HEADS.names() + [TRIPLET_PREFIX + m for m in TRIPLET_MINING]


def build_criterion(
    loss: str,
    embedding_dim: int,
    num_classes: int,
    options: dict | None = None,
    center_loss: float = 0.0,
) -> Criterion:
    """The criterion named by a `loss` switch; `options` go to the head or the triplet loss."""
    options = options or {}
    if loss not in loss_names():
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(loss_names())}")
    if loss.startswith(TRIPLET_PREFIX):
        main: nn.Module = TripletLoss(loss.removeprefix(TRIPLET_PREFIX), **options)
    else:
        head = HEADS.create(loss, embedding_dim=embedding_dim, num_classes=num_classes, **options)
        main = ClassificationLoss(head)
    center = CenterLoss(num_classes, embedding_dim, center_loss) if center_loss > 0 else None
    return Criterion(main, center)


class FailureGuard:
    """Stops training on the known failure modes, with a message saying what to change.

    Non-finite loss: under float16 autocast usually an overflow, otherwise a too-high learning
    rate. Collapse (batch-hard mining's known failure): all embeddings pulled to one point, seen
    as a vanishing mean pairwise distance, or a triplet loss stuck exactly at its margin, for
    `patience` consecutive steps.
    """

    def __init__(self, patience: int, margin: float | None, fp16: bool, lr: float) -> None:
        self.patience = patience
        self.margin = margin
        self.fp16 = fp16
        self.lr = lr
        self.collapsed_steps = 0

    def check(self, step: int, loss: float, spread: float) -> None:
        if not math.isfinite(loss):
            cause = (
                "float16 autocast overflowed: set amp: false (or lower lr)"
                if self.fp16
                else f"lower the learning rate (lr {self.lr})"
            )
            raise TrainingFailure(f"training loss became {loss} at step {step}: {cause}")
        stuck = self.margin is not None and abs(loss - self.margin) < MARGIN_TOLERANCE
        if spread >= MIN_SPREAD and not stuck:
            self.collapsed_steps = 0
            return
        self.collapsed_steps += 1
        if self.patience and self.collapsed_steps >= self.patience:
            seen = (
                f"mean pairwise distance {spread:.2e}"
                if spread < MIN_SPREAD
                else (f"loss {loss:.6f} == margin {self.margin}")
            )
            raise TrainingFailure(
                f"embeddings collapsed to a point ({seen} for {self.collapsed_steps} steps, "
                f"step {step}): lower lr, use triplet-semi-hard or triplet-batch-all, or start "
                "from a model trained with a classification loss (init_from)"
            )
