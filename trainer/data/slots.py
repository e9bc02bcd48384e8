"""Batch buffers shared between the torch loader's workers and the main process, and the form in
which a finished batch crosses between them.

The pixels of a batch (19.7 MB at 640 x 16) are written by a worker into one of a few buffers
it reuses (`SlotPool`) instead of a fresh shared tensor per batch; the labels cross as numpy
arrays (`from_transit`).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import weakref

import numpy as np
import torch

POOL = 5  # shared batch buffers per worker: prefetch (2) + the batch being built + the consumer's + one
FREE, FILLED, HELD = 0, 1, 2  # a slot's flag: free; written by its worker (in flight); received by the consumer


def from_transit(batch: dict) -> dict:
    """A batch as it left a worker, with its label arrays back as tensors (zero-copy). Each tensor
    a worker returns costs a new shared-memory file and a file-descriptor hand-over over a socket,
    about 1 ms of main-process time each (profiled: the 6 tensors of a batch took 10 % of a core
    at 700 img/s, 3 % once the labels crossed as arrays pickled by value and the pixels as a slot
    number)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class SlotPool:
    """Every worker's batch buffers and their free/busy flags, set up before the workers fork.

    A worker takes a free buffer (or, all busy, allocates an extra one that is not reused). The
    main process marks a buffer held when its batch arrives and frees it when the batch has been
    copied (pinned or moved to the GPU) or once the consumer has dropped every tensor on it. A
    batch the DataLoader discards (an epoch abandoned mid-way) never arrives: its worker frees
    such buffers when it starts its next epoch (`reclaim`). ``mapped``: the buffers are anonymous shared
    memory mapped before the fork, so a batch crosses to the main process as its slot number
    alone (a tensor would cost a file-descriptor hand-over, see `from_transit`). Not mapped (when
    the DataLoader pins batches for a GPU): torch shared tensors made by each worker, which the
    DataLoader hands over and pins."""

    def __init__(self, workers: int, shape: tuple[int, ...], per_worker: int = POOL, mapped: bool = True):
        self.per_worker, self.shape = per_worker, shape
        n = max(workers, 1) * per_worker
        self.flags = mp.get_context().Array("b", n, lock=False)
        # MAP_SHARED | MAP_ANONYMOUS: inherited by forked workers; pages exist once written
        self._maps = [mmap.mmap(-1, math.prod(shape)) for _ in range(n)] if mapped and workers else None
        self._tensors: dict[int, torch.Tensor] = {}  # not mapped: this worker's own shared tensors
        self._pending: list[tuple[object, int]] = []  # (StorageWeakRef, flag) in the main process

    @property
    def mapped(self) -> bool:
        return self._maps is not None

    def take(self, worker: int) -> int:
        base = worker * self.per_worker
        for k in range(self.per_worker):
            if self.flags[base + k] == FREE:
                self.flags[base + k] = FILLED
                return k
        return -1

    def reclaim(self, worker: int) -> None:
        """Worker side, at the start of its epoch: buffers still FILLED held batches the DataLoader
        discarded when the last epoch was abandoned (every batch of a finished epoch arrived), so no
        one will free them; without this the pool silently ran dry after a few abandoned epochs."""
        base = worker * self.per_worker
        for k in range(self.per_worker):
            if self.flags[base + k] == FILLED:
                self.flags[base + k] = FREE

    def buffer(self, worker: int, k: int) -> torch.Tensor:
        """Worker side: the (B, S, S, 3) uint8 buffer of slot k."""
        flag = worker * self.per_worker + k
        if self._maps is not None:
            return torch.from_numpy(self._array(flag))
        if flag not in self._tensors:
            self._tensors[flag] = torch.empty(self.shape, dtype=torch.uint8).share_memory_()
        return self._tensors[flag]

    def received(self, worker: int, k: int) -> torch.Tensor:
        """Main process (mapped): a tensor on slot k of `worker`, whose slot is freed once the
        last tensor on it is gone (the numpy view under it is then collected)."""
        flag = worker * self.per_worker + k
        self.flags[flag] = HELD
        arr = self._array(flag)
        weakref.finalize(arr, self._free, flag)
        return torch.from_numpy(arr)

    def _array(self, flag: int) -> np.ndarray:
        assert self._maps is not None
        return np.frombuffer(self._maps[flag], dtype=np.uint8).reshape(self.shape)

    def _free(self, flag: int) -> None:
        self.flags[flag] = FREE

    def release_when_dropped(self, img: torch.Tensor, worker: int, k: int, copied: bool) -> None:
        """Main process (not mapped): `img` came from buffer k of `worker`; free it now (copied)
        or once dropped."""
        from torch.multiprocessing.reductions import StorageWeakRef

        flag = worker * self.per_worker + k
        if copied:
            self.flags[flag] = FREE
        else:
            self.flags[flag] = HELD
            self._pending.append((StorageWeakRef(img.untyped_storage()), flag))
        self.poll()

    def poll(self) -> None:
        still = []
        for ref, flag in self._pending:
            if ref.expired():  # type: ignore[attr-defined]
                self.flags[flag] = FREE
            else:
                still.append((ref, flag))
        self._pending = still
