"""Classification heads put on top of a backbone while training (the HEADS registry).

Every head maps (N, D) raw embeddings to (N, num_classes) logits; the training loop applies
ordinary cross-entropy. The margin heads ("arcface", "cosface") compare L2-normalised
embeddings with L2-normalised class centres and penalise the target class only when labels
are given, so at evaluation time their logits are plain scaled cosines (usable for top-k
classification). Their `margin` and `scale` are plain attributes a training loop may change
between steps (margin warm-up); they are hyperparameters, not weights, so not in the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facelab.models.registry import HEADS

# floor on sin^2(theta) in ArcFace: keeps d sin / d cos = -cos / sin finite at theta = 0 or pi
_MIN_SIN_SQUARED = 1e-6


@HEADS.register("softmax")
class SoftmaxHead(nn.Module):
    """Linear classifier with bias: the baseline the margin heads are measured against."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` is accepted (and unused) so every head is called the same way."""
        return self.fc(features)


class MarginHead(nn.Module):
    """scale * cos(embedding, class centre), with `target_cosine` applied at the label."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        self.margin = margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        cosine = cosine.clamp(-1.0, 1.0)
        if labels is not None:
            index = labels.view(-1, 1)
            cosine = cosine.scatter(1, index, self.target_cosine(cosine.gather(1, index)))
        return self.scale * cosine

    def target_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        """The penalised cosine of each sample with its own class centre."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        classes, dim = self.weight.shape
        return f"{dim} -> {classes}, scale={self.scale}, margin={self.margin}"


@HEADS.register("arcface")
class ArcFaceHead(MarginHead):
    """Additive angular margin (Deng et al. 2019): target logit s * cos(theta + m).

    Where theta + m would pass pi, cos(theta + m) turns back up and would reward a worse angle,
    so (as arcface_torch's CombinedMarginLoss without easy margin) the target becomes
    cos(theta) - m * sin(m) for theta > pi - m.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5
    ) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)

    def target_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        sine = (1.0 - cosine.square()).clamp_min(_MIN_SIN_SQUARED).sqrt()
        shifted = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        fallback = cosine - self.margin * math.sin(self.margin)
        return torch.where(cosine > math.cos(math.pi - self.margin), shifted, fallback)


@HEADS.register("cosface")
class CosFaceHead(MarginHead):
    """Additive cosine margin (Wang et al. 2018): target logit s * (cos(theta) - m)."""

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35
    ) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)

    def target_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin
