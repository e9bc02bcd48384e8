"""The options of a training run: one `TrainConfig`, its checks, and what a resume may change.

Names and defaults follow ultralytics where it has them; `python -m trainer.run` declares one Click
option per field. `validate` runs before anything heavy (no data read, no model built), so a bad value
is one line and exit 2.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from packer.errors import PackerError
from packer.storage.fs import redact

# ultralytics' build_optimizer: these names in any case
OPTIMIZERS = ("auto", "SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")
# A resumed run may change these (they do not change what is learned); everything else comes from the checkpoint.
# `epochs` too: a larger --epochs extends a run (the lr schedule is rebuilt over the new total).
RESUME_OVERRIDABLE = ("device", "workers", "loader", "patience", "verify", "cache_dir", "cache_max_bytes", "cache",
                      "plots", "tensorboard", "epochs")


class TrainError(PackerError, ValueError):
    """Bad options or data for a training run (the CLI turns this into a one-line error, exit 2)."""


@dataclass
class TrainConfig:
    """Every option of a run; names and defaults follow ultralytics where it has them."""

    shards: str = ""
    model: str = "yolo11n.yaml"
    weights: str | None = None
    epochs: int = 100
    batch: int = 16  # global batch over all ranks; -1 = AutoBatch (GPU only)
    nbs: int = 64
    imgsz: int | None = None  # None = 640, or the packed size if smaller
    loader: str = "auto"
    device: str = "auto"
    amp: str = "auto"
    workers: int | None = None
    optimizer: str = "auto"
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    close_mosaic: int = 10
    patience: int = 100
    val_split: str | None = "auto"  # "auto" = "val" or the one "val*" split (val2017); None/"none" = no validation
    train_split: str = "auto"  # "auto" = "train", the one "train*" split (train2017), or the only split
    out: str = "runs/train"
    exist_ok: bool = False
    resume: str | None = None
    seed: int = 0
    verify: bool = False
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    max_det: int = 300
    # augmentation (ultralytics' names and detection defaults; passed to the loaders' AugmentConfig)
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0  # probability; True/False (older callers, checkpoints) read as 1.0/0.0
    mixup: float = 0.0
    fraction: float = 1.0  # share of the train split to use
    plots: bool = True  # rank 0 writes ultralytics' plots into the run folder
    tensorboard: bool | None = None  # None = on when the tensorboard package is installed
    # data on network storage (shards is a URL): fsspec options (credentials: never saved, see
    # train_args), the local shard cache for DALI/tfrecord/LMDB reads and its size bound
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None  # None = trainer.data.default_cache_dir()
    cache_max_bytes: int | None = None
    cache: str | None = None  # decoded-pixel cache shared by the node: "ram" | "disk" | None

    def __post_init__(self) -> None:
        if isinstance(self.mosaic, bool):
            self.mosaic = float(self.mosaic)

    def validate(self) -> None:
        """Raise TrainError (one line naming the option) for values that cannot work, before anything heavy starts."""
        if isinstance(self.optimizer, str):  # ultralytics reads the name in any case (sgd, adamw, rmsprop)
            self.optimizer = {o.lower(): o for o in OPTIMIZERS}.get(self.optimizer.lower(), self.optimizer)
        for name, ok, rule in _NUMBER_RULES:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise TrainError(f"--{name.replace('_', '-')} must be {rule}, got {v!r}")
        if self.imgsz is not None and self.imgsz % 32:
            raise TrainError(f"--imgsz must be a multiple of 32 (the model's largest stride), got {self.imgsz}")
        for name, allowed in (("amp", AMP_MODES), ("loader", LOADERS), ("optimizer", OPTIMIZERS),
                              ("cache", CACHE_KINDS)):
            if getattr(self, name) not in allowed:
                raise TrainError(f"--{name} must be one of {', '.join(a for a in allowed if a)}, got {getattr(self, name)!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TrainError("--storage-options must be a JSON object")


AMP_MODES = ("auto", "bf16", "fp16", "off")
AUGMENT_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud",
                "fliplr", "mosaic", "mixup")
LOADERS = ("auto", "dali", "torch")
CACHE_KINDS = (None, "ram", "disk")
_OPTIONAL = ("imgsz", "workers", "cache_max_bytes")  # None means "choose for me"
# (option, test, the rule as the error states it): every number must also be finite (no nan/inf)
_NUMBER_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("batch", lambda v: isinstance(v, int) and (v >= 1 or v == -1), "a positive integer or -1 (AutoBatch)"),
    ("nbs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("imgsz", lambda v: isinstance(v, int) and v >= 32, "a positive multiple of 32"),
    ("workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("lr0", lambda v: v > 0, "a number > 0"),
    ("lrf", lambda v: 0 < v <= 1, "a number in (0, 1] (final lr = lr0 * lrf)"),
    ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("warmup_epochs", lambda v: v >= 0, "a number >= 0"),
    ("warmup_momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("warmup_bias_lr", lambda v: v >= 0, "a number >= 0"),
    ("close_mosaic", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("patience", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = never stop early)"),
    ("seed", lambda v: isinstance(v, int) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
    ("box", lambda v: v >= 0, "a number >= 0"),
    ("cls", lambda v: v >= 0, "a number >= 0"),
    ("dfl", lambda v: v >= 0, "a number >= 0"),
    ("max_det", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("cache_max_bytes", lambda v: isinstance(v, int) and v > 0, "a size > 0"),
    ("fraction", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    *((k, lambda v: v >= 0, "a number >= 0") for k in AUGMENT_KEYS),
)


def pick_split(splits, wanted: str | None, kind: str) -> str | None:
    """Resolve --train-split/--val-split: "auto" takes `kind` itself, else the only split
    starting with it (COCO's train2017/val2017), else (train only) the only split there is."""
    if wanted in (None, "", "none", "None"):
        return None
    if wanted != "auto":
        if wanted not in splits:
            raise TrainError(f"--{kind}-split {wanted!r} is not in the packed splits ({', '.join(sorted(splits))})")
        return wanted
    if kind in splits:
        return kind
    prefixed = [s for s in splits if s.startswith(kind)]
    if len(prefixed) == 1:
        return prefixed[0]
    if kind == "train" and len(splits) == 1:
        return next(iter(splits))
    return None


def redacted_options(storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """`storage_options` fit to save: every credential value (keys named key/secret/token/...,
    and the AWS secrets of the environment) replaced by "***"."""
    if storage_options is None:
        return None
    return json.loads(redact(json.dumps(storage_options), storage_options))


def resume_config(cfg: TrainConfig, ckpt_args: dict[str, Any],
                  given: Collection[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the checkpoint's options, plus the few a resume may change.

    `given` names the options the caller set (the CLI's command line and --cfg file); None = those that
    differ from the defaults. Returns (config, names of options the caller set that the resume ignores).
    """
    default = TrainConfig()
    names = [f for f in TrainConfig.__dataclass_fields__]
    new = TrainConfig(**{k: ckpt_args[k] for k in names if k in ckpt_args})
    ignored = []
    for k in names:
        mine = getattr(cfg, k)
        if k in ("resume", "shards", "storage_options"):
            continue
        was_set = k in given if given is not None else mine != getattr(default, k)
        if k in RESUME_OVERRIDABLE:
            if was_set:
                setattr(new, k, mine)
        elif was_set and mine != getattr(new, k):
            ignored.append(k)
    new.resume = cfg.resume
    new.shards = cfg.shards or new.shards  # the data may have moved since
    new.storage_options = cfg.storage_options  # credentials are never saved: they come from this call only
    return new, ignored


def data_identity(manifest: Any, train: str, val: str | None) -> dict[str, Any]:
    """What a resume must find again: the classes and the splits trained and validated on, by
    name and content (samples, boxes, per-class counts: unchanged by a move, a re-pack or a convert)."""

    def split(name: str | None) -> dict[str, Any] | None:
        s = manifest.splits[name] if name is not None else None
        return None if s is None else {"split": name, "samples": s.num_samples, "boxes": s.num_boxes,
                                       "class_counts": list(s.class_counts)}

    return {"names": list(manifest.names), "train": split(train), "val": split(val)}


def check_resume_data(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> str | None:
    """Refuse (TrainError, one line) a resume on other data than the run's; a note for a checkpoint
    that predates the record."""
    if not saved:
        return f"warning: {where} cannot be checked against the checkpoint (written before its data was recorded)"
    for k in ("names", "train", "val"):
        if saved.get(k) != now.get(k):
            raise TrainError(f"--resume: {where} is not the data this run trained on ({_differs(k, now.get(k), saved.get(k))}); "
                             "a resume never mixes two datasets: start a new run with --weights CHECKPOINT to "
                             "train on other data")
    return None


def _differs(key: str, now: Any, saved: Any) -> str:
    """What differs, in words: "train images: 11, the checkpoint's: 12"."""
    if key == "names":
        return "class names differ"
    if now is None or saved is None:
        return f"{key} split: {'none' if now is None else repr(now['split'])}, the checkpoint's: " + (
            "none" if saved is None else repr(saved["split"]))
    field = next((f for f in ("split", "samples", "boxes") if now.get(f) != saved.get(f)), None)
    if field is None:
        return f"{key} split: the per-class box counts differ"
    what = {"split": "split", "samples": "images", "boxes": "boxes"}[field]
    return f"{key} {what}: {now[field]!r}, the checkpoint's: {saved[field]!r}"


def check_resume_epochs(cfg: TrainConfig, ckpt_epoch: int, ckpt_epochs: int) -> str | None:
    """Refuse (TrainError, one line) a resume with nothing left to train; else a note when it extends the run."""
    done = ckpt_epoch + 1
    if done >= cfg.epochs:
        raise TrainError(f"--resume {cfg.resume}: training to {cfg.epochs} epochs is already finished "
                         f"({done} done); give --epochs larger than {done} to train on")
    if cfg.epochs != ckpt_epochs:
        return f"resume: training to {cfg.epochs} epochs instead of {ckpt_epochs} (lr schedule over the new total)"
    return None
