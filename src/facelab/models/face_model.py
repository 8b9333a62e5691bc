"""A backbone bundled with the preprocessing it expects: the unit everything embeds with."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from facelab.models.operating_points import OperatingPoint, operating_points
from facelab.models.preprocess import Preprocess
from facelab.models.registry import BACKBONES


class FaceModel(nn.Module):
    """Backbone + preprocessing + the recipe to rebuild it (name and keyword arguments).

    `forward` maps network input to L2-normalised embeddings; the `embed_*` methods take
    images or aligned faces and apply the stored preprocessing themselves. `operating_points`
    are its calibrated decision thresholds (`facelab.models.operating_points`), empty when
    none were measured for these weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: Preprocess,
        name: str,
        kwargs: dict[str, Any],
        frozen_fingerprint: str | None = None,
        operating_points: Sequence[OperatingPoint] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.preprocess = preprocess
        self.name = name
        self.kwargs = dict(kwargs)
        self.frozen_fingerprint = frozen_fingerprint
        self.operating_points = tuple(operating_points)

    @classmethod
    def create(cls, name: str, preprocess: Preprocess | None = None, **kwargs: Any) -> FaceModel:
        """Build a registered backbone; its registered preprocessing is used unless overridden.

        `input_size` (when given) also sets the preprocessing size, so they cannot disagree.
        The registered weights (pretrained=True) come with their shipped operating points,
        unless the preprocessing is overridden (the points hold for the registered one only).
        """
        entry = BACKBONES.get(name)
        spec = preprocess or entry.preprocess or Preprocess()
        if "input_size" in kwargs:
            spec = replace(spec, size=int(kwargs["input_size"]))
        shipped = kwargs.get("pretrained") is True and spec == entry.preprocess
        points = entry.operating_points if shipped else ()
        return cls(BACKBONES.create(name, **kwargs), spec, name, kwargs, operating_points=points)

    @property
    def embedding_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size)
            was_training = self.backbone.training
            self.backbone.eval()
            dim = self.backbone(probe).shape[1]
            self.backbone.train(was_training)
        return int(dim)

    @property
    def device(self) -> torch.device:
        """Where the weights live (a frozen backbone has constants, not parameters)."""
        for tensor in self.backbone.state_dict().values():
            return tensor.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.backbone(x), dim=1)

    def fingerprint(self) -> str:
        """Identifies model + weights + preprocessing: embeddings are comparable only within one."""
        if self.frozen_fingerprint is not None:
            return self.frozen_fingerprint
        digest = hashlib.sha256()
        digest.update(f"{self.name}|{sorted(self.kwargs.items())}|".encode())
        digest.update(self.preprocess.fingerprint().encode())
        for key, tensor in sorted(self.backbone.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def for_inference(self) -> FaceModel:
        """A copy for fast CPU/GPU inference (same outputs to float tolerance, not trainable).

        The backbone is traced and frozen with TorchScript, whose frozen-graph passes fold
        batch-norm and per-channel scale/shift layers into the preceding convolutions and let
        oneDNN pick its weight layouts. The fingerprint stays that of the original weights.
        """
        self.eval()
        size = self.preprocess.size
        example = torch.zeros(2, 3, size, size, device=self.device)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # Shape checks in forward() become constants of the trace: intended, the input
            # size is fixed by the preprocessing.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(self.backbone, example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        return FaceModel(
            frozen,
            self.preprocess,
            self.name,
            self.kwargs,
            self.fingerprint(),
            self.operating_points,
        )

    @torch.inference_mode()
    def embed_tensors(
        self, inputs: torch.Tensor, flip: bool = False, batch_size: int = 64
    ) -> np.ndarray:
        """Preprocessed (N, 3, S, S) inputs -> L2-normalised float32 (N, D) embeddings.

        flip: add the embedding of the mirrored face before normalising (as insightface does).
        """
        self.eval()
        device = self.device
        out = []
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            feats = self.backbone(x)
            if flip:
                feats = feats + self.backbone(x.flip(3))
            out.append(nn.functional.normalize(feats.float(), dim=1).cpu())
        if not out:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return torch.cat(out).numpy()

    def embed_faces(
        self,
        images: Sequence[np.ndarray],
        landmarks: Sequence[np.ndarray] | None = None,
        flip: bool = False,
        batch_size: int = 64,
    ) -> np.ndarray:
        """RGB uint8 images (one face each) -> L2-normalised (N, D) embeddings."""
        marks = landmarks if landmarks is not None else [None] * len(images)
        tensors = [
            self.preprocess.to_tensor(img, lm) for img, lm in zip(images, marks, strict=True)
        ]
        if not tensors:
            return self.embed_tensors(torch.zeros(0, 3, self.preprocess.size, self.preprocess.size))
        return self.embed_tensors(torch.stack(tensors), flip=flip, batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this model (weights travel separately)."""
        return {
            "name": self.name,
            "kwargs": self.kwargs,
            "preprocess": self.preprocess.to_dict(),
            "operating_points": [p.to_dict() for p in self.operating_points],
        }

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> FaceModel:
        """The model a description rebuilds; one written before operating points existed
        has none."""
        kwargs = {k: v for k, v in desc["kwargs"].items() if k != "pretrained"}
        model = cls.create(desc["name"], Preprocess.from_dict(desc["preprocess"]), **kwargs)
        model.operating_points = operating_points(desc.get("operating_points"))
        return model
