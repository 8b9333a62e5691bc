from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facelab.runtime import set_threads, usable_cores


def test_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    unlimited = usable_cores(tmp_path / "missing")
    assert unlimited >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # one CPU's worth of time per period
    assert usable_cores(quota) == 1
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == unlimited
    quota.write_text("garbage\n")
    assert usable_cores(quota) == unlimited


@pytest.mark.usefixtures("single_torch_thread")  # restores the thread count after
def test_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    # a count no core detection gives, so that ignoring the variable cannot pass on any machine
    chosen = usable_cores() + 2
    torch.set_num_threads(chosen)  # what torch made of OMP_NUM_THREADS at start-up
    monkeypatch.setenv("OMP_NUM_THREADS", str(chosen))
    assert set_threads() == chosen and torch.get_num_threads() == chosen
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert set_threads() == usable_cores() == torch.get_num_threads()
