"""Training augmentation applied to whole batches in torch (cheap on CPU, no per-image Python).

Randomness comes from the global torch RNG, which training seeds and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """flip: horizontal mirror with p=0.5; crop_scale: random resized crop keeping this range of
    the area (aspect 3/4..4/3), (1, 1) disables it; rotate: max degrees of random rotation;
    jitter: brightness/contrast/saturation factor range 1 +- jitter; erase: probability of
    RandomErasing (one rectangle of 2-20% of the area filled with noise)."""

    flip: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    rotate: float = 0.0
    jitter: float = 0.2
    erase: float = 0.0

    def __post_init__(self) -> None:
        # configs (YAML, JSON) give the range as a list; the (1, 1) check compares tuples
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 or float (N, H, W, 3) in 0..255 -> float (N, H, W, 3) in 0..255."""
        x = faces.float().permute(0, 3, 1, 2)
        n = x.shape[0]
        if self.crop_scale != (1.0, 1.0) or self.rotate > 0:
            x = self._geometric(x)
        if self.flip:
            mask = torch.rand(n) < 0.5
            x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
        if self.jitter > 0:
            x = self._colour(x)
        if self.erase > 0:
            x = self._erase(x)
        return x.clamp(0, 255).permute(0, 2, 3, 1)

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n)

    def _geometric(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        area = self._uniform(n, *self.crop_scale)
        log_ratio = self._uniform(n, -0.2877, 0.2877)  # log(3/4) .. log(4/3)
        ratio = log_ratio.exp()
        sx = (area * ratio).sqrt().clamp(max=1.0)
        sy = (area / ratio).sqrt().clamp(max=1.0)
        tx = (1 - sx) * self._uniform(n, -1, 1)
        ty = (1 - sy) * self._uniform(n, -1, 1)
        angle = torch.deg2rad(self._uniform(n, -self.rotate, self.rotate))
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack(
            [
                torch.stack([sx * cos, -sy * sin, tx], 1),
                torch.stack([sx * sin, sy * cos, ty], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        lo, hi = 1 - self.jitter, 1 + self.jitter
        bright = self._uniform(n, lo, hi).view(n, 1, 1, 1)
        contrast = self._uniform(n, lo, hi).view(n, 1, 1, 1)
        sat = self._uniform(n, lo, hi).view(n, 1, 1, 1)
        x = x * bright
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = (x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        return (x - grey) * sat + grey

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        area = self._uniform(n, 0.02, 0.2) * h * w
        ratio = self._uniform(n, -1.2, 1.2).exp()  # log(0.3) .. log(3.3)
        eh = (area * ratio).sqrt().clamp(max=h).long()
        ew = (area / ratio).sqrt().clamp(max=w).long()
        top = (torch.rand(n) * (h - eh + 1)).long()
        left = (torch.rand(n) * (w - ew + 1)).long()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        box = (
            (rows >= top.view(n, 1, 1))
            & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1))
            & (cols < (left + ew).view(n, 1, 1))
        )
        apply = (torch.rand(n) < self.erase).view(n, 1, 1)
        noise = torch.rand(x.shape) * 255
        return torch.where((box & apply).unsqueeze(1), noise, x)


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019) on an (N, C, H, W) batch: paste a box from a shuffled copy.

    Returns (mixed inputs, labels, partner labels, lam) where the loss is
    lam * loss(labels) + (1 - lam) * loss(partner labels); lam is the kept area fraction.
    """
    n, _, h, w = x.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(n)
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, (1,))), int(torch.randint(w, (1,)))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, labels, labels[perm], lam
