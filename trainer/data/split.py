"""Which samples each rank and worker reads, and how many batches every rank yields.

Pure arithmetic on the manifest's shard sample counts; no I/O. Both loader families use it,
so the batch count is known before the first batch and is identical on every rank.

Conventions (documented in README):

- Samples are numbered globally in manifest order: shard 0's records, then shard 1's, ...
- Each rank takes a contiguous range of the epoch's sample sequence,
  ``[floor(r*N/W), floor((r+1)*N/W))`` -- the same split DALI's readers make with
  ``shard_id=r, num_shards=W``.  The torch loaders apply it to the shard sequence in the
  epoch's shard order, so a rank reads whole shards except at most one cut at each end.
- **train**: the remainder is dropped. Every rank yields ``(N // W) // B`` batches.
- **validation**: nothing is dropped. Every rank yields ``ceil(ceil(N/W) / B)`` batches; a
  rank's last batch is completed with repeats of its last sample, flagged ``valid=False``.
  (This is exactly what DALI's ``pad_last_batch=True, stick_to_shard=True`` reader does.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from packer.errors import PackerError


class SplitError(PackerError, ValueError):
    """The split cannot feed the requested world size and batch."""


@dataclass(frozen=True)
class Segment:
    """Records ``[start, stop)`` of shard ``shard`` (positions inside the shard)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) reads in one epoch: ``segments`` in order, then ``pad``
    repeats of ``pad_sample`` (padding, ``valid=False``). Its length is always a
    whole number of batches: ``num_batches * batch``."""

    segments: tuple[Segment, ...]
    pad: int
    num_batches: int
    pad_sample: Segment | None = None  # the record repeated as padding (the rank's last sample)

    @property
    def num_real(self) -> int:
        return sum(len(s) for s in self.segments)


def check_args(num_samples: int, world_size: int, rank: int, batch: int) -> None:
    """Raise SplitError on an impossible (rank, world_size, batch) combination."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SplitError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch < 1:
        raise SplitError(f"batch must be >= 1, got {batch}")
    if num_samples < 0:
        raise SplitError(f"negative sample count {num_samples}")


def batches_per_rank(num_samples: int, world_size: int, batch: int, *, train: bool) -> int:
    """Batches every rank yields per epoch (identical on all ranks by construction).

    train: ``(N // W) // B`` (remainder dropped); validation: ``ceil(ceil(N / W) / B)``.
    Raises SplitError when that is zero: the data cannot feed ``world_size x batch``.
    """
    check_args(num_samples, world_size, 0, batch)
    if train:
        n = (num_samples // world_size) // batch
        if n == 0:
            raise SplitError(
                f"the split has {num_samples} samples: too few to give each of {world_size} rank(s) "
                f"one full training batch of {batch} (need at least {world_size * batch}); "
                "lower --batch or the number of processes"
            )
        return n
    if num_samples < world_size:
        raise SplitError(
            f"the split has {num_samples} samples: fewer than the {world_size} processes that must share it"
        )
    return math.ceil(math.ceil(num_samples / world_size) / batch)


def fraction_sizes(shard_sizes: Sequence[int], fraction: float) -> list[int]:
    """Shard sample counts of the first ``round(N * fraction)`` samples of the split (ultralytics'
    ``fraction``: the leading share of the samples, in manifest order): whole shards, then one cut
    shard, then empty ones. Applied before the rank split, so every rank still yields the same
    number of batches."""
    if not 0 < fraction <= 1:
        raise SplitError(f"fraction must be in (0, 1], got {fraction}")
    left = round(int(sum(shard_sizes)) * fraction)
    out = []
    for n in shard_sizes:
        out.append(min(int(n), left))
        left -= out[-1]
    return out


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's sample range of shard ``rank`` of ``world_size``: ``[floor(rN/W), floor((r+1)N/W))``."""
    return (rank * num_samples) // world_size, ((rank + 1) * num_samples) // world_size


def dali_reader_batches(num_samples: int, world_size: int, batch: int) -> int:
    """Batches one DALI reader epoch has with ``pad_last_batch=True, stick_to_shard=True``:
    every shard is padded (last sample repeated) to ``ceil(N/W)`` and then to a multiple of
    ``batch``. Verified against DALI 2.4.0 (tests/test_split.py)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch)


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order in which the shards are dealt out this epoch; the same on every rank
    (depends on ``seed + epoch`` only)."""
    order = list(range(num_shards))
    if shuffle:
        np.random.default_rng(seed + epoch).shuffle(order)
    return order


def _slice_sequence(
    sizes: Sequence[int], order: Sequence[int], start: int, stop: int
) -> list[Segment]:
    """Segments covering positions ``[start, stop)`` of the concatenation of shards in ``order``."""
    out: list[Segment] = []
    pos = 0
    for s in order:
        n = int(sizes[s])
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append(Segment(s, lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


def worker_plan(
    shard_sizes: Sequence[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool | None = None,
) -> WorkerPlan:
    """The samples worker ``worker`` of rank ``rank`` reads this epoch.

    The rank's range is cut into its batches; the workers take contiguous blocks of whole
    batches (``[floor(wL/nw), floor((w+1)L/nw))``), so each worker reads neighbouring records
    (whole shards where there are enough) and the rank's batch count never depends on the
    number of workers. When there are fewer shards than ranks x workers this splits inside
    shards by sample, so no rank or worker is left without data while others have some.
    """
    n = int(sum(shard_sizes))
    check_args(n, world_size, rank, batch)
    if not 0 <= worker < max(num_workers, 1):
        raise SplitError(f"worker {worker} is not in [0, {num_workers})")
    nw = max(num_workers, 1)
    shuffle = train if shuffle is None else shuffle
    nb = batches_per_rank(n, world_size, batch, train=train)
    order = shard_order(len(shard_sizes), seed=seed, epoch=epoch, shuffle=shuffle)
    r0, r1 = rank_range(n, rank, world_size)
    real = min(r1 - r0, nb * batch)  # train: drop the remainder; val: all of the range
    b0, b1 = (worker * nb) // nw, ((worker + 1) * nb) // nw
    s0, s1 = b0 * batch, b1 * batch  # this worker's positions in the rank's padded sequence
    segs = _slice_sequence(shard_sizes, order, r0 + min(s0, real), r0 + min(s1, real))
    pad = max(0, s1 - max(s0, real))
    pad_sample = _slice_sequence(shard_sizes, order, r0 + real - 1, r0 + real)[0] if pad else None
    return WorkerPlan(tuple(segs), pad, b1 - b0, pad_sample)


def global_index(shard_sizes: Sequence[int], segments: Sequence[Segment]) -> np.ndarray:
    """Global (manifest-order) sample indices of the records in ``segments``, in order."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(shard_sizes, dtype=np.int64))])
    if not segments:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(starts[s.shard] + s.start, starts[s.shard] + s.stop) for s in segments])


def rank_segments(shard_sizes: Sequence[int], rank: int, world_size: int) -> list[Segment]:
    """The records of DALI's shard ``rank`` of ``world_size`` (`rank_range`, manifest order) as
    segments of shard files: whole files inside the range, at most one cut file at each end."""
    n = int(sum(shard_sizes))
    r0, r1 = rank_range(n, rank, world_size)
    return _slice_sequence(shard_sizes, range(len(shard_sizes)), r0, r1)


def epoch_shards(
    shard_sizes: Sequence[int],
    *,
    rank: int,
    world_size: int,
    batch: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> list[int]:
    """Shard files rank ``rank`` reads in this epoch (all of its workers together; the padding
    sample included), per `worker_plan`: what a rank must have locally before the epoch."""
    plan = worker_plan(shard_sizes, rank=rank, world_size=world_size, worker=0, num_workers=1, batch=batch,
                       train=train, seed=seed, epoch=epoch)
    out = {s.shard for s in plan.segments}
    if plan.pad_sample is not None:
        out.add(plan.pad_sample.shard)
    return sorted(out)
