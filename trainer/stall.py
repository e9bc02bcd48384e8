"""The data-stall meter: how much of the training time the model spent waiting for batches.

On CPU everything is synchronous: a step's time is wall time from asking the loader for a batch
to the end of the optimizer step, and the stall is the part spent inside the loader (as before).

On CUDA the host only queues kernels, so wall time around a step measures the launch queue, and a
`torch.cuda.synchronize()` per step to fix that would itself cost throughput. Instead each step
records two CUDA events (batch in hand, step queued) and they are read later, when the GPU has
passed them (`Event.query`, non-blocking), or on log steps and at the end of the epoch. The GPU
timeline is then the steps' kernel time plus the idle gaps between steps; a gap counts as data
stall up to the time the host spent waiting in the loader just before it (the rest of a gap is
host overhead, not data).
"""

from __future__ import annotations

import time
from collections import deque

import torch

STALL_WARN_PCT = 10.0  # warn when more than this share of step time is spent waiting for data


class StallMeter:
    """Per-epoch images/s and data-stall share; `reset()` at each epoch, then per step
    `waiting()` -> (next batch) -> `got_batch()` -> (step) -> `step_done(images)`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.images = 0  # images of the steps measured so far
        self.total_s = 0.0  # step time (CPU: wall; CUDA: GPU timeline incl. idle gaps)
        self.stall_s = 0.0  # of which waiting for data
        self._t0 = self._wait = 0.0
        self._start: torch.cuda.Event | None = None
        self._last_end: torch.cuda.Event | None = None
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event, float, int]] = deque()

    def waiting(self) -> None:
        """Called just before asking the loader for the next batch."""
        self._t0 = time.perf_counter()

    def got_batch(self) -> None:
        """Called when the batch is in hand, before it is moved to the device."""
        self._wait = time.perf_counter() - self._t0
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def step_done(self, images: int) -> None:
        """Called after the step's work is queued (on CPU: done)."""
        if not self.cuda:
            self.images += images
            self.total_s += time.perf_counter() - self._t0
            self.stall_s += self._wait
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end, self._wait, images))
        self._resolve(block=False)

    def _resolve(self, block: bool) -> None:
        """Fold in the measured steps whose events the GPU has passed (all of them if `block`)."""
        while self._pending:
            start, end, wait, images = self._pending[0]
            if not block and not end.query():
                return
            end.synchronize()
            # the first step of an epoch: the GPU waited for the whole first batch
            gap = self._last_end.elapsed_time(start) / 1e3 if self._last_end is not None else wait
            self.total_s += max(gap, 0.0) + start.elapsed_time(end) / 1e3
            self.stall_s += min(max(gap, 0.0), wait)
            self.images += images
            self._last_end = end
            self._pending.popleft()

    def read(self, world: int = 1) -> tuple[float, float]:
        """(images/s over all `world` ranks, stall %) so far; on CUDA this waits for the queued steps,
        so call it on log steps and at the end of an epoch only."""
        self._resolve(block=True)
        t = max(self.total_s, 1e-9)
        return self.images * world / t, 100 * self.stall_s / t


def stall_advice(kind: str, workers: int | None) -> str:
    """Which knob to try when the model waits for data, given the loader in use."""
    w = f"more --workers (now {workers if workers is not None else 'the default'})"
    disk = "or shards on a faster local disk (NVMe, /dev/shm)"
    if kind == "torch":
        where = "GPU decoding" if torch.cuda.is_available() else "needs a GPU to help"
        return f"try {w}, --loader dali ({where}), {disk}"
    if kind == "dali-cpu":
        return (f"decoding runs on the CPU here: try --loader torch (faster than DALI's CPU pipeline on CPU-only "
                f"machines), {w} (DALI threads), a smaller packed size, {disk}")
    return f"try {w}, {disk}"
