"""The data-stall meter: wait time counted as stall on CPU; on CUDA no device-wide sync per step."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.stall import StallMeter


def test_cpu_meter_counts_loader_waits_as_stall():
    meter = StallMeter(torch.device("cpu"))
    x = torch.randn(64, 64)
    for _ in range(3):
        meter.waiting()
        time.sleep(0.02)  # the loader is slow
        meter.got_batch()
        for _ in range(5):
            x = torch.tanh(x @ x)  # the step
        meter.step_done(4)
    img_s, stall = meter.read()
    assert meter.images == 12 and meter.stall_s >= 0.06 and meter.total_s >= meter.stall_s
    assert 0 < stall <= 100 and img_s > 0
    meter.reset()
    assert meter.read() == (0.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meter_never_syncs_the_device_per_step(monkeypatch):
    meter = StallMeter(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")

    def forbidden(*a, **kw):
        raise AssertionError("torch.cuda.synchronize() in the step path")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    for slow in (True, False) * 3:
        meter.waiting()
        if slow:
            time.sleep(0.05)  # a starved step: the GPU goes idle
        meter.got_batch()
        for _ in range(4):
            x = torch.tanh(x @ x)
        meter.step_done(8)
    monkeypatch.undo()
    img_s, stall = meter.read()  # waits on the steps' events only now
    assert meter.images == 48 and img_s > 0
    assert 0 < meter.stall_s <= 3 * 0.05 + 0.05 and 0 < stall < 100
