"""PyTorch DataLoader over packed shards: WebDataset, LMDB, TFRecord.

The workers (`batches.ShardBatches`) each read the records `split.worker_plan` gives them
(contiguous runs of whole batches), decode, letterbox/augment and yield finished batches; the
DataLoader only moves them (``batch_size=None``). So the rank's batch count is
`split.batches_per_rank` whatever the number of workers. Workers persist across epochs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from packer.images import configure_worker
from trainer.data.batches import ShardBatches
from trainer.data.common import SplitData, default_device, default_workers, to_device
from trainer.data.records import RecordSource
from trainer.data.slots import from_transit
from trainer.data.split import batches_per_rank, epoch_shards
from trainer.data.transforms import AugmentConfig

log = logging.getLogger("trainer.data")

__all__ = ["RecordSource", "TorchLoader"]


class TorchLoader:
    """The `Loader` contract over a torch DataLoader (see trainer.data.make_loader)."""

    kind = "torch"

    def __init__(self, data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                 seed: int, workers: int | None, device: str | torch.device, augment: AugmentConfig,
                 pin_memory: bool | None = None, persistent_workers: bool | None = None,
                 prefetch_factor: int | None = None, fast_decode: bool = False, cache=None):  # noqa: ANN001
        """fast_decode: libjpeg-turbo's fast DCT (off by default: it does not pay, see `decode`).
        cache: a `decoded_cache.DecodedCache` to read pixels from instead of the shards."""
        # before any worker forks: OpenCV's thread pool does not survive a fork (a forked worker
        # can hang in it), and the workers are the parallelism anyway (ultralytics does the same)
        configure_worker()
        self.data = data
        self.names = list(data.manifest.names)
        self.num_samples = data.info.num_samples
        self.batch, self.imgsz, self.train = batch, imgsz, train
        self._len = batches_per_rank(self.num_samples, world_size, batch, train=train)
        self.device = default_device(device, rank)
        if workers is None:
            workers = default_workers()
        workers = max(0, min(workers, self._len))  # more workers than batches would idle
        self.workers = workers
        # network storage: WebDataset tars are streamed; tfrecord/LMDB need random access, so each
        # epoch first fetches the shard files this rank reads into the local cache
        self.stream = data.remote and data.fmt == "wds"
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._epoch = 0
        self._fetched_epoch: int | None = None
        self.fetched: set[str] = set()  # shard files this rank copied from network storage
        cuda = self.device.type == "cuda"
        pin = cuda if pin_memory is None else (pin_memory and cuda)
        self.dataset = ShardBatches(data, imgsz=imgsz, batch=batch, train=train, rank=rank, world_size=world_size,
                                    seed=seed, augment=augment, num_workers=workers, stream=self.stream,
                                    fast_decode=fast_decode, cache=cache,
                                    mapped=not pin)
        self._fetch()  # bad or unreachable data fails here, before training starts
        kw: dict = {}
        if workers > 0:
            kw["persistent_workers"] = True if persistent_workers is None else persistent_workers
            kw["prefetch_factor"] = prefetch_factor or 2
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                 pin_memory=pin, **kw)
        self.stats = {"corrupt_skipped": 0}

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = int(epoch)
        self._epoch = int(epoch)

    def _fetch(self) -> None:
        """Cache this epoch's shard files of this rank (remote tfrecord/LMDB only)."""
        if not self.data.remote or self.stream:
            return
        # validation reads the same shards every epoch (no shuffle): one fetch is enough
        epoch = self._epoch if self.train else 0
        if self._fetched_epoch == epoch:
            return
        ids = epoch_shards(self.data.shard_sizes, rank=self.rank, world_size=self.world_size, batch=self.batch,
                           train=self.train, seed=self.seed, epoch=epoch)
        self.data.fetch(ids)
        self.fetched.update(self.data.info.shards[i].path for i in ids)
        self._fetched_epoch = epoch

    def set_mosaic(self, enabled: bool) -> None:
        self.dataset.mosaic.value = int(bool(enabled))

    def __iter__(self) -> Iterator[dict]:
        self._fetch()
        if self.data.remote and self.workers:
            # fsspec closes a dropped filesystem's HTTP session on its event loop; a fork must not
            # inherit such garbage (the child has no loop thread: each close would wait ~1 s)
            gc.collect()
        n = 0
        self.dataset.slots.poll()  # batches of the last epoch dropped since: their buffers are free again
        for b in map(from_transit, self.loader):
            self.stats["corrupt_skipped"] += int(b.pop("_corrupt", 0))
            w, k = b.pop("_slot", (0, -1))
            n += 1
            if b["img"] is None:  # a mapped slot: freed when the consumer drops the batch
                b["img"] = self.dataset.slots.received(w, k).permute(0, 3, 1, 2)
                k = -1
            out = to_device(b, self.device, non_blocking=True)
            if k >= 0:  # a pooled buffer: reusable once copied (pinned / on the GPU) or dropped
                self.dataset.slots.release_when_dropped(b["img"], w, k, copied=out["img"] is not b["img"]
                                                        or bool(b["img"].is_pinned()))
            del b
            yield out
        if n != self._len:  # by construction impossible; never let a rank silently desynchronise
            raise RuntimeError(f"torch loader yielded {n} batches, expected {self._len}")

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None  # type: ignore[assignment]


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate step for finished batches: keep them as they are (torch's default
    would turn the label arrays into tensors inside the worker; see `slots.from_transit`)."""
    return batch
