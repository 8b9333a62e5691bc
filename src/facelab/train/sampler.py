"""Which training samples form each batch of an epoch.

The order depends only on (seed, epoch), through a private generator: every DDP rank draws
the same global batches without communicating, and a resumed run draws what an uninterrupted
one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


class ShuffledBatches:
    """Uniformly shuffled batches of `batch_size` samples; the incomplete last one is dropped."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0) -> None:
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} training images cannot fill a batch of {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch))
        return list(order[: len(self) * self.batch_size].view(len(self), self.batch_size))


class IdentityBatches:
    """P x K batches: P identities, K images of each (Hermans et al. 2017), as triplet mining
    needs positives in every batch.

    Identities are visited in a shuffled cycle; only those with at least two images can
    provide a positive pair, so the others are left out. An identity with fewer than K images
    contributes all of them, then repeats random ones (augmentation makes the copies differ).
    An epoch has as many batches as shuffled batches would, about one pass over the images.
    """

    def __init__(
        self,
        labels: Sequence[int],
        identities_per_batch: int,
        images_per_identity: int,
        seed: int = 0,
    ) -> None:
        if images_per_identity < 2:
            raise ValueError(f"images_per_identity must be at least 2, not {images_per_identity}")
        by_label: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_label.setdefault(int(label), []).append(index)
        self.groups = [torch.tensor(ix) for _, ix in sorted(by_label.items()) if len(ix) >= 2]
        if len(self.groups) < identities_per_batch:
            raise ValueError(
                f"P x K batches need {identities_per_batch} identities with two or more "
                f"training images; there are {len(self.groups)}"
            )
        left_out = len(by_label) - len(self.groups)
        if left_out:
            log.info("P x K batches leave out %d identities with a single image", left_out)
        self.p = identities_per_batch
        self.k = images_per_identity
        self.num_batches = max(1, len(labels) // (self.p * self.k))
        self.seed = seed

    def __len__(self) -> int:
        return self.num_batches

    def _images(self, group: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        picked = group[torch.randperm(len(group), generator=generator)[: self.k]]
        if len(picked) == self.k:
            return picked
        extra = torch.randint(len(group), (self.k - len(picked),), generator=generator)
        return torch.cat([picked, group[extra]])

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        generator = epoch_generator(self.seed, epoch)
        cycle: list[int] = []
        batches = []
        for _ in range(self.num_batches):
            chosen = []
            while len(chosen) < self.p:
                if not cycle:
                    cycle = torch.randperm(len(self.groups), generator=generator).tolist()
                identity = cycle.pop()
                if identity not in chosen:  # a reshuffle may bring one back at once
                    chosen.append(identity)
            batches.append(torch.cat([self._images(self.groups[i], generator) for i in chosen]))
        return batches
