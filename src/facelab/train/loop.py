"""The training loop: any criterion (classification head or triplet loss) on an identity folder,
single-process or DDP under torchrun, with exact resume."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from facelab.data.augment import Augment, cutmix
from facelab.data.folders import IdentityFolder, Sample, split_images
from facelab.data.trials import read_people, read_text, read_trials, trial_people
from facelab.eval.metrics import equal_error_rate, roc_auc, threshold_at_far, tpr_at_fpr
from facelab.fileio import atomic_write_text, check_writable_folder
from facelab.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from facelab.models.operating_points import TARGET_FARS, OperatingPoint
from facelab.models.preprocess import Preprocess
from facelab.train import distributed
from facelab.train.batches import Batch, FaceBatches, batch_loader, decode_faces
from facelab.train.config import TrainConfig
from facelab.train.distill import (
    OnlineTeacher,
    distillation,
    teacher_preprocess,
    teaches_online,
)
from facelab.train.losses import Criterion, FailureGuard, build_criterion, embedding_spread
from facelab.train.sampler import IdentityBatches, ShuffledBatches
from facelab.train.transfer import freeze_all_but_last, initial_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # False on DDP ranks other than 0 (which log and save nothing)


def people_in(path: str | Path) -> set[str]:
    """Names listed by an LFW people file (`name<TAB>count` lines) or touched by a trial list."""
    lines = [ln.split() for ln in read_text(Path(path)).splitlines()[1:] if ln.strip()]
    if lines and all(len(f) == 2 and f[1].isdigit() for f in lines):
        return set(read_people(path))
    return trial_people(read_trials(path))


def training_folder(cfg: TrainConfig) -> IdentityFolder:
    """The identity folder a run trains on: `data` with at least `min_images` per person,
    restricted to `include_people` (when given) and without `exclude_people`."""
    excluded = set().union(*(people_in(p) for p in cfg.exclude_people))
    included = set().union(*(people_in(p) for p in cfg.include_people))
    return IdentityFolder.scan(
        cfg.data, cfg.min_images, include=included or None, exclude=excluded or None
    )


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


def cosine_part(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.optim.lr_scheduler.CosineAnnealingLR | None:
    """The cosine annealing inside a `make_scheduler` schedule (after any warm-up), if any."""
    parts = getattr(scheduler, "_schedulers", [scheduler])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR
    return next((p for p in parts if isinstance(p, cosine)), None)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {f"top{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}


class LossNet(nn.Module):
    """Backbone and criterion as one module, so DDP synchronises the gradients of both; with an
    online teacher, its targets for the batch are handed to the criterion too."""

    def __init__(
        self, backbone: nn.Module, criterion: Criterion, teacher: OnlineTeacher | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.criterion = criterion
        self.teacher = teacher

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        partner: torch.Tensor | None = None,
        lam: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, raw embeddings); with CutMix partner labels, the area-weighted loss."""
        taught = ()
        if self.teacher is not None:
            taught = (self.teacher(x),)
            x = self.teacher.student_view(x)
        features = self.backbone(x)
        loss = self.criterion(features, labels, *taught)
        if partner is not None:
            loss = lam * loss + (1 - lam) * self.criterion(features, partner, *taught)
        return loss, features


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
        self.dist, self.device = distributed.setup()
        if self.dist.main:  # refused before hours of work, not at the first checkpoint
            check_writable_folder(self.out)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                f"{self.dist.world_size} processes"
            )
        seed_everything(cfg.seed)  # the same initial weights on every rank

        folder = training_folder(cfg)
        self.classes = list(folder.identities)
        self.train_samples, self.val_samples = split_images(
            folder.samples, cfg.val_fraction, cfg.seed
        )
        log.info(
            "%d identities, %d train / %d val images",
            folder.num_classes,
            len(self.train_samples),
            len(self.val_samples),
        )

        self.model = model_from_checkpoint(payload) if payload else initial_model(cfg)
        self.frozen: list[nn.Module] = []
        if cfg.trainable_blocks is not None:
            self.frozen = freeze_all_but_last(self.model.backbone, cfg.trainable_blocks)
        self.embedding_dim = self.model.embedding_dim
        self.criterion = build_criterion(
            cfg.loss,
            self.embedding_dim,
            len(self.classes),
            cfg.head_options,
            cfg.center_loss,
        )
        # an online teacher sees the training faces at its own size, the student them resized
        spec = self.model.preprocess
        online = False  # whether the teacher embeds every training batch
        if cfg.teacher:
            teacher_spec = teacher_preprocess(cfg.teacher)
            online = teaches_online(teacher_spec, spec)
            spec = teacher_spec if online else spec
        train_faces = self._faces(self.train_samples, spec)
        targets = None  # what batches carry besides inputs: labels, or sample indices
        teacher = None  # the online teacher of a distillation run, if any
        if cfg.teacher:  # the teacher's embeddings are cached by the first rank, read by the rest
            identity = self.criterion
            self.criterion, targets, teacher = distributed.in_turn(
                lambda: distillation(
                    cfg,
                    identity,
                    self.train_samples,
                    self.model,
                    self.device,
                    train_faces if online else None,
                ),
                self.dist,
            )
        if self.dist.enabled:
            distributed.sync_batchnorm(self.model.backbone, self.device)
        self.model.to(self.device)
        self.criterion.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

        train_labels = torch.tensor([s.label for s in self.train_samples])
        augment = Augment(**cfg.augment)
        self.train_batches = FaceBatches(
            train_faces, train_labels if targets is None else targets, spec, augment
        )
        self.val_faces = None  # held-out images of the training identities, for top-k accuracy
        if self.val_samples and self.criterion.head is not None:
            self.val_faces = self._faces(self.val_samples)
        self.trials = read_trials(cfg.val_trials) if cfg.val_trials else None
        if self.trials:
            unique = sorted({p for t in self.trials for p in (t.a, t.b)})
            self.trial_index = {p: i for i, p in enumerate(unique)}
            self.trial_faces = self._faces([Sample(p, -1) for p in unique])

        if cfg.images_per_identity:
            self.plan: IdentityBatches | ShuffledBatches = IdentityBatches(
                train_labels.tolist(),
                cfg.batch_size // cfg.images_per_identity,
                cfg.images_per_identity,
                cfg.seed,
            )
        else:
            self.plan = ShuffledBatches(len(self.train_samples), cfg.batch_size, cfg.seed)
        self.iters_per_epoch = len(self.plan)

        params = [
            p for p in [*self.model.parameters(), *self.criterion.parameters()] if p.requires_grad
        ]
        self.optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = make_scheduler(cfg, self.optimizer, self.iters_per_epoch)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.guard = FailureGuard(cfg.collapse_steps, self.criterion.margin, self.use_amp, cfg.lr)
        self.net: nn.Module = LossNet(self.model.backbone, self.criterion, teacher)
        if self.dist.enabled:
            self.net = DistributedDataParallel(
                self.net,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # batch-norm statistics are synchronised instead
            )
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.step_count = 0
        # augmentation, dropout and CutMix differ between ranks, like their data
        seed_everything(cfg.seed + self.dist.rank)
        if payload is not None:
            self._restore(payload)

    def _restore(self, payload: dict[str, Any]) -> None:
        if "criterion_state" in payload:
            self.criterion.load_state_dict(payload["criterion_state"])
        else:  # checkpoints written before criteria existed hold the head alone
            self.criterion.head.load_state_dict(payload["head_state"])
        self.optimizer.load_state_dict(payload["optimizer"])
        # The cosine schedule ends at this run's last epoch: resuming with another --epochs
        # re-plans it from the current learning rate down to eta_min at the new end (the
        # stored plan would make the rate rise again past its end). PyTorch's cosine steps
        # multiply (lr - eta_min) by ratios that telescope to 0 at T_max, so changing T_max
        # alone continues smoothly from the current rate; a finished run stays at eta_min.
        cosine = cosine_part(self.scheduler)
        planned = cosine.T_max if cosine is not None else None
        self.scheduler.load_state_dict(payload["scheduler"])
        if cosine is not None and cosine.T_max != planned:
            log.info(
                "resuming with %d epochs: cosine schedule re-planned to reach eta_min at the end",
                self.cfg.epochs,
            )
            cosine.T_max = planned
        self.scaler.load_state_dict(payload["scaler"])
        self.history = payload["history"]
        self.start_epoch = payload["epoch"] + 1
        self.step_count = self.start_epoch * self.iters_per_epoch
        states = payload.get("rng_ranks") or [payload["rng"]]
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])
        else:
            log.warning(
                "checkpoint from %d process(es), resuming on %d: augmentation RNG reseeded",
                len(states),
                self.dist.world_size,
            )
            seed_everything(self.cfg.seed + self.dist.rank + 1000 * self.start_epoch)

    def _faces(self, samples: list[Sample], spec: Preprocess | None = None) -> np.ndarray:
        """The samples' faces as `spec` (default: the model's preprocessing) cuts them."""

        def decode() -> np.ndarray:
            return decode_faces(
                [s.path for s in samples],
                spec or self.model.preprocess,
                cache_dir=self.cfg.cache_dir,
                workers=self.cfg.workers,
            )

        # a cache file is written once, then read; without one every rank decodes at once
        return distributed.in_turn(decode, self.dist) if self.cfg.cache_dir else decode()

    def _inputs(self, faces: np.ndarray) -> torch.Tensor:
        x = self.model.preprocess.normalise(faces)
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's shard of each global batch of the epoch, augmented and normalised."""
        plan = [distributed.shard(b, self.dist) for b in self.plan.epoch(epoch)]
        return batch_loader(
            self.train_batches, plan, self.cfg.loader_workers, self.device.type == "cuda"
        )

    def train_mode(self) -> None:
        """Training mode, except frozen blocks: their batch-norm statistics stay as learnt."""
        self.net.train()
        for block in self.frozen:
            block.eval()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step on a batch; returns its loss (averaged over ranks)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        partner, lam = None, 1.0
        if self.cfg.cutmix > 0 and random.random() < self.cfg.cutmix:
            x, y, partner, lam = cutmix(x, y, self.cfg.cutmix_alpha)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            loss, features = self.net(x, y, partner, lam)
        with torch.no_grad():
            stats = torch.stack([loss.detach().float(), embedding_spread(features.detach())])
        loss_value, spread = distributed.mean_over_ranks(stats).tolist()
        self.step_count += 1
        self.guard.check(self.step_count, loss_value, spread)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_value

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Val top-1/top-5 (classification heads, without margin) and, on the trial list,
        verification AUC, EER and TPR at FPR 1e-2 by cosine similarity; the trials also
        calibrate the model's operating points, which every checkpoint then carries."""
        self.model.eval()
        self.criterion.eval()
        metrics: dict[str, float] = {}
        head = self.criterion.head
        if self.val_faces is not None and head is not None:
            logits, labels = [], []
            for start in range(0, len(self.val_faces), 256):
                x = self._inputs(self.val_faces[start : start + 256])
                logits.append(head(self.model.backbone(x).float()).cpu())
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
            emb = self.model.embed_tensors(self._inputs(self.trial_faces), batch_size=256)
            a = np.array([self.trial_index[t.a] for t in self.trials])
            b = np.array([self.trial_index[t.b] for t in self.trials])
            scores = (emb[a] * emb[b]).sum(1)
            same = np.array([t.label for t in self.trials])
            metrics["val_auc"] = roc_auc(scores, same)
            metrics["val_eer"] = equal_error_rate(scores, same)[0]
            metrics["val_tpr_at_fpr_0.01"] = tpr_at_fpr(scores, same, 1e-2)[0]
            source = f"validation trials {self.cfg.val_trials}"
            self.model.operating_points = tuple(
                OperatingPoint.from_dict({**threshold_at_far(scores, same, far), "trials": source})
                for far in TARGET_FARS
            )
        return metrics

    def fit(self) -> TrainResult:
        cfg = self.cfg
        main = self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        last = self.out / "last.pt"
        if main and cfg.init_from and not self.history:
            self._record({"epoch": 0, **self.evaluate()})  # the starting point, for comparison
        for epoch in range(self.start_epoch, cfg.epochs):
            self.train_mode()
            losses = []
            tick = time.monotonic()
            bar = tqdm(
                self.batches(epoch),
                total=self.iters_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="it",
                disable=not main,
            )
            for it, (x, y) in enumerate(bar):
                losses.append(self.step(x, y))
                if it % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every :]):.3f}")
            seconds = time.monotonic() - tick
            rng_ranks = distributed.gather_objects(rng_state())
            if main:
                self._record(
                    {
                        "epoch": epoch + 1,
                        "train_loss": float(np.mean(losses)),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "seconds": round(seconds, 2),
                        "images_per_s": round(self.iters_per_epoch * cfg.batch_size / seconds, 1),
                        **self.evaluate(),
                    }
                )
                self._save(last, epoch, rng_ranks)
            out_of_time = cfg.max_minutes is not None and (
                time.monotonic() - began > 60 * cfg.max_minutes
            )
            if distributed.broadcast_object(out_of_time):
                log.info(
                    "stopping after epoch %d: %.1f-minute budget reached",
                    epoch + 1,
                    cfg.max_minutes,
                )
                break
        return TrainResult(last, self.history, main)

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        log.info("epoch %d: %s", record["epoch"], json.dumps(record))
        self._write_logs()

    def _save(self, path: Path, epoch: int, rng_ranks: list[dict[str, Any]]) -> None:
        head = self.criterion.head
        save_checkpoint(
            path,
            self.model,
            head=None
            if head is None
            else {
                "name": self.cfg.loss,
                "embedding_dim": self.embedding_dim,
                "classes": self.classes,
            },
            head_state=None if head is None else head.state_dict(),
            criterion_state=self.criterion.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            rng=rng_ranks[0],
            rng_ranks=rng_ranks,
            history=self.history,
            config=self.cfg.to_dict(),
        )

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
    """Train (or resume) a run; returns the last checkpoint's path and the per-epoch history.

    Under torchrun every process calls this; rank 0 logs, evaluates and writes checkpoints.
    """
    trainer = Trainer(cfg, resume)
    result = trainer.fit()
    distributed.leave(trainer.dist)
    return result
