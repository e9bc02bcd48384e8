"""PyTorch DataLoader over packed shards: WebDataset (via `webdataset`), LMDB, TFRecord.

Each DataLoader worker reads the records `split.worker_plan` gives it (contiguous runs of
whole batches), decodes with OpenCV, letterboxes/augments with `transforms`, and yields
finished batches; the DataLoader only moves them (``batch_size=None``). So the rank's
batch count is `split.batches_per_rank` whatever the number of workers.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import cv2
import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from packer.format import (
    WDS_BOX,
    WDS_CLASS,
    WDS_IMAGE,
    WDS_META,
    FormatError,
    Record,
    decode_lmdb_record,
    lmdb_key,
)
from trainer.data.common import SplitData, build_batch, default_device, default_workers, to_device
from trainer.data.split import Segment, batches_per_rank, epoch_shards, worker_plan
from trainer.data.transforms import (
    AugmentConfig,
    augment_boxes,
    augment_image,
    letterbox,
    letterbox_into,
    norm_to_tile,
    partner_ids,
    sample_params,
    xyxy_to_yolo,
)

log = logging.getLogger("trainer.data")
# As ultralytics does at import: OpenCV's thread pool does not survive the fork of DataLoader
# workers (a forked worker can hang in it), and workers are the parallelism anyway.
cv2.setNumThreads(0)

SHUFFLE_BUFFER = 256  # records (still JPEG bytes) mixed before decoding
MOSAIC_POOL = 64  # recent decoded tiles that mosaic partners are drawn from (as ultralytics' buffer)


# ----------------------------------------------------------------------------- record access


class LmdbRecords(Dataset):
    """Map-style access to a packed LMDB split: ``ds[i]`` is the Record of sample i."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _txn(self) -> lmdb.Transaction:
        if self._env is None or self._pid != os.getpid():  # never share an environment across fork
            self._env = lmdb.open(str(self.path), subdir=False, readonly=True, lock=False, readahead=False,
                                  meminit=False, max_readers=64)
            self._pid = os.getpid()
        return self._env.begin(buffers=True)

    def __len__(self) -> int:
        with self._txn() as t:
            return int(bytes(t.get(b"__count__")))

    def __getitem__(self, i: int) -> Record:
        with self._txn() as t:
            buf = t.get(lmdb_key(i))
            if buf is None:
                raise FormatError(f"{self.path}: sample {i} missing")
            return decode_lmdb_record(buf)


def _wds_index(text: str) -> list[tuple[int, int]]:
    """(header offset of the sample's first member, end of its last member's data) per sample."""
    lines = text.splitlines()
    out = []
    for line in lines[1:]:
        parts = line.split()
        offs = [int(parts[i + 1]) for i in range(0, len(parts), 4)]
        sizes = [int(parts[i + 2]) for i in range(0, len(parts), 4)]
        out.append((offs[0] - 512, offs[-1] + sizes[-1]))
    return out


class _Window(io.RawIOBase):
    """At most `length` bytes of an open binary file from its current position, so a tar
    stream can start mid-archive and stop at a sample boundary (local or remote file)."""

    def __init__(self, f: IO[bytes], length: int):
        self._f = f
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(b)[:n])  # local files and fsspec files both fill in place
        self._left -= got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _wds_record(sample: dict) -> Record:
    meta = json.loads(sample[WDS_META])
    return Record(
        key=meta["key"], source=meta["source"], jpeg=sample[WDS_IMAGE], height=meta["height"],
        width=meta["width"], orig_height=meta["orig_height"], orig_width=meta["orig_width"],
        cls=np.frombuffer(sample[WDS_CLASS], dtype="<i4"), boxes=np.frombuffer(sample[WDS_BOX], dtype="<f4"),
    )


class RecordSource:
    """Reads records of one split by (shard, position), in whichever format it was packed.

    Opened lazily in each worker. `segment` yields ``(pos, Record | Exception)`` so one bad
    record never stops the stream. With `stream` (a WebDataset split on network storage) tar
    members are read straight from the remote shards: each segment is one sequential read of
    just its byte range (the index file, a few KB, gives the offsets).
    """

    def __init__(self, data: SplitData, stream: bool = False):
        self.fmt = data.fmt
        self.paths = [data.shard_path(i) for i in range(len(data.info.shards))]
        self.index_paths = [data.index_path(i) if self.fmt != "lmdb" else None for i in range(len(self.paths))]
        self.stream = stream
        if stream and (data.url is None or self.fmt != "wds"):
            raise ValueError("streaming reads WebDataset shards on network storage only")
        self.url, self.storage_options = data.url, data.storage_options
        self.rels = [(sh.path, sh.index) for sh in data.info.shards]
        self._open: dict[int, object] = {}
        self._fs: tuple[int, object, str] | None = None

    def _remote(self) -> tuple[object, str]:
        """This process's filesystem object (never shared across fork: its sessions would be)."""
        if self._fs is None or self._fs[0] != os.getpid():
            from packer.remote import get_fs

            fs, root = get_fs(self.url, self.storage_options)
            self._fs = (os.getpid(), fs, root)
        return self._fs[1], self._fs[2]

    def _reader(self, shard: int):  # noqa: ANN202
        r = self._open.get(shard)
        if r is None:
            if self.fmt == "lmdb":
                r = LmdbRecords(self.paths[shard])
            elif self.fmt == "wds":
                if self.stream:
                    from packer.remote import join, read_bytes

                    fs, root = self._remote()
                    r = _wds_index(read_bytes(fs, join(root, self.rels[shard][1])).decode())
                else:
                    r = _wds_index(self.index_paths[shard].read_text())
            else:
                from packer.writers import open_reader

                r = open_reader("tfrecord", self.paths[shard])
            self._open[shard] = r
        return r

    def read(self, shard: int, pos: int) -> Record:
        r = self._reader(shard)
        if self.fmt == "lmdb":
            return r[pos]
        if self.fmt == "wds":
            return next(iter(self._wds_stream(shard, pos, pos + 1)))
        return r.read(pos)

    def _open_at(self, shard: int, offset: int) -> IO[bytes]:
        if not self.stream:
            f = open(self.paths[shard], "rb", buffering=0)  # noqa: SIM115 - closed by _Window
            f.seek(offset)
            return f
        from packer.remote import CHUNK, join, open_stream, retry

        if offset == 0:  # from the start: one streaming GET (http) / sequential ranges (object stores)
            return open_stream(join(self.url, self.rels[shard][0]), self.storage_options)
        fs, root = self._remote()
        f = retry(lambda: fs.open(join(root, self.rels[shard][0]), "rb", block_size=CHUNK, cache_type="readahead"))
        f.seek(offset)
        return f

    def _wds_stream(self, shard: int, start: int, stop: int) -> Iterator[Record]:
        idx = self._reader(shard)
        begin, end = idx[start][0], -(-idx[stop - 1][1] // 512) * 512  # end padded to a block
        win = _Window(self._open_at(shard, begin), end - begin)
        name = self.rels[shard][0] if self.stream else str(self.paths[shard])
        try:
            stream = io.BufferedReader(win, buffer_size=1 << 20)
            files = tar_file_expander([{"url": name, "stream": stream}])
            for sample in group_by_keys(files):
                yield _wds_record(sample)
        finally:
            win.close()

    def segment(self, seg: Segment) -> Iterator[tuple[int, Record | Exception]]:
        if self.fmt != "wds":
            for pos in range(seg.start, seg.stop):
                try:
                    yield pos, self.read(seg.shard, pos)
                except Exception as e:  # noqa: BLE001 - any damage to one record is that record's problem
                    yield pos, e
            return
        pos = seg.start
        try:
            for rec in self._wds_stream(seg.shard, seg.start, seg.stop):
                if pos >= seg.stop:
                    break
                yield pos, rec
                pos += 1
        except Exception as e:  # noqa: BLE001 - a damaged tar member: fall back to one-by-one reads
            yield pos, e
            pos += 1
        while pos < seg.stop:  # after damage (or a short stream) read the rest one at a time
            try:
                yield pos, self.read(seg.shard, pos)
            except Exception as e:  # noqa: BLE001
                yield pos, e
            pos += 1


def decode(rec: Record) -> np.ndarray:
    """JPEG bytes -> RGB uint8 HWC (FormatError when OpenCV cannot decode them)."""
    img = cv2.imdecode(np.frombuffer(rec.jpeg, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if img is None:
        raise FormatError(f"sample {rec.key}: image does not decode")
    return img


# ----------------------------------------------------------------------------- dataset


class ShardBatches(IterableDataset):
    """Yields this rank's batches (CPU tensors) for the current epoch; one worker's share each."""

    def __init__(self, data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                 seed: int, augment: AugmentConfig, num_workers: int, stream: bool = False):
        self.data, self.imgsz, self.batch, self.train = data, imgsz, batch, train
        self.stream = stream
        self.rank, self.world_size, self.seed, self.augment = rank, world_size, seed, augment
        self.num_workers = num_workers
        ctx = mp.get_context()
        # shared with (persistent) workers: set in the main process, read at each epoch start
        self.epoch = ctx.Value("i", 0, lock=False)
        self.mosaic = ctx.Value("b", 1, lock=False)
        self._source: RecordSource | None = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch = int(self.epoch.value)
        plan = worker_plan(self.data.shard_sizes, rank=self.rank, world_size=self.world_size, worker=w,
                           num_workers=nw, batch=self.batch, train=self.train, seed=self.seed, epoch=epoch)
        if self._source is None:
            self._source = RecordSource(self.data, stream=self.stream)
        rng = np.random.default_rng([self.seed, epoch, self.rank, w])
        mosaic = bool(self.mosaic.value)
        pool: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=MOSAIC_POOL)
        augment = self.train and not self.augment.is_off
        buf, labels, indices, valid, corrupt = self._new_batch(info is not None), [], [], [], 0
        for rec, ok, is_corrupt in self._samples(plan, rng):
            corrupt += is_corrupt
            idx = self.data.key_index.get(rec.key, -1)
            planes = buf.numpy()[len(labels)]
            if augment:
                tile, cls, tb = self._tile(rec)
                p = sample_params(rng, self.augment, self.imgsz, mosaic=mosaic)
                pool.append((tile, cls, tb))
                ids = partner_ids(p, len(pool) - 1, len(pool))
                img = augment_image([pool[i][0] for i in ids], p, self.imgsz)
                c, b = augment_boxes([(pool[i][1], pool[i][2]) for i in ids], p, self.imgsz)
                for ch, plane in enumerate(cv2.split(img)):  # HWC -> CHW
                    planes[ch] = plane
            else:  # letterbox only, straight into the batch; every label kept as is (validation needs all)
                img = rec._img  # type: ignore[attr-defined]
                letterbox_into(img, planes, self.imgsz)
                c, b = rec.cls.astype(np.int64), norm_to_tile(rec.boxes, img.shape[0], img.shape[1], self.imgsz)
            labels.append((c, xyxy_to_yolo(b, self.imgsz)))
            indices.append(idx)
            valid.append(ok and idx >= 0)
            if len(labels) == self.batch:
                yield self._collate(buf, labels, indices, valid, corrupt)
                buf, labels, indices, valid, corrupt = self._new_batch(info is not None), [], [], [], 0

    def _new_batch(self, in_worker: bool) -> torch.Tensor:
        t = torch.empty((self.batch, 3, self.imgsz, self.imgsz), dtype=torch.uint8)
        if in_worker:
            t.share_memory_()  # filled in place and handed to the main process without another copy
        return t

    def _tile(self, rec: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img = rec._img  # type: ignore[attr-defined]  # decoded in _samples
        tile = letterbox(img, self.imgsz)
        return tile, rec.cls.astype(np.int64), norm_to_tile(rec.boxes, img.shape[0], img.shape[1], self.imgsz)

    def _collate(self, img: torch.Tensor, labels, indices, valid, corrupt) -> dict:  # noqa: ANN001
        fixed = [i if i >= 0 else 0 for i in indices]
        b = build_batch(img, labels, fixed, valid, self.data, self.imgsz, self.train)
        b["_corrupt"] = corrupt
        return b

    def _samples(self, plan, rng) -> Iterator[tuple[Record, bool, int]]:  # noqa: ANN001
        """(decoded record, valid, corrupt-count) in this worker's order: the plan's records,
        shuffled through a buffer when training, then the padding repeats. A record that
        fails to read or decode is replaced by the last good one (valid=False)."""
        src = self._source
        assert src is not None
        last: Record | None = None
        owed = 0  # corrupt records met before any good one

        def records() -> Iterator[Record | Exception]:
            for seg in plan.segments:
                for _, r in src.segment(seg):
                    yield r

        def shuffled(it: Iterator[Record | Exception]) -> Iterator[Record | Exception]:
            if not self.train:
                yield from it
                return
            buf: list[Record | Exception] = []
            for r in it:
                buf.append(r)
                if len(buf) >= SHUFFLE_BUFFER:
                    j = int(rng.integers(len(buf)))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
            rng.shuffle(buf)
            yield from buf

        def good(r: Record | Exception) -> Record | None:
            if isinstance(r, Exception):
                log.warning("skipping a corrupt sample (%s); a copy of another sample takes its place", r)
                return None
            try:
                r._img = decode(r)  # type: ignore[attr-defined]
                return r
            except Exception as e:  # noqa: BLE001
                log.warning("skipping a corrupt sample (%s); a copy of another sample takes its place", e)
                return None

        for r in shuffled(records()):
            rec = good(r)
            if rec is None:
                if last is None:
                    owed += 1
                else:
                    yield last, False, 1
                continue
            while owed:
                owed -= 1
                yield rec, False, 1
            last = rec
            yield rec, True, 0
        if plan.pad:
            assert plan.pad_sample is not None
            pad = next(iter(src.segment(plan.pad_sample)))[1]
            rec = good(pad) or last
            if rec is None:
                raise FormatError(f"rank {self.rank}: every sample this worker read is corrupt")
            for _ in range(plan.pad):
                yield rec, False, 0
        if owed:
            raise FormatError(f"rank {self.rank}: every sample this worker read is corrupt")


# ----------------------------------------------------------------------------- the loader



class TorchLoader:
    """The `Loader` contract over a torch DataLoader (see trainer.data.make_loader)."""

    kind = "torch"

    def __init__(self, data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                 seed: int, workers: int | None, device: str | torch.device, augment: AugmentConfig,
                 pin_memory: bool | None = None, persistent_workers: bool | None = None,
                 prefetch_factor: int | None = None):
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
        self.dataset = ShardBatches(data, imgsz=imgsz, batch=batch, train=train, rank=rank, world_size=world_size,
                                    seed=seed, augment=augment, num_workers=workers, stream=self.stream)
        self._fetch()  # bad or unreachable data fails here, before training starts
        cuda = self.device.type == "cuda"
        kw: dict = {}
        if workers > 0:
            kw["persistent_workers"] = True if persistent_workers is None else persistent_workers
            kw["prefetch_factor"] = prefetch_factor or 2
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                 pin_memory=cuda if pin_memory is None else (pin_memory and cuda), **kw)
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
        for b in self.loader:
            self.stats["corrupt_skipped"] += int(b.pop("_corrupt", 0))
            n += 1
            yield to_device(b, self.device, non_blocking=True)
        if n != self._len:  # by construction impossible; never let a rank silently desynchronise
            raise RuntimeError(f"torch loader yielded {n} batches, expected {self._len}")

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None  # type: ignore[assignment]
