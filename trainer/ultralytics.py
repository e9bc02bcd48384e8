"""The ultralytics plug-in: ``YOLO("yolo11n.yaml").train(data="shards/", trainer=ShardsTrainer)``.

ultralytics' own `DetectionTrainer` runs everything (optimizer, warmup, EMA, AMP, its DDP launch,
callbacks, loggers, plots, ``best.pt``, final validation); these subclasses only change where the
data comes from:

- `get_dataset`: classes and splits from our ``manifest.json`` instead of a data.yaml;
- `get_dataloader`: `trainer.data.make_loader` (DALI or torch, shard-per-rank, equal steps under
  DDP) behind the few DataLoader attributes ultralytics reads (`ShardsLoader`);
- `get_validator`: `ShardsValidator`, ultralytics' `DetectionValidator` fed by our validation loader;
- label plots, class counts and ``max_det`` from ``labels.npz`` (no shard is scanned).

``data`` is a packed folder or a URL (credentials from the environment or
``$PACKER_STORAGE_OPTIONS``, never in the URL: ultralytics writes ``data`` into args.yaml and
checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import copy
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from trainer.offline import setup_offline

# The one import-time call: the classes below subclass ultralytics', so ultralytics is imported
# here, and this module is the user's entry point into it (`from trainer.ultralytics import
# ShardsTrainer`); its import-time checks must already see the offline settings.
setup_offline()

from ultralytics.engine import trainer as _ul_trainer  # noqa: E402
from ultralytics.engine import validator as _ul_validator  # noqa: E402
from ultralytics.engine.trainer import BaseTrainer  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: E402
from ultralytics.utils import DEFAULT_CFG, LOGGER  # noqa: E402
from ultralytics.utils.plotting import plot_labels  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from packer.format import FormatError, LabelArrays  # noqa: E402
from packer.storage.fs import display_url, is_url  # noqa: E402
from packer.storage.location import DatasetLocation  # noqa: E402
from trainer.data import AugmentConfig, make_loader  # noqa: E402
from trainer.data.common import keep_classes  # noqa: E402

__all__ = ["ShardsLoader", "ShardsTrainer", "ShardsValidator", "shards_data"]

# ultralytics augmentations our loaders do not implement (yet): a non-zero value is named in a warning
_NOT_IN_LOADER = ("flipud", "shear", "perspective", "mixup", "cutmix", "copy_paste", "bgr")
_LOADER_OPTIONS = ("loader", "cache_dir", "cache_max_bytes", "verify")


# ----------------------------------------------------------------------------- the dataset


def _storage_options() -> dict[str, Any] | None:
    """fsspec options from $PACKER_STORAGE_OPTIONS (JSON or @file), as `packer` and `trainer.run` read them."""
    from packer.storage.fs import parse_storage_options

    return parse_storage_options(os.environ.get("PACKER_STORAGE_OPTIONS")) or None


def _location(shards: str) -> DatasetLocation:
    """The packed dataset at `shards` (folder or URL; a URL's credentials come from the environment)."""
    if not is_url(shards):
        return DatasetLocation(shards)
    _refuse_url_credentials(shards)
    return DatasetLocation(shards, _storage_options())


def _refuse_url_credentials(data: Any) -> None:
    if isinstance(data, str) and is_url(data) and display_url(data) != data:  # user:password@ or a signed query
        raise FormatError(f"{display_url(data)}: give credentials through the environment or "
                          "$PACKER_STORAGE_OPTIONS, not in the URL (ultralytics saves `data` in args.yaml and checkpoints)")


def _pick(splits: dict, wanted: str, fallback: str | None) -> str | None:
    """`wanted` itself, else the one split starting with it (COCO's train2017), else `fallback`."""
    if wanted in splits:
        return wanted
    prefixed = [s for s in splits if s.startswith(wanted)]
    return prefixed[0] if len(prefixed) == 1 else fallback


def shards_data(shards: str, split: str | None = "val") -> dict[str, Any]:
    """ultralytics' data dict for a packed dataset: split *names* under train/val, classes from the manifest.

    `path` holds the folder or URL; the loaders take it with a split name. Without a `split`
    split (e.g. coco128, train2017 only) validation uses the train split, as coco128.yaml does.
    """
    m = _location(str(shards)).manifest()
    only = next(iter(m.splits)) if len(m.splits) == 1 else None
    train = _pick(m.splits, "train", only)
    if train is None:
        raise FormatError(f"{shards}: no 'train' split (splits: {', '.join(sorted(m.splits))})")
    split = split or "val"
    val = _pick(m.splits, split, None)
    if val is None:
        LOGGER.warning(f"{shards}: no {split!r} split in the manifest; validating on {train!r}")
        val = train
    names = dict(enumerate(m.names))
    return {"path": str(shards), "train": train, "val": val, split: val, "names": names, "nc": len(names),
            "channels": 3, "format": m.format}


def _label_arrays(shards: str, split: str) -> LabelArrays:
    return _location(shards).labels(split)


# ----------------------------------------------------------------------------- the loader adapter


class _Dataset:
    """The `loader.dataset` ultralytics reads: its length, and `close_mosaic` for the last epochs."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_samples

    def close_mosaic(self, hyp: Any = None) -> None:
        self.loader.set_mosaic(False)


class _Sampler:
    """`loader.sampler`: its length (samples this rank yields) and `set_epoch` (called under DDP)."""

    def __init__(self, owner: ShardsLoader) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner) * self.owner.batch_size if self.owner.drop_last else len(self.owner.dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def set_epoch(self, epoch: int) -> None:
        self.owner.loader.set_epoch(epoch)


class ShardsLoader:
    """A `make_loader` loader with the DataLoader attributes ultralytics' trainer and validator read."""

    def __init__(self, loader: Any, *, batch_size: int, train: bool, num_workers: int,
                 epoch_of: Callable[[], int] | None = None) -> None:
        self.loader, self.batch_size, self.num_workers = loader, batch_size, num_workers
        self.drop_last = train  # training drops the remainder; validation pads (valid=False)
        self.dataset, self.sampler = _Dataset(loader), _Sampler(self)
        self._epoch_of = epoch_of

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        if self._epoch_of is not None:  # the epoch reseeds the shard order, identically on every rank
            self.loader.set_epoch(self._epoch_of())
        return iter(self.loader)

    def reset(self) -> None:
        """ultralytics calls this after close_mosaic; our loaders read the flag at the next epoch start."""

    def close(self) -> None:
        self.loader.close()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _open_loader(owner: Any, split: str, batch: int, train: bool, epoch_of: Callable[[], int] | None) -> ShardsLoader:
    """`make_loader` over `split` of `owner.data["path"]` with the owner's args and loader options."""
    rank, world = _rank_world()
    workers = int(owner.args.workers or 0)
    opts = {k: getattr(owner, k) for k in _LOADER_OPTIONS}
    loader = make_loader(owner.data["path"], split, imgsz=int(owner.args.imgsz), batch=batch, train=train,
                         rank=rank, world_size=world, seed=int(owner.args.seed), workers=workers or None,
                         device=owner.device, augment=_augment(owner.args) if train else None,
                         fraction=float(getattr(owner.args, "fraction", 1.0) or 1.0) if train else 1.0,
                         cache=_cache_kind(getattr(owner.args, "cache", None)),
                         storage_options=_storage_options(), **opts)
    return ShardsLoader(loader, batch_size=batch, train=train, num_workers=workers, epoch_of=epoch_of)


def _cache_kind(cache: Any) -> str | None:
    """ultralytics' `cache` (True / "ram" / "disk" / False) as make_loader's node-shared decoded cache."""
    if cache in (True, "ram", "True", "true"):
        return "ram"
    return "disk" if cache == "disk" else None


def _augment(args: Any) -> AugmentConfig:
    """Our AugmentConfig from ultralytics' hyperparameters of the same names; the ones we lack are named."""
    missing = [k for k in _NOT_IN_LOADER if getattr(args, k, 0) and k not in {f.name for f in fields(AugmentConfig)}]
    if missing:
        LOGGER.warning(f"ShardsTrainer: {', '.join(f'{k}={getattr(args, k)}' for k in missing)} not applied "
                       "(trainer.data loaders do not implement them)")
    return AugmentConfig(**{f.name: float(getattr(args, f.name)) for f in fields(AugmentConfig) if hasattr(args, f.name)})


@contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    """`module.name` is `value` inside the block (ultralytics calls these module-level functions directly)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _check_amp_offline(model: Any) -> bool:
    """ultralytics' check_amp when its yolo26n.pt is already on disk; otherwise AMP on, as check_amp
    decides when it cannot download (it would try to fetch the weights: nothing is downloaded here)."""
    from ultralytics.utils import WEIGHTS_DIR
    from ultralytics.utils.checks import check_amp

    if next(model.parameters()).device.type in {"cpu", "mps"} or (WEIGHTS_DIR / "yolo26n.pt").is_file():
        return check_amp(model)
    LOGGER.info("AMP: checks skipped (offline, no yolo26n.pt to compare against); amp=True as asked")
    return True


# ----------------------------------------------------------------------------- validator


def _select(batch: dict, keep: list[int]) -> dict:
    """The sub-batch of samples `keep` (batch_idx renumbered), for the per-sample keys the validator reads."""
    bidx = batch["batch_idx"].long()
    new_index = torch.full((len(batch["im_file"]),), -1, dtype=torch.long, device=bidx.device)
    new_index[torch.tensor(keep, dtype=torch.long, device=bidx.device)] = torch.arange(len(keep), device=bidx.device)
    box_keep = new_index[bidx] >= 0
    out = dict(batch)
    out.update(img=batch["img"][keep], batch_idx=new_index[bidx][box_keep].to(batch["batch_idx"].dtype),
               cls=batch["cls"][box_keep], bboxes=batch["bboxes"][box_keep])
    for k in ("im_file", "ori_shape", "ratio_pad", "keys"):
        if k in batch:
            out[k] = [batch[k][i] for i in keep]
    return out


class ShardsValidator(DetectionValidator):
    """ultralytics' DetectionValidator over our validation loader (also `model.val(validator=ShardsValidator)`).

    Batches go through the model whole (fixed shapes); samples with ``valid == False`` (padding that
    gives every DDP rank the same batch count) are left out of the metrics, so each sample counts once.
    """

    def __call__(self, trainer: Any = None, model: Any = None, **kwargs: Any) -> Any:
        if trainer is not None:
            return super().__call__(trainer, model, **kwargs)
        # standalone (final_eval of best.pt, model.val): ultralytics resolves `data` through this
        # module-level function, which only knows data.yaml files; a packed folder needs ours
        with _replaced(_ul_validator, "check_det_dataset", lambda data, split="", **_: shards_data(str(data), split or "val")):
            return super().__call__(trainer, model, **kwargs)

    # options of make_loader that ultralytics' args have no key for; set by ShardsTrainer
    loader, cache_dir, cache_max_bytes, verify = "auto", None, None, False

    def get_dataloader(self, dataset_path: str, batch_size: int) -> ShardsLoader:
        return _open_loader(self, dataset_path, batch_size, train=False, epoch_of=None)

    def preprocess(self, batch: dict) -> dict:
        # ultralytics' scale_boxes takes ((gain_y, gain_x), (pad_x, pad_y)); ours is (gain_x, gain_y, pad_x, pad_y)
        batch["ratio_pad"] = [((gy, gx), (px, py)) for gx, gy, px, py in batch["ratio_pad"].tolist()]
        batch = keep_classes(batch, self.args.classes)
        if self.args.single_cls:
            batch["cls"] = torch.zeros_like(batch["cls"])
        return super().preprocess(batch)

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict) -> None:
        valid = batch.get("valid")
        if valid is None or bool(valid.all()):
            return super().update_metrics(preds, batch)
        keep = torch.nonzero(valid.cpu()).flatten().tolist()
        return super().update_metrics([preds[i] for i in keep], _select(batch, keep))


def _check_torchrun(device_type: str, devices: int, device_arg: Any) -> None:
    """Under torchrun, ultralytics' trainer joins one DDP group only on one node with one GPU per
    process named in `device`; anything else would train every process alone on all the data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_type in {"cpu", "mps"}:
        raise ValueError("ultralytics runs DDP on GPUs only: on CPU use `torchrun -m trainer.run SHARDS` (gloo)")
    if local != world:
        raise ValueError(f"ultralytics' DDP is single-node ({world} processes on several nodes): "
                         "use `torchrun -m trainer.run SHARDS` for several nodes")
    if devices != local:
        raise ValueError(f"torchrun started {local} processes but device={device_arg!r} names {max(devices, 1)} "
                         f"GPU(s): pass device={','.join(map(str, range(local)))}")


# ----------------------------------------------------------------------------- trainer


class ShardsTrainer(DetectionTrainer):
    """ultralytics' DetectionTrainer reading packed shards: ``YOLO(cfg).train(data=SHARDS, trainer=ShardsTrainer)``.

    Loader options that ultralytics' args have no key for are class attributes; set them with
    ``ShardsTrainer.options(loader="torch", cache_dir=..., cache_max_bytes=..., verify=True)``.
    """

    loader: str = "auto"  # "auto" | "dali" | "torch" (trainer.data.make_loader)
    cache_dir: str | None = None  # local cache of shards read from a URL (default ~/.cache/packer-trainer)
    cache_max_bytes: int | None = None
    verify: bool = False  # check every shard's sha256 against the manifest before training

    @classmethod
    def options(cls, **kwargs: Any) -> type[ShardsTrainer]:
        """A subclass with these loader options (``trainer=ShardsTrainer.options(loader="torch")``)."""
        unknown = sorted(set(kwargs) - set(_LOADER_OPTIONS))
        if unknown:
            raise TypeError(f"ShardsTrainer.options: unknown {', '.join(unknown)} (known: {', '.join(_LOADER_OPTIONS)})")
        return type(cls.__name__, (cls,), dict(kwargs))

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None) -> None:
        # before ultralytics writes args.yaml and prints the args: a URL must not carry credentials
        _refuse_url_credentials((overrides or {}).get("data"))
        super().__init__(cfg, overrides, _callbacks)
        _check_torchrun(self.device.type, self.world_size, self.args.device)

    def _setup_train(self) -> None:
        with _replaced(_ul_trainer, "check_amp", _check_amp_offline):
            super()._setup_train()

    def get_dataset(self) -> dict[str, Any]:
        try:
            data = shards_data(str(self.args.data), self.args.split)
        except (FormatError, OSError) as e:  # ultralytics reports dataset problems as RuntimeError
            raise RuntimeError(f"Dataset '{display_url(str(self.args.data))}' error: {e}") from None
        if self.args.single_cls:
            data.update(names={0: "item"}, nc=1)
        if self.args.rect:
            LOGGER.warning("ShardsTrainer: rect ignored (every sample is letterboxed to imgsz x imgsz)")
        return data

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train") -> ShardsLoader:
        train = mode == "train"
        epoch_of = (lambda: getattr(self, "epoch", 0)) if train else None  # self.epoch exists once training runs
        return _open_loader(self, dataset_path, batch_size, train=train, epoch_of=epoch_of)

    def preprocess_batch(self, batch: dict) -> dict:
        batch = keep_classes(batch, self.args.classes)
        if self.args.single_cls:
            batch["cls"] = torch.zeros_like(batch["cls"])
        return super().preprocess_batch(batch)

    def get_validator(self) -> ShardsValidator:
        v = ShardsValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)
        for k in _LOADER_OPTIONS:
            setattr(v, k, getattr(self, k))
        return v

    def _labels(self, split: str) -> LabelArrays:
        cache = self.__dict__.setdefault("_label_cache", {})
        if split not in cache:
            cache[split] = _label_arrays(self.data["path"], split)
        return cache[split]

    def _build_train_pipeline(self) -> None:
        BaseTrainer._build_train_pipeline(self)  # DetectionTrainer's version scans dataset.labels
        most = {}
        for name in ("train", "val"):
            offsets = self._labels(self.data[name]).offsets
            most[name] = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
        stand_in = {k: type("Labels", (), {"labels": [{"cls": np.zeros(n)}]})() for k, n in most.items()}
        DetectionValidator._check_max_det(self.args, stand_in)  # ultralytics' own rule and warning
        unwrap_model(self.model).set_head_attr(max_det=self.args.max_det)

    def get_class_counts(self) -> np.ndarray:
        la = self._labels(self.data["train"])
        counts = np.array([len(la.cls)]) if self.args.single_cls else la.class_counts(self.data["nc"])
        return counts.astype(np.float32)

    def plot_training_labels(self) -> None:
        la = self._labels(self.data["train"])
        if not len(la.cls):
            LOGGER.info("ShardsTrainer: no boxes in the train split, labels.jpg skipped")
            return
        cls = np.zeros_like(la.cls) if self.args.single_cls else la.cls
        plot_labels(la.boxes, cls, names=self.data["names"], save_dir=self.save_dir, on_plot=self.on_plot)
