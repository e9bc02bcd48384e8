"""The torch loader's worker side: this worker's batches of an epoch, built in reused shared buffers.

Each DataLoader worker reads the records `split.worker_plan` gives it (whole batches), in an
order drawn per epoch from the plan itself (read by index: the first batch of an epoch costs what
any batch costs; no shuffle buffer to fill), decodes them (`decode`: libjpeg-turbo, DCT-domain
reduced when the stored image is >= 2x the input), letterboxes straight into the batch tensor or
augments on top of letterboxed tiles, and yields finished batches. Labels come from the split's
label arrays. Batch pixels live in a small pool of shared buffers per worker, mapped before the
fork and reused once the main process has dropped (or pinned / moved) a batch (`slots`), instead
of a fresh 19.7 MB shared tensor per batch. ``img`` is (B, 3, S, S) with channels-last strides (a view of the
(B, S, S, 3) buffer: decoders write HWC, and channels-last is what convolutions prefer).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from packer.format import FormatError
from trainer.data.common import SplitData, build_batch
from trainer.data.decode import decode_rgb, letterbox_image, letterbox_slot, paste_letterbox, reduce_target
from trainer.data.pixels import augment_image
from trainer.data.records import RecordSource
from trainer.data.slots import SlotPool
from trainer.data.split import global_index, worker_plan
from trainer.data.transforms import (
    AugmentConfig,
    augment_boxes,
    letterbox_geometry,
    mix_partner,
    norm_to_tile_many,
    partner_ids,
    sample_params,
    xyxy_to_yolo,
)

log = logging.getLogger("trainer.data")

SHUFFLE_BUFFER = 256  # records mixed before decoding, for streamed (network) WebDataset only
MOSAIC_POOL = 64  # recent decoded tiles that mosaic partners are drawn from (as ultralytics' buffer)


class ShardBatches(IterableDataset):
    """Yields this rank's batches (CPU tensors) for the current epoch; one worker's share each."""

    def __init__(self, data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                 seed: int, augment: AugmentConfig, num_workers: int, stream: bool = False,
                 fast_decode: bool = False, cache=None, mapped: bool = True):  # noqa: ANN001 - cache: a DecodedCache
        """mapped: batch buffers mapped before the fork (`SlotPool`); False when the DataLoader
        pins batches (it needs torch shared tensors to pin from)."""
        self.data, self.imgsz, self.batch, self.train = data, imgsz, batch, train
        self.stream, self.fast, self.cache = stream, fast_decode, cache
        self.rank, self.world_size, self.seed, self.augment = rank, world_size, seed, augment
        self.num_workers = num_workers
        ctx = mp.get_context()
        # shared with (persistent) workers: set in the main process, read at each epoch start
        self.epoch = ctx.Value("i", 0, lock=False)
        self.mosaic = ctx.Value("b", 1, lock=False)
        self.slots = SlotPool(num_workers, (batch, imgsz, imgsz, 3), mapped=mapped)
        self._source: RecordSource | None = None
        self._tile_boxes: np.ndarray | None = None
        self._cls: np.ndarray | None = None
        self._streamed: dict[int, bytes] = {}  # streamed JPEG bytes waiting to be decoded
        # recent (tile, cls, xyxy, letterbox geometry) mosaic partners: this worker's own, kept across
        # epochs (persistent workers) like ultralytics' buffer, so an epoch's first mosaics have partners
        self.pool: deque[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]] = deque(
            maxlen=MOSAIC_POOL)

    # ------------------------------------------------------------------ the epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            self.slots.reclaim(w)
        epoch = int(self.epoch.value)
        plan = worker_plan(self.data.shard_sizes, rank=self.rank, world_size=self.world_size, worker=w,
                           num_workers=nw, batch=self.batch, train=self.train, seed=self.seed, epoch=epoch)
        if self._source is None:
            self._source = RecordSource(self.data, stream=self.stream)
        rng = np.random.default_rng([self.seed, epoch, self.rank, w])
        bb = _Batch(self, w, info is not None, rng)
        last: int | None = None
        owed = 0  # corrupt records met before any good one
        for idx, pad in self._order(plan, rng):
            if self._try_put(bb, idx, not pad):
                last = idx
            elif last is not None:  # a copy of the last good sample takes its place (valid=False)
                bb.put(last, False)
                bb.corrupt += not pad
            elif pad:
                raise FormatError(f"rank {self.rank}: every sample this worker read is corrupt")
            else:
                owed += 1
                continue
            yield from bb.flush()
            while owed:
                owed -= 1
                bb.corrupt += 1
                yield from bb.put_and_flush(last, False)
        if owed:
            raise FormatError(f"rank {self.rank}: every sample this worker read is corrupt")

    def _try_put(self, bb: _Batch, idx: int, ok: bool) -> bool:
        if idx < 0:
            return False
        try:
            bb.put(idx, ok)
            return True
        except Exception as e:  # noqa: BLE001 - any damage to one record is that record's problem
            log.warning("skipping a corrupt sample (%s); a copy of another sample takes its place", e)
            return False

    def _order(self, plan, rng) -> Iterator[tuple[int, bool]]:  # noqa: ANN001
        """(label index, is padding) in this worker's order: the plan's records (a fresh permutation
        each epoch when training), then the padding repeats; -1 for a record that could not be read."""
        if self.stream:
            yield from ((i, False) for i in self._streamed_order(plan, rng))
        else:
            idx = global_index(self.data.shard_sizes, plan.segments)
            if self.train:
                idx = rng.permutation(idx)
            yield from ((int(i), False) for i in idx)
        if plan.pad:
            pad = int(global_index(self.data.shard_sizes, [plan.pad_sample])[0])
            yield from ((pad, True) for _ in range(plan.pad))

    def _streamed_order(self, plan, rng) -> Iterator[int]:  # noqa: ANN001
        """Network WebDataset: records in stream order through a shuffle buffer (their JPEG bytes
        kept in `_streamed` until decoded)."""
        src = self._source
        assert src is not None
        buf: list[int] = []
        for seg in plan.segments:
            for _, rec in src.segment(seg):
                i = -1 if isinstance(rec, Exception) else self.data.key_index.get(rec.key, -1)
                if i >= 0:
                    self._streamed[i] = rec.jpeg
                else:
                    log.warning("skipping a corrupt sample (%s); a copy of another sample takes its place", rec)
                buf.append(i)
                if self.train and len(buf) >= SHUFFLE_BUFFER:
                    j = int(rng.integers(len(buf)))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
        if self.train:
            rng.shuffle(buf)
        yield from buf

    def _buffer(self, worker: int, in_worker: bool) -> tuple[torch.Tensor, int]:
        """A (B, S, S, 3) uint8 batch buffer and its pool slot (-1: not pooled)."""
        shape = (self.batch, self.imgsz, self.imgsz, 3)
        if not in_worker:
            return torch.empty(shape, dtype=torch.uint8), -1
        k = self.slots.take(worker)
        if k < 0:
            return torch.empty(shape, dtype=torch.uint8).share_memory_(), -1
        return self.slots.buffer(worker, k), k

    # ------------------------------------------------------------------ one sample

    def _labels(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(cls int64 (n,), pixel xyxy (n, 4) in the letterboxed tile) of sample idx."""
        if self._tile_boxes is None:  # once per process, for the whole split
            la = self.data.labels
            per_box = np.repeat(la.hw, np.diff(la.offsets), axis=0)
            self._tile_boxes = norm_to_tile_many(la.boxes, per_box[:, 0], per_box[:, 1], self.imgsz)
            self._cls = la.cls.astype(np.int64)
        a, b = self.data.labels.offsets[idx], self.data.labels.offsets[idx + 1]
        return self._cls[a:b], self._tile_boxes[a:b]

    def _letterbox(self, idx: int, slot: np.ndarray) -> None:
        h, w = (int(v) for v in self.data.labels.hw[idx])
        if self.cache is not None:
            paste_letterbox(self.cache.image(idx), slot, h, w, self.imgsz)
            return
        letterbox_slot(self._jpeg(idx), slot, h, w, self.imgsz, fast=self.fast)

    def _tile(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]:
        """(letterboxed tile, cls, xyxy in the tile, (px, py, nw, nh) its letterbox geometry)."""
        h, w = (int(v) for v in self.data.labels.hw[idx])
        if self.cache is not None:
            img = self.cache.image(idx)
        else:
            img = decode_rgb(self._jpeg(idx), fast=self.fast, min_hw=reduce_target(h, w, self.imgsz))
        geom = letterbox_geometry(h, w, self.imgsz)[2:]
        return (letterbox_image(img, h, w, self.imgsz), *self._labels(idx), geom)

    def _jpeg(self, idx: int) -> bytes:
        if idx in self._streamed:
            return self._streamed.pop(idx)
        la = self.data.labels
        assert self._source is not None
        return self._source.jpeg_at(int(la.shard[idx]), int(la.pos[idx]))


class _Batch:
    """One worker's batch under construction: pixels straight into a pooled buffer, labels beside."""

    def __init__(self, ds: ShardBatches, worker: int, in_worker: bool, rng: np.random.Generator):
        self.ds, self.worker, self.in_worker, self.rng = ds, worker, in_worker, rng
        self.augment = ds.train and not ds.augment.is_off
        self.mosaic = bool(ds.mosaic.value)
        self.pool = ds.pool
        self.corrupt = 0
        self._new()

    def _new(self) -> None:
        self.buf: torch.Tensor | None = None  # taken from the pool at the first sample, never left taken
        self.k = -1
        self.labels: list[tuple[np.ndarray, np.ndarray]] = []
        self.indices: list[int] = []
        self.valid: list[bool] = []

    def put(self, idx: int, ok: bool) -> None:
        """Decode sample `idx` into the next place of the batch (raises on damage, placing nothing)."""
        ds, s = self.ds, self.ds.imgsz
        if self.buf is None:
            self.buf, self.k = ds._buffer(self.worker, self.in_worker)
        slot = self.buf[len(self.labels)]
        if self.augment:
            self.pool.append(ds._tile(idx))
            p = sample_params(self.rng, ds.augment, s, mosaic=self.mosaic)
            ids = partner_ids(p, len(self.pool) - 1, len(self.pool))
            mix, mix_boxes = self._mix_partner(p)
            augment_image([self.pool[i][0] for i in ids], p, s, out=slot.numpy(), mix=mix,
                          geoms=[self.pool[i][3] for i in ids])
            c, b = augment_boxes([self.pool[i][1:] for i in ids], p, s, mix=mix_boxes)
        else:  # letterbox only, straight into the batch; every label kept as is (validation needs all)
            ds._letterbox(idx, slot.numpy())
            c, b = ds._labels(idx)
        self.labels.append((c, xyxy_to_yolo(b, s)))
        self.indices.append(idx)
        self.valid.append(ok)

    def _mix_partner(self, p: np.ndarray) -> tuple[tuple | None, tuple | None]:
        """mixup: the partner's (tiles, params) and (tiles' labels, params), drawn from the recent
        tiles and augmented on its own (mosaic and warp, as ultralytics' mixup pre-transform); Nones
        without mixup."""
        n = len(self.pool)
        j = mix_partner(p, n - 1, n)
        if j is None:
            return None, None
        p2 = sample_params(self.rng, self.ds.augment, self.ds.imgsz, mosaic=self.mosaic, mix=False)
        ids = partner_ids(p2, j, n)
        return (([self.pool[i][0] for i in ids], p2, [self.pool[i][3] for i in ids]),
                ([self.pool[i][1:] for i in ids], p2))

    def put_and_flush(self, idx: int, ok: bool) -> Iterator[dict]:
        self.put(idx, ok)
        yield from self.flush()

    def flush(self) -> Iterator[dict]:
        """The finished batch, if the buffer is full."""
        if len(self.labels) < self.ds.batch:
            return
        ds = self.ds
        assert self.buf is not None
        out = build_batch(self.buf.permute(0, 3, 1, 2), self.labels, self.indices, self.valid, ds.data, ds.imgsz,
                          ds.train)
        for k, v in out.items():  # labels cross as arrays: see `slots.from_transit`
            if k != "img" and torch.is_tensor(v):
                out[k] = v.numpy()
        if self.k >= 0 and ds.slots.mapped:
            out["img"] = None  # the main process maps the slot itself (`SlotPool.received`)
        out["_corrupt"], out["_slot"] = self.corrupt, (self.worker, self.k)
        self.corrupt = 0
        self._new()
        yield out
