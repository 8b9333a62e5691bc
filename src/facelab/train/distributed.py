"""Distributed data-parallel training on PyTorch's own engine (torchrun + DDP).

`torchrun --nproc_per_node=N -m facelab train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `setup` joins them into one process group (nccl on
GPUs, gloo on CPUs). Every rank draws the same global batches and takes its own contiguous
shard; DDP averages the gradients. To make that equal to one process over the global batch:

- batch-norm statistics are computed over the global batch (`sync_batchnorm`): nn.SyncBatchNorm
  on GPUs, `GlooSyncBatchNorm` here on CPUs, where nn.SyncBatchNorm refuses to run;
- losses that compare samples with each other (triplet mining) see every rank's embeddings
  (`gather_batch`); per-sample losses (cross-entropy, center loss) need nothing, since the
  average of equal-sized shard means is the global mean.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank among world_size processes, GPU index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # setup() created the process group (see leave)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0


def setup() -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world_size == 1:
        return Distributed(), device
    if cuda:
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, joined)
    if not info.main:
        logging.getLogger("facelab").setLevel(logging.WARNING)
    log.info("DDP: %d processes, backend %s", info.world_size, dist.get_backend())
    return info, device


def leave(info: Distributed) -> None:
    """Wait until every rank is done; the process group itself lives until the process ends.

    Destroying it is not safe here: its last reference is dropped with the GIL held (by
    destroy_process_group, or by DDP's reducer when the model is freed), and gloo's destructor
    then joins worker threads that may still be freeing the tensors of a finished collective,
    which needs the GIL: a deadlock (seen with py-spy under load, 4 of 6 two-rank runs). A
    process that joined a group ends through `exit_process` instead."""
    if info.joined and dist.is_initialized():
        dist.barrier()


def joined_group() -> bool:
    """Whether this process is in a process group (then it ends with `exit_process`)."""
    return dist.is_initialized()


def exit_process(code: int = 0) -> None:
    """End a process that joined a process group without tearing the group down: flush the
    logs and standard streams, then `os._exit`, which skips the interpreter's finalisation,
    where gloo's worker threads would deadlock on the GIL or abort unjoined (SIGABRT)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def shard(batch: torch.Tensor, info: Distributed) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (whose size the world size divides)."""
    if not info.enabled:
        return batch
    return batch.view(info.world_size, -1)[info.rank]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average of a small float tensor over all ranks (every rank gets the same numbers)."""
    if not _active():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. its decision to stop)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not _active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def in_turn(fn: Callable[[], T], info: Distributed) -> T:
    """`fn()` on every rank: global rank 0 first, then the first rank of every other node, then
    the rest, so a cache file the first call writes is reused by the others, never written by
    several at once (node-local or shared cache directories alike)."""
    if not info.enabled:
        return fn()
    turns = (info.rank == 0, info.rank != 0 and info.local_rank == 0, info.local_rank != 0)
    for mine in turns:
        if mine:
            result = fn()
        dist.barrier()
    return result


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def gather_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, labels) concatenated in rank order: the global batch.

    Only the local slice carries gradient, scaled by the world size: every rank computes the
    same loss L, rank r back-propagates world_size * dL/d(its features), and DDP's averaging
    then yields exactly dL/d(weights) of one process over the global batch.
    """
    if not _active():
        return features, labels
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(features, float(world))
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_parts, labels.contiguous())
    return torch.cat(parts), torch.cat(label_parts)


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm with statistics over the global batch on CPU process groups.

    Two differentiable all-reduces per layer (sum and count, then the sum of squared
    deviations), so the backward pass sums each rank's gradient contributions to the shared
    statistics, as nn.SyncBatchNorm does on GPUs. Outside training (or of a process group) it
    is an ordinary batch norm; its parameters and buffers are those of the layer it replaces.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        totals = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(n))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As nn.BatchNorm: exponential (or cumulative) average, unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * n / max(n - 1, 1.0), factor)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every batch norm of `module` by its synchronised version (in place where it can)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        synced = GlooSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean = module.running_mean
            synced.running_var = module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module
