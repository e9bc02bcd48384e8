"""The data side of the ultralytics plug-in (`trainer.ultralytics`, which imports this after
`setup_offline`): ultralytics' data dict from our manifest (`shards_data`), and `make_loader`
behind the few DataLoader attributes ultralytics' trainer and validator read (`ShardsLoader`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

from torch import distributed as dist
from ultralytics.utils import LOGGER

from packer.format import FormatError, LabelArrays
from packer.storage.fs import display_url, is_url
from packer.storage.location import DatasetLocation
from trainer.data import AugmentConfig, cache_kind, make_loader
from trainer.data.split import fraction_sizes

# ultralytics augmentations our loaders do not implement (yet): a non-zero value is named in a warning
_NOT_IN_LOADER = ("flipud", "shear", "perspective", "mixup", "cutmix", "copy_paste", "bgr")
LOADER_OPTIONS = ("loader", "cache_dir", "cache_max_bytes", "verify")


# ----------------------------------------------------------------------------- the dataset


def _storage_options() -> dict[str, Any] | None:
    """fsspec options from $PACKER_STORAGE_OPTIONS (JSON or @file), as `packer` and `trainer.run` read them."""
    from packer.storage.fs import parse_storage_options

    return parse_storage_options(os.environ.get("PACKER_STORAGE_OPTIONS")) or None


def _location(shards: str) -> DatasetLocation:
    """The packed dataset at `shards` (folder or URL; a URL's credentials come from the environment)."""
    if not is_url(shards):
        return DatasetLocation(shards)
    refuse_url_credentials(shards)
    return DatasetLocation(shards, _storage_options())


def refuse_url_credentials(data: Any) -> None:
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


def label_arrays(shards: str, split: str) -> LabelArrays:
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


def open_loader(owner: Any, split: str, batch: int, train: bool, epoch_of: Callable[[], int] | None) -> ShardsLoader:
    """`make_loader` over `split` of `owner.data["path"]` with the owner's args and loader options."""
    rank, world = _rank_world()
    workers = int(owner.args.workers or 0)
    opts = {k: getattr(owner, k) for k in LOADER_OPTIONS}
    fraction = float(getattr(owner.args, "fraction", 1.0) or 1.0) if train else 1.0
    if train:
        batch = _fitting_batch(owner.data["path"], split, batch, fraction, world)
    loader = make_loader(owner.data["path"], split, imgsz=int(owner.args.imgsz), batch=batch, train=train,
                         rank=rank, world_size=world, seed=int(owner.args.seed), workers=workers,
                         device=owner.device, augment=_augment(owner.args) if train else None,
                         fraction=fraction,
                         cache=cache_kind(_bool_text(getattr(owner.args, "cache", None))),
                         storage_options=_storage_options(), **opts)
    return ShardsLoader(loader, batch_size=batch, train=train, num_workers=workers, epoch_of=epoch_of)


def _fitting_batch(path: str, split: str, batch: int, fraction: float, world: int) -> int:
    """`batch`, or the images each process reads when that is fewer: ultralytics trains a split
    smaller than a batch with one partial batch, and our loaders give only full ones."""
    shards = DatasetLocation(path, _storage_options()).manifest().splits[split].shards
    per_rank = sum(fraction_sizes([sh.num_samples for sh in shards], fraction)) // world
    if 0 < per_rank < batch:
        LOGGER.warning(f"ShardsTrainer: batch {batch} per process is larger than the {per_rank} training images "
                       f"each of {world} process(es) reads: using batch {per_rank}")
        return per_rank
    return batch


def _bool_text(value: Any) -> Any:
    """ultralytics' cfg may carry booleans as text ("True"): as booleans."""
    return {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value


def _augment(args: Any) -> AugmentConfig:
    """Our AugmentConfig from ultralytics' hyperparameters of the same names; the ones we lack are named."""
    missing = [k for k in _NOT_IN_LOADER if getattr(args, k, 0) and k not in {f.name for f in fields(AugmentConfig)}]
    if missing:
        LOGGER.warning(f"ShardsTrainer: {', '.join(f'{k}={getattr(args, k)}' for k in missing)} not applied "
                       "(trainer.data loaders do not implement them)")
    return AugmentConfig(**{f.name: float(getattr(args, f.name)) for f in fields(AugmentConfig) if hasattr(args, f.name)})
