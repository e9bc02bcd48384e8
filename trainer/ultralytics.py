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
from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from typing import Any

import numpy as np
import torch

from trainer.offline import setup_offline

# The one import-time call: the classes below subclass ultralytics', so ultralytics is imported
# here, and this module is the user's entry point into it (`from trainer.ultralytics import
# ShardsTrainer`); its import-time checks must already see the offline settings. The user's own
# ultralytics output and settings stay as they are.
setup_offline(users_ultralytics=True)

from ultralytics.engine import trainer as _ul_trainer  # noqa: E402
from ultralytics.engine import validator as _ul_validator  # noqa: E402
from ultralytics.engine.trainer import BaseTrainer  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: E402
from ultralytics.utils import DEFAULT_CFG, LOGGER  # noqa: E402
from ultralytics.utils.plotting import plot_labels  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from packer.format import FormatError, LabelArrays  # noqa: E402
from packer.storage.fs import display_url  # noqa: E402
from trainer.data.common import keep_classes  # noqa: E402
from trainer.ultralytics_data import (  # noqa: E402
    LOADER_OPTIONS,
    ShardsLoader,
    label_arrays,
    open_loader,
    refuse_url_credentials,
    shards_data,
)

__all__ = ["ShardsLoader", "ShardsTrainer", "ShardsValidator", "shards_data"]

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
        return open_loader(self, dataset_path, batch_size, train=False, epoch_of=None)

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
        unknown = sorted(set(kwargs) - set(LOADER_OPTIONS))
        if unknown:
            raise TypeError(f"ShardsTrainer.options: unknown {', '.join(unknown)} (known: {', '.join(LOADER_OPTIONS)})")
        return type(cls.__name__, (cls,), dict(kwargs))

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None) -> None:
        # before ultralytics writes args.yaml and prints the args: a URL must not carry credentials
        refuse_url_credentials((overrides or {}).get("data"))
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
        return open_loader(self, dataset_path, batch_size, train=train, epoch_of=epoch_of)

    def preprocess_batch(self, batch: dict) -> dict:
        batch = keep_classes(batch, self.args.classes)
        if self.args.single_cls:
            batch["cls"] = torch.zeros_like(batch["cls"])
        return super().preprocess_batch(batch)

    def get_validator(self) -> ShardsValidator:
        v = ShardsValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)
        for k in LOADER_OPTIONS:
            setattr(v, k, getattr(self, k))
        return v

    def _labels(self, split: str) -> LabelArrays:
        cache = self.__dict__.setdefault("_label_cache", {})
        if split not in cache:
            cache[split] = label_arrays(self.data["path"], split)
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

    def _train_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """The train split's (classes, boxes), only `classes=[...]`'s when given (ultralytics' datasets drop
        the other labels before counting and plotting them)."""
        la = self._labels(self.data["train"])
        if self.args.classes is None:
            return la.cls, la.boxes
        keep = np.isin(la.cls, np.atleast_1d(self.args.classes))
        return la.cls[keep], la.boxes[keep]

    def get_class_counts(self) -> np.ndarray:
        cls, _ = self._train_boxes()
        counts = np.array([len(cls)]) if self.args.single_cls else np.bincount(cls, minlength=self.data["nc"])
        return counts.astype(np.float32)

    def plot_training_labels(self) -> None:
        cls, boxes = self._train_boxes()
        if not len(cls):
            LOGGER.info("ShardsTrainer: no boxes in the train split, labels.jpg skipped")
            return
        cls = np.zeros_like(cls) if self.args.single_cls else cls
        plot_labels(boxes, cls, names=self.data["names"], save_dir=self.save_dir, on_plot=self.on_plot)
