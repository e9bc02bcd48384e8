"""Split arithmetic: coverage, disjointness, equal batch counts; DALI's sharding checked for real."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.split import (
    SplitError,
    batches_per_rank,
    dali_reader_batches,
    fraction_sizes,
    global_index,
    rank_range,
    shard_order,
    worker_plan,
)

CASES = [
    [16] * 8,  # even shards
    [10, 3, 7, 1, 12],  # uneven shards
    [33],  # one shard, fewer shards than ranks x workers
    [5, 5, 5, 0, 4],  # an empty shard
]


def _epoch(sizes, world, workers, batch, train, epoch=0, seed=0):
    """Per rank: (real indices, number of padding samples, batch count summed over workers)."""
    out = []
    for r in range(world):
        real, pad, nb = [], 0, 0
        for w in range(workers):
            p = worker_plan(sizes, rank=r, world_size=world, worker=w, num_workers=workers,
                            batch=batch, train=train, seed=seed, epoch=epoch)
            assert p.num_real + p.pad == p.num_batches * batch
            real.extend(global_index(sizes, p.segments).tolist())
            pad += p.pad
            nb += p.num_batches
        out.append((real, pad, nb))
    return out


@pytest.mark.parametrize("sizes", CASES)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_val_covers_every_sample_once(sizes, world, workers):
    n, batch = sum(sizes), 4
    ranks = _epoch(sizes, world, workers, batch, train=False)
    everything = [i for real, _, _ in ranks for i in real]
    assert sorted(everything) == list(range(n))  # union covers, ranks (and workers) disjoint
    counts = {nb for _, _, nb in ranks}
    assert counts == {batches_per_rank(n, world, batch, train=False)}  # equal on every rank
    for r, (real, pad, nb) in enumerate(ranks):
        a, b = rank_range(n, r, world)
        assert sorted(real) == list(range(a, b))
        assert len(real) + pad == nb * batch


@pytest.mark.parametrize("sizes", CASES)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_train_drops_remainder_equal_counts(sizes, world, epoch):
    n, batch = sum(sizes), 4
    ranks = _epoch(sizes, world, 2, batch, train=True, epoch=epoch, seed=7)
    expect = (n // world) // batch
    everything = [i for real, _, _ in ranks for i in real]
    assert len(everything) == len(set(everything)) == world * expect * batch  # disjoint, no repeats
    assert set(everything) <= set(range(n))
    for real, pad, nb in ranks:
        assert pad == 0 and nb == expect and len(real) == expect * batch


def test_train_reshuffles_shards_per_epoch_same_on_all_ranks():
    sizes = [4] * 10
    assert shard_order(10, seed=3, epoch=0, shuffle=True) == shard_order(10, seed=3, epoch=0, shuffle=True)
    assert shard_order(10, seed=3, epoch=0, shuffle=True) != shard_order(10, seed=3, epoch=1, shuffle=True)
    assert shard_order(10, seed=3, epoch=5, shuffle=False) == list(range(10))
    e0 = _epoch(sizes, 2, 1, 4, train=True, epoch=0, seed=3)
    e1 = _epoch(sizes, 2, 1, 4, train=True, epoch=1, seed=3)
    assert e0[0][0] != e1[0][0]
    # two ranks computing the same epoch independently still partition the data
    assert not set(e1[0][0]) & set(e1[1][0])


def test_whole_shards_when_there_are_enough():
    sizes = [8] * 6
    for r in range(3):
        p = worker_plan(sizes, rank=r, world_size=3, worker=0, num_workers=1, batch=4, train=False)
        assert [len(s) for s in p.segments] == [8, 8]  # two whole shards each, no cuts


def test_too_small_is_a_clear_error():
    with pytest.raises(SplitError, match="too few"):
        batches_per_rank(10, 3, 4, train=True)
    with pytest.raises(SplitError, match="fewer than"):
        batches_per_rank(2, 3, 4, train=False)
    with pytest.raises(SplitError):
        worker_plan([4], rank=2, world_size=2, worker=0, num_workers=1, batch=1, train=False)


@pytest.mark.parametrize(("n", "world", "batch"), [(33, 2, 4), (10, 3, 4), (9, 2, 4)])
def test_dali_reader_matches_our_arithmetic(tmp_path, n, world, batch):
    """Run DALI's real reader (CPU) with the sharding flags make_loader uses."""
    from nvidia.dali import fn, pipeline_def

    files = []
    for i in range(n):
        p = tmp_path / f"{i:03d}.bin"
        p.write_bytes(bytes([i]))
        files.append(str(p))

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe(shard_id):
        _, label = fn.readers.file(files=files, labels=list(range(n)), shard_id=shard_id, num_shards=world,
                                   pad_last_batch=True, stick_to_shard=True, name="Reader")
        return label

    nb = dali_reader_batches(n, world, batch)
    for r in range(world):
        p = pipe(r)
        p.build()
        seen = [int(np.asarray(x).reshape(-1)[0]) for _ in range(nb) for x in p.run()[0]]
        a, b = rank_range(n, r, world)
        assert seen == list(range(a, b)) + [b - 1] * (nb * batch - (b - a))
        # the next epoch starts again at the rank's first sample
        assert int(np.asarray(p.run()[0][0]).reshape(-1)[0]) == a


def test_fraction_sizes_take_the_leading_samples():
    assert fraction_sizes([7, 3, 9, 5], 0.5) == [7, 3, 2, 0]
    assert fraction_sizes([7, 3, 9, 5], 1.0) == [7, 3, 9, 5]
    assert fraction_sizes([10, 0, 10], 0.55) == [10, 0, 1]  # round(11.0)
    assert fraction_sizes([3], 0.1) == [0]  # round(0.3): nothing left; batches_per_rank then refuses
    sizes = fraction_sizes([16] * 8, 0.3)  # 38 samples: every rank of 3 still gets the same batch count
    assert sum(sizes) == 38 and [n for _, _, n in _epoch(sizes, 3, 2, 4, True)] == [3, 3, 3]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(SplitError, match="fraction"):
            fraction_sizes([4], bad)
