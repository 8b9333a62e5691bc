"""Process settings: how many threads torch computes with."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota.

    torch's default thread count is the machine's core count, which oversubscribes a container
    whose quota allows fewer (threads then wait on each other at every parallel region).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return cores


def set_threads() -> int:
    """Use `usable_cores()` torch threads unless OMP_NUM_THREADS chose a number; returns it."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cores())
    log.debug("torch threads: %d", torch.get_num_threads())
    return torch.get_num_threads()
