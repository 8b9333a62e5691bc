"""The training loop: classification heads on an identity folder, with exact resume."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facelab.data.augment import Augment, cutmix
from facelab.data.faces import load_faces
from facelab.data.folders import IdentityFolder, Sample, split_images
from facelab.data.trials import read_people, read_trials, trial_people
from facelab.eval.metrics import roc_auc
from facelab.fileio import atomic_write_text
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess
from facelab.models.registry import HEADS
from facelab.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def people_in(path: str | Path) -> set[str]:
    """Names listed by an LFW people file (`name<TAB>count` lines) or touched by a trial list."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines()[1:] if ln.strip()]
    if lines and all(len(f) == 2 and f[1].isdigit() for f in lines):
        return set(read_people(path))
    return trial_people(read_trials(path))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule: optional linear warm-up, then cosine / warm restarts / constant."""
    total = cfg.epochs * iters_per_epoch
    warm = int(cfg.warmup_epochs * iters_per_epoch)
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=cfg.eta_min)
    elif cfg.scheduler == "warm_restarts":
        main = sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, cfg.t0 * iters_per_epoch), T_mult=cfg.t_mult, eta_min=cfg.eta_min
        )
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.01, total_iters=warm)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warm])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {f"top{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}


class Trainer:
    """Holds one run's state; `fit` runs the remaining epochs and checkpoints after each."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None) -> None:
        payload = load_checkpoint(resume) if resume is not None else None
        if payload is not None:
            saved = TrainConfig.from_dict(payload["config"])
            saved.epochs, saved.max_minutes = cfg.epochs, cfg.max_minutes
            cfg = saved
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        seed_everything(cfg.seed)

        excluded = set().union(*(people_in(p) for p in cfg.exclude_people))
        folder = IdentityFolder.scan(cfg.data, cfg.min_images, exclude=excluded or None)
        self.classes = list(folder.identities)
        self.train_samples, self.val_samples = split_images(
            folder.samples, cfg.val_fraction, cfg.seed
        )
        log.info(
            "%d identities, %d train / %d val images (%d people excluded)",
            folder.num_classes,
            len(self.train_samples),
            len(self.val_samples),
            len(excluded),
        )

        if payload is not None:
            self.model = model_from_checkpoint(payload)
        else:
            self.model = FaceModel.create(
                cfg.backbone,
                preprocess=Preprocess(size=cfg.image_size, crop=cfg.crop),
                embedding_dim=cfg.embedding_dim,
                input_size=cfg.image_size,
                **cfg.backbone_options,
            )
        self.head = HEADS.create(
            cfg.loss,
            embedding_dim=cfg.embedding_dim,
            num_classes=len(self.classes),
            **cfg.head_options,
        )
        self.model.to(self.device)
        self.head.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

        self.train_faces = self._faces(self.train_samples)
        self.train_labels = torch.tensor([s.label for s in self.train_samples])
        self.val_faces = self._faces(self.val_samples) if self.val_samples else None
        self.trials = read_trials(cfg.val_trials) if cfg.val_trials else None
        if self.trials:
            unique = sorted({p for t in self.trials for p in (t.a, t.b)})
            self.trial_index = {p: i for i, p in enumerate(unique)}
            self.trial_faces = self._faces([Sample(p, -1) for p in unique])

        params = list(self.model.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.iters_per_epoch = max(1, len(self.train_samples) // cfg.batch_size)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.iters_per_epoch)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.augment = Augment(**cfg.augment)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if payload is not None:
            self.head.load_state_dict(payload["head_state"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
            self.history = payload["history"]
            self.start_epoch = payload["epoch"] + 1
            set_rng_state(payload["rng"])

    def _faces(self, samples: list[Sample]) -> np.ndarray:
        spec = self.model.preprocess
        return load_faces(
            [s.path for s in samples],
            spec.crop_face,
            spec.size,
            spec.fingerprint(),
            cache_dir=self.cfg.cache_dir,
            workers=self.cfg.workers,
        )

    def _inputs(self, faces: np.ndarray, augment: bool) -> torch.Tensor:
        batch = torch.from_numpy(np.ascontiguousarray(faces))
        if augment:
            batch = self.augment(batch)
        x = self.model.preprocess.normalise(batch).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def _step(self, idx: torch.Tensor) -> float:
        x = self._inputs(self.train_faces[idx.numpy()], augment=True)
        y = self.train_labels[idx].to(self.device)
        mixed = self.cfg.cutmix > 0 and random.random() < self.cfg.cutmix
        if mixed:
            x, y, y2, lam = cutmix(x, y, self.cfg.cutmix_alpha)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            feats = self.model.backbone(x)
            loss = F.cross_entropy(self.head(feats.float(), y), y)
            if mixed:
                loss = lam * loss + (1 - lam) * F.cross_entropy(self.head(feats.float(), y2), y2)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} (learning rate {self.cfg.lr} too high, "
                "or fp16 overflow): lower lr or disable amp"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Val top-1/top-5 (heads without margin) and trial-list AUC by cosine similarity."""
        self.model.eval()
        self.head.eval()
        metrics: dict[str, float] = {}
        if self.val_faces is not None:
            logits, labels = [], []
            for start in range(0, len(self.val_faces), 256):
                x = self._inputs(self.val_faces[start : start + 256], augment=False)
                logits.append(self.head(self.model.backbone(x).float()).cpu())
                labels.append(
                    torch.tensor([s.label for s in self.val_samples[start : start + 256]])
                )
            metrics.update(
                {
                    f"val_{k}": v
                    for k, v in topk_accuracy(torch.cat(logits), torch.cat(labels)).items()
                }
            )
        if self.trials:
            inputs = self._inputs(self.trial_faces, augment=False)
            emb = self.model.embed_tensors(inputs, batch_size=256)
            a = np.array([self.trial_index[t.a] for t in self.trials])
            b = np.array([self.trial_index[t.b] for t in self.trials])
            scores = (emb[a] * emb[b]).sum(1)
            metrics["val_auc"] = roc_auc(scores, np.array([t.label for t in self.trials]))
        return metrics

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        last = self.out / "last.pt"
        for epoch in range(self.start_epoch, cfg.epochs):
            self.model.train()
            self.head.train()
            order = torch.randperm(len(self.train_samples))
            losses = []
            tick = time.monotonic()
            bar = tqdm(
                range(self.iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it"
            )
            for it in bar:
                idx = order[it * cfg.batch_size : (it + 1) * cfg.batch_size]
                losses.append(self._step(idx))
                if it % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every :]):.3f}")
            seconds = time.monotonic() - tick
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 2),
                "images_per_s": round(self.iters_per_epoch * cfg.batch_size / seconds, 1),
                **self.evaluate(),
            }
            self.history.append(record)
            log.info("epoch %d: %s", epoch + 1, json.dumps(record))
            self._write_logs()
            save_checkpoint(
                last,
                self.model,
                head={
                    "name": cfg.loss,
                    "embedding_dim": cfg.embedding_dim,
                    "classes": self.classes,
                },
                head_state=self.head.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                epoch=epoch,
                rng=rng_state(),
                history=self.history,
                config=cfg.to_dict(),
            )
            if cfg.max_minutes is not None and time.monotonic() - began > 60 * cfg.max_minutes:
                log.info(
                    "stopping after epoch %d: %.1f-minute budget reached",
                    epoch + 1,
                    cfg.max_minutes,
                )
                break
        return TrainResult(last, self.history)

    def _write_logs(self) -> None:
        atomic_write_text(
            self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history)
        )
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        rows = [",".join(keys)] + [",".join(_fmt(r.get(k)) for k in keys) for r in self.history]
        atomic_write_text(self.out / "metrics.csv", "\n".join(rows) + "\n")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return str(value)


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train (or resume) a run; returns the last checkpoint's path and the per-epoch history."""
    return Trainer(cfg, resume).fit()
