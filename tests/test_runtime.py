from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.mark.usefixtures("single_torch_thread")  # starts at 1 thread, restores the count after
def test_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert set_threads() == usable_cores()
