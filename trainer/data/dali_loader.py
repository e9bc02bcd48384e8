"""DALI loader over packed TFRecord / WebDataset shards, one pipeline for GPU and CPU.

Only the device choice differs: ``decoders.image(device="mixed")`` and ``device_id=local_rank``
with CUDA, ``device="cpu"`` and ``device_id=None`` without.

Pixels move in DALI: decode -> letterbox (``resize`` + ``slice`` pad with 114) -> [train] five
S x S versions of each image side by side (``slice`` pads + ``cat``: the resized image in each
corner, and the centred letterbox) -> mosaic (``multi_paste`` of one version block per tile onto
the 2S x 2S canvas, `transforms.paste_regions`: ultralytics' layout) -> affine (scale, translate,
rotation, shear, flips in one ``warp_affine``; no perspective: refused) -> [mixup: a second
canvas + warp, blended by arithmetic] -> HSV (``hsv``) -> CHW. The random parameters come from
`transforms.sample_params` through an ``external_source`` and travel with the batch, so the
boxes -- read by DALI, padded with a count (``fn.pad`` + ``shape()``) -- get the torch loader's
arithmetic (`transforms.augment_boxes`) before they become the YOLO targets.

Built once per run (`_ensure_pipeline`): each epoch runs the same pipeline for one more reader
epoch (no rebuild, no refill of the shuffle buffer; an epoch's order depends on the ones before).

Sharding: every rank reads every shard file with ``shard_id=rank, num_shards=world_size,
pad_last_batch=True, stick_to_shard=True``, for exactly `split.dali_reader_batches` iterations
per epoch (run directly, not through ``DALIGenericIterator``, which cannot continue after an
operator error such as a corrupt JPEG), yielding `split.batches_per_rank` of them.

Data on network storage: a rank fetches only the shard files that overlap its sample range
(`split.rank_segments`) and reads just those, with index files trimmed to the range, as
``shard_id=0, num_shards=1`` (the samples ``shard_id=rank`` over all files would give it). Its
epoch has ``ceil(L/B)`` batches; where that is fewer than `split.batches_per_rank` the loader
completes the epoch with padding batches (``valid=False``), as DALI's padded shard would.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from packer.format import TF_BBOX, TF_CLASS, TF_IMAGE, TF_KEY
from packer.writers import tfrecord, trim_index, wds
from trainer.data.common import SplitData, build_batch, default_workers, to_device
from trainer.data.dali_params import ParamSource
from trainer.data.split import Segment, batches_per_rank, dali_reader_batches, rank_segments
from trainer.data.transforms import (
    FILL,
    P_MIX,
    AugmentConfig,
    augment_boxes,
    letterbox_geometry,
    norm_to_tile,
    xyxy_to_yolo,
)

log = logging.getLogger("trainer.data")

SHUFFLE_FILL = 1024  # DALI reader shuffle buffer (the packer also shuffles at pack time)
MAX_CONSECUTIVE_ERRORS = 8


def _reader(data: SplitData, files: list[tuple[str, str]], common: dict):  # noqa: ANN202 - DALI nodes
    """(jpeg, key, cls, box (N, 4)) from the split's tfrecord or WebDataset reader."""
    from nvidia.dali import fn

    paths, idx = [p for p, _ in files], [i for _, i in files]
    if data.fmt == "tfrecord":
        f = fn.readers.tfrecord(path=paths, index_path=idx, features=tfrecord.dali_features(), **common)
        return f[TF_IMAGE], f[TF_KEY], f[TF_CLASS], f[TF_BBOX]
    ext, dtypes = wds.dali_members()
    jpeg, cls, box, key = fn.readers.webdataset(paths=paths, index_paths=idx, ext=ext, dtypes=dtypes, **common)
    return jpeg, key, cls, fn.reshape(box, shape=[-1, 4])


def _letterbox(img, imgsz: int, resize: bool, versions: bool = False):  # noqa: ANN001, ANN202 - DALI nodes
    """Letterbox exactly as transforms.letterbox_geometry: long side to S (ceil, like ultralytics),
    centred 114 pad. resize=False: every stored image is S on its long side (only the pad).
    versions: the (S, 5S) strip of `transforms.paste_regions` instead (the resized image in the
    bottom-right, bottom-left, top-right, top-left corner of an S x S block, then the letterbox)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    s = float(imgsz)
    hw = fn.cast(img.shape(), dtype=types.FLOAT)
    h, w = hw[0], hw[1]
    r = s / dmath.max(h, w)
    nw = dmath.max(dmath.min(dmath.ceil(w * r - 1e-3), s), 1.0)
    nh = dmath.max(dmath.min(dmath.ceil(h * r - 1e-3), s), 1.0)
    if resize:  # some stored images are not S on their long side: resample (as cv2.resize does)
        img = fn.resize(img, size=fn.stack(nh, nw), antialias=False, interp_type=types.INTERP_LINEAR)
    # the 114 pads are slices with a negative anchor (exact integers, no resampling)
    py, px = dmath.floor((s - nh) * 0.5), dmath.floor((s - nw) * 0.5)
    full = r * 0.0 + s
    zero = r * 0.0

    pad = [fn.slice(img, fn.stack(ay, ax), fn.stack(full, full), axes=[0, 1], normalized_anchor=False,
                    normalized_shape=False, out_of_bounds_policy="pad", fill_values=FILL)
           for ay, ax in ([(-py, -px)] + ([(nh - s, nw - s), (nh - s, zero), (zero, nw - s), (zero, zero)]
                                          if versions else []))]  # centred; image at bottom-right, ...
    return fn.cat(*pad[1:], pad[0], axis=1) if versions else pad[0]


def _augment(tiles, params: ParamSource, imgsz: int, gpu: bool):  # noqa: ANN001, ANN202 - DALI nodes
    """(images, [params, tile ids(, partner's params, tile ids)]): mosaic, warp, [mixup], HSV."""
    from nvidia.dali import fn, types

    outs = fn.external_source(source=params, num_outputs=params.num_outputs, batch=True)
    p, ids, hue, sat, val = outs[0], outs[1], *outs[6:9]  # outs[1:6], outs[10:15]: geometry's arguments
    ones = fn.cast(tiles * 0 + 1, dtype=types.UINT8)  # marks what the pastes cover

    def geometry(ids, in_a, shapes, out_a, a):  # noqa: ANN001, ANN202
        kw = dict(in_ids=ids, in_anchors=in_a, shapes=shapes, out_anchors=out_a, output_size=[2 * imgsz, 2 * imgsz])
        # multi_paste leaves 0 where nothing is pasted; the canvas' fill there is 114, as ultralytics'
        img = fn.cast(fn.multi_paste(tiles, **kw) + (1 - fn.multi_paste(ones, **kw)) * FILL, dtype=types.UINT8)
        return fn.warp_affine(img, matrix=a, size=[imgsz, imgsz], fill_value=FILL, inverse_map=False)

    out, extra = geometry(*outs[1:6]), [p, ids]
    if len(outs) > 9:  # mixup: r * own + (1 - r) * partner (params outs[9], tile ids outs[10]), rounded to uint8
        other, r = geometry(*outs[10:15]), outs[15]
        r = r.gpu() if gpu else r  # the weights are a regular input of the blend: on the images' device
        out = fn.cast(out * r + other * (1.0 - r), dtype=types.UINT8)  # cast rounds, as cv2.addWeighted
        extra += [outs[9], outs[10]]
    return fn.hsv(out, hue=hue, saturation=sat, value=val), extra


def _build_pipeline(data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                    seed: int, threads: int, device_id: int | None, params: ParamSource | None,
                    files: list[tuple[str, str]] | None = None):
    """The one pipeline definition (CPU when `device_id` is None, GPU decoding otherwise);
    augmenting when `params` is given. files: (shard, index) pairs to read instead of all shards
    of the split; the caller then passes the shard_id/num_shards that apply to them (`rank`, `world_size`)."""
    from nvidia.dali import fn, pipeline_def, types

    if files is None:
        files = [(str(data.shard_path(i)), str(data.index_path(i))) for i in range(len(data.info.shards))]
    decoder = "cpu" if device_id is None else "mixed"
    # packed at this size (the usual case): the letterbox is only a pad, no resampling at all
    resize = not bool(np.all(data.labels.hw.max(1) == imgsz))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        common = dict(shard_id=rank, num_shards=world_size, pad_last_batch=True, stick_to_shard=True,
                      random_shuffle=train, initial_fill=SHUFFLE_FILL, name="Reader")
        jpeg, key, cls, box = _reader(data, files, common)
        img = fn.decoders.image(jpeg, device=decoder, output_type=types.RGB)
        shp = img.shape()
        out = _letterbox(img, imgsz, resize, versions=params is not None)
        extra = []
        if params is not None:
            out, extra = _augment(out, params, imgsz, device_id is not None)
        lab = fn.cat(fn.reshape(fn.cast(cls, dtype=types.FLOAT), shape=[-1, 1]), box, axis=1)  # (N,5)
        count = lab.shape(dtype=types.INT32)[0]
        lab = fn.pad(lab, axes=(0,), fill_value=-1)  # dense (B, max N, 5) for the batch
        key = fn.pad(key, fill_value=0)
        return (out, lab, count, key, fn.cast(shp, dtype=types.INT32), *extra)

    p = pipe()
    p.build()
    return p


def _to_torch(tl, device: torch.device) -> torch.Tensor:  # noqa: ANN001 - a DALI TensorList
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if isinstance(tl, TensorListGPU):  # images only: uint8
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


class DaliLoader:
    """The `Loader` contract over a DALI pipeline (see trainer.data.make_loader)."""

    def __init__(self, data: SplitData, *, imgsz: int, batch: int, train: bool, rank: int, world_size: int,
                 seed: int, workers: int | None, device: torch.device, augment: AugmentConfig):
        if train and augment.perspective > 0:
            from trainer.data import LoaderError

            raise LoaderError("the DALI loader warps with warp_affine only (DALI's experimental warp_perspective has no "
                              "CPU backend, and one pipeline serves both devices): use loader='torch' for perspective > 0")
        self.data = data
        self.names = list(data.manifest.names)
        self.num_samples = data.info.num_samples
        self.imgsz, self.batch, self.train, self.augment, self.device = imgsz, batch, train, augment, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.kind = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.threads = workers or default_workers()
        self._len = batches_per_rank(self.num_samples, world_size, batch, train=train)
        self._reader_len = dali_reader_batches(self.num_samples, world_size, batch)
        self._files: list[tuple[str, str]] | None = None
        self._tmp: str | None = None
        self._shard_id, self._num_shards = rank, world_size
        self.fetched: list[str] = []  # shard files this rank copied from network storage
        if data.remote or self.num_samples < len(data.labels):  # network storage, or a `fraction` of the split
            self._use_rank_files(rank_segments(data.shard_sizes, rank, world_size))
        self._epoch, self._pipe, self._mosaic = 0, None, True
        self._next_epoch: int | None = None  # the epoch the built pipeline runs next (None: rebuild first)
        self._params: ParamSource | None = None
        self._last: dict | None = None
        self.stats = {"corrupt_skipped": 0}

    def _use_rank_files(self, segs: list[Segment]) -> None:
        """Fetch this rank's files into the cache; read only them, trimmed to the rank's range."""
        self.data.fetch(s.shard for s in segs)
        self._tmp = tempfile.mkdtemp(prefix="dali-rank-idx-")
        files = []
        for s in segs:
            idx = Path(self._tmp) / f"{s.shard:06d}.idx"
            idx.write_bytes(trim_index(self.data.fmt, self.data.index_path(s.shard), s.start, s.stop))
            files.append((str(self.data.shard_path(s.shard)), str(idx)))
        self._files = files
        self._shard_id, self._num_shards = 0, 1
        self._reader_len = dali_reader_batches(sum(len(s) for s in segs), 1, self.batch)
        self.fetched = [self.data.info.shards[s.shard].path for s in segs] if self.data.remote else []

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def set_mosaic(self, enabled: bool) -> None:
        self._mosaic = bool(enabled)
        if self._params is not None:
            self._params.mosaic = self._mosaic

    def _ensure_pipeline(self) -> None:
        """Build the pipeline once per run: later epochs continue it (no teardown, no refill of
        the reader's shuffle buffer); the random streams are seeded once from `seed` and rank.
        A pipeline is rebuilt when `set_epoch` asks for another epoch than the one it runs next (a
        resume, a replay) or the last epoch was not read to its end: it is then seeded from `seed`,
        rank and that epoch, so a resumed run never replays epoch 0's order and augmentation."""
        if self._pipe is not None and self._next_epoch == self._epoch:
            return
        self._pipe = None  # the old pipeline goes first: never two at once (GPU memory)
        start = [] if self._epoch == 0 else [self._epoch]
        ss = np.random.SeedSequence([self.seed, self.rank, *start])
        aug = self.train and not self.augment.is_off
        self._params = (ParamSource(self.augment, self.imgsz, self.batch, [self.seed, self.rank, *start])
                        if aug else None)
        if self._params is not None:
            self._params.mosaic = self._mosaic
        self._pipe = _build_pipeline(
            self.data, imgsz=self.imgsz, batch=self.batch, train=self.train, rank=self._shard_id,
            world_size=self._num_shards, seed=int(ss.generate_state(1)[0] & 0x7FFFFFFF), threads=self.threads,
            device_id=self.device_id, params=self._params, files=self._files,
        )

    def __iter__(self) -> Iterator[dict]:
        self._ensure_pipeline()
        self._next_epoch = None  # until this epoch's reader epoch has run to its end
        batches = self._epoch_batches()
        for n, b in enumerate(batches, 1):
            if n == self._len:
                # a consumer may take exactly len() batches and drop the iterator (the trainer does): run the
                # reader's dropped remainder now, before the last batch, so the pipeline ends at an epoch boundary
                for _ in batches:
                    raise RuntimeError(f"DALI loader yielded more than its {self._len} batches")
                self._epoch += 1  # without a set_epoch call the next iteration simply continues
                self._next_epoch = self._epoch
            yield b

    def _epoch_batches(self) -> Iterator[dict]:
        seen: set[str] = set()
        errors = owed = 0
        for j in range(max(self._reader_len, self._len)):  # exactly one reader epoch, so epochs never drift
            if j >= self._reader_len:  # a rank-local reader ran out: the rest is padding
                if self._last is None:
                    raise RuntimeError("DALI could not read a single batch of this epoch")
                yield self._substitute(self._last)
                continue
            try:
                outs = self._pipe.run()
                errors = 0
            except Exception as e:  # noqa: BLE001 - DALI reports a corrupt sample as a pipeline error
                errors += 1
                if errors > MAX_CONSECUTIVE_ERRORS:
                    raise  # not a stray bad sample: a real failure
                self.stats["corrupt_skipped"] += 1
                msg = str(e).strip().splitlines()
                log.warning("DALI could not read a batch (corrupt sample? %s); a copy of another batch "
                            "(valid=False) takes its place", msg[4] if len(msg) > 4 else (msg or [repr(e)])[-1])
                outs = None
            if j >= self._len:
                continue  # train: the rest of the reader epoch is the dropped remainder
            if outs is None:
                if self._last is None:
                    owed += 1
                else:
                    yield self._substitute(self._last)
                continue
            b = self._convert(outs, seen)
            self._last = b
            yield b
            for _ in range(owed):
                yield self._substitute(b)
            owed = 0
        if owed:
            raise RuntimeError("DALI could not read a single batch of this epoch")

    @staticmethod
    def _substitute(b: dict) -> dict:  # a copy of batch b, every sample valid=False
        return {**b, "valid": torch.zeros_like(b["valid"])}

    def _convert(self, outs, seen: set[str]) -> dict:  # noqa: ANN001 - DALI outputs
        img_tl, lab_tl, cnt_tl, key_tl, shp_tl, *extra = outs
        # (B,H,W,3) -> (B,3,H,W) as a view: channels-last strides, no copy (DALI CPU transposes slowly)
        img = _to_torch(img_tl, self.device).permute(0, 3, 1, 2)
        lab = np.array(lab_tl.as_tensor()) if len(lab_tl) else np.zeros((self.batch, 0, 5), np.float32)
        counts = np.array(cnt_tl.as_tensor()).reshape(-1)
        keys_raw = np.array(key_tl.as_tensor())
        shapes = np.array(shp_tl.as_tensor())
        s = self.imgsz
        tiles = []
        for i in range(len(counts)):
            li = lab[i, : counts[i]]
            geom = letterbox_geometry(int(shapes[i, 0]), int(shapes[i, 1]), s)[2:]
            tiles.append((li[:, 0].astype(np.int64), norm_to_tile(li[:, 1:], shapes[i, 0], shapes[i, 1], s), geom))
        keys = [self._key(bytes(k).rstrip(b"\0")) for k in keys_raw]
        indices, valid, labels = [], [], []
        # params, tile ids of each sample; then the mixup partner's (absent without mixup)
        params, ids, params2, ids2 = [np.array(e.as_tensor()) for e in extra] + [None] * (4 - len(extra))
        for i, k in enumerate(keys):
            idx = self.data.key_index.get(k, -1)
            indices.append(max(idx, 0))
            valid.append(idx >= 0 and k not in seen)
            seen.add(k)
            if params is not None:
                mix = None if params[i][P_MIX] >= 1 else ([tiles[j] for j in ids2[i]], params2[i])
                c, b = augment_boxes([tiles[j] for j in ids[i]], params[i], s, mix=mix)
            else:
                c, b = tiles[i][:2]
            labels.append((c, xyxy_to_yolo(b, s)))
        batch = build_batch(img, labels, indices, valid, self.data, s, self.train)
        if self.device.type != "cpu":
            batch = to_device(batch, self.device, non_blocking=True)
        return batch

    def _key(self, raw: bytes) -> str:
        if self.data.fmt == "wds":
            try:
                return str(json.loads(raw)["key"])
            except (ValueError, KeyError, TypeError):
                return ""
        return raw.decode("utf-8", "replace")

    def close(self) -> None:
        self._pipe, self._next_epoch = None, None

    def __del__(self) -> None:
        tmp = getattr(self, "_tmp", None)  # the trimmed index files of a rank-local reader
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DaliLoader"]
