"""The training loop: ultralytics' optimisation recipe on batches streamed from packed shards.

What ultralytics' ``BaseTrainer`` does, step for step (REFERENCE §2.4): gradient accumulation to a
nominal batch (``nbs``), weight-decay scaling, three parameter groups from ultralytics' own
``build_optimizer``, warmup of lr/momentum/bias-lr, linear or cosine ``LambdaLR``, ``clip_grad_norm_(10)``,
``ModelEMA``, loss × world_size under DDP. Around it: AMP choice, DDP through torchrun's env vars, resume,
per-epoch validation, atomic checkpoints, results.csv, and the data-stall meter.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from torch import distributed as dist
from torch import nn

from trainer.offline import setup_offline

setup_offline()

from ultralytics.cfg import DEFAULT_CFG_DICT  # noqa: E402
from ultralytics.engine.trainer import BaseTrainer  # noqa: E402
from ultralytics.utils.torch_utils import EarlyStopping, ModelEMA, one_cycle, unwrap_model  # noqa: E402

from packer.format import FormatError, read_manifest  # noqa: E402
from packer.remote import RemoteError, display_url, is_url, open_manifest, redact  # noqa: E402
from trainer.evaluate import METRIC_KEYS, Evaluator, run_validation  # noqa: E402
from trainer.model import (  # noqa: E402
    ModelError,
    attach_hyp,
    build_model,
    load_resume_state,
    load_weights,
    save_checkpoint,
    set_rng_state,
    strip_checkpoint,
)

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "choose_amp", "accumulate_steps",
           "STALL_WARN_PCT", "LOSS_NAMES", "redacted_options", "resume_config", "stall_advice"]

STALL_WARN_PCT = 10.0  # warn when more than this share of step time is spent waiting for data
LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
OPTIMIZERS = ("auto", "SGD", "AdamW", "Adam", "MuSGD")
# A resumed run may change these (they do not change what is learned); everything else comes from the checkpoint.
RESUME_OVERRIDABLE = ("device", "workers", "loader", "patience", "verify", "cache_dir", "cache_max_bytes")


class TrainError(ValueError):
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
    mosaic: bool = True
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
    # data on network storage (shards is a URL): fsspec options (credentials: never saved, see
    # train_args), the local shard cache for DALI/tfrecord/LMDB reads and its size bound
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None  # None = trainer.data.default_cache_dir()
    cache_max_bytes: int | None = None

    def validate(self) -> None:
        """Raise TrainError (one line naming the option) for values that cannot work, before anything heavy starts."""
        for name, ok, rule in _NUMBER_RULES:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise TrainError(f"--{name.replace('_', '-')} must be {rule}, got {v!r}")
        if self.imgsz is not None and self.imgsz % 32:
            raise TrainError(f"--imgsz must be a multiple of 32 (the model's largest stride), got {self.imgsz}")
        for name, allowed in (("amp", AMP_MODES), ("loader", LOADERS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise TrainError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TrainError("--storage-options must be a JSON object")


AMP_MODES = ("auto", "bf16", "fp16", "off")
LOADERS = ("auto", "dali", "torch")
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
)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    out: Path
    last: Path
    best: Path | None
    epochs_done: int  # completed epochs, counting those before a resume
    metrics: dict[str, float] = field(default_factory=dict)
    best_fitness: float | None = None
    interrupted: bool = False
    steps: int = 0  # optimizer-loop iterations this process ran (equal on every rank)


# ----------------------------------------------------------------------------- small pure helpers


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
    import json

    return json.loads(redact(json.dumps(storage_options), storage_options))


def accumulate_steps(nbs: int, global_batch: int) -> int:
    """ultralytics' gradient accumulation: batches per optimizer step to reach the nominal batch."""
    return max(round(nbs / global_batch), 1)


def choose_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """(autocast dtype or None, use GradScaler, sentence to print) for --amp on `device`."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False, f"AMP: off ({'CPU default' if device.type != 'cuda' else 'as asked'}), fp32 training"
    if device.type != "cuda":
        if amp == "fp16":
            raise TrainError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
        return torch.bfloat16, False, "AMP: bf16 autocast on CPU (as asked)"
    bf16_ok = torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16_ok:
        raise TrainError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
    if amp in ("auto", "bf16") and bf16_ok:
        return torch.bfloat16, False, "AMP: bf16 autocast (GPU supports bf16; no GradScaler needed)"
    return torch.float16, True, "AMP: fp16 autocast + GradScaler" + (" (no bf16 on this GPU)" if amp == "auto" else "")


def stall_advice(kind: str, workers: int | None) -> str:
    """Which knob to try when the model waits for data, given the loader in use."""
    w = f"more --workers (now {workers if workers is not None else 'the default'})"
    disk = "or shards on a faster local disk (NVMe, /dev/shm)"
    if kind == "torch":
        where = "GPU decoding" if torch.cuda.is_available() else "needs a GPU to help"
        return f"try {w}, --loader dali ({where}), {disk}"
    if kind == "dali-cpu":
        return (f"decoding runs on the CPU here: try --loader torch (faster than DALI's CPU pipeline on CPU-only "
                f"machines), {w} (DALI threads), a smaller packed size, {disk}")
    return f"try {w}, {disk}"


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    if cfg.cos_lr:
        return one_cycle(1, cfg.lrf, cfg.epochs)
    return lambda x: max(1 - x / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf


def _increment_dir(path: Path, exist_ok: bool) -> Path:
    """ultralytics' run-dir rule: reuse with exist_ok, else runs/train -> runs/train2, train3, ..."""
    if exist_ok or not path.exists():
        return path
    for n in range(2, 10000):
        p = path.with_name(f"{path.name}{n}")
        if not p.exists():
            return p
    raise TrainError(f"no free run directory next to {path}")


class _Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and a few collectives that are no-ops alone."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu")

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        self.device = device
        if self.ddp and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if any rank set `flag` (the shared stop flag)."""
        if not self.ddp:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.ddp:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class _StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop (last.pt is written); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def resume_config(cfg: TrainConfig, ckpt_args: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the checkpoint's options, plus the few a resume may change.

    Returns (config, names of options the caller set that the resume ignores).
    """
    default = TrainConfig()
    names = [f for f in TrainConfig.__dataclass_fields__]
    new = TrainConfig(**{k: ckpt_args[k] for k in names if k in ckpt_args})
    ignored = []
    for k in names:
        mine = getattr(cfg, k)
        if k in ("resume", "shards"):
            continue
        if k in RESUME_OVERRIDABLE:
            if mine != getattr(default, k):
                setattr(new, k, mine)
        elif mine != getattr(default, k) and mine != getattr(new, k):
            ignored.append(k)
    new.resume = cfg.resume
    new.shards = cfg.shards or new.shards  # the data may have moved since
    new.storage_options = cfg.storage_options  # credentials are never saved: they come from this call only
    return new, ignored


def _resolve_device(spec: str, d: _Dist) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda") or spec.isdigit():
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if d.ddp:
            idx = d.local_rank  # one GPU per torchrun process
        elif ":" in spec:
            idx = int(spec.split(":", 1)[1])
        else:
            idx = int(spec) if spec.isdigit() else 0
        if idx >= torch.cuda.device_count():
            raise TrainError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the run


class _Run:
    """One training run; `train()` below is the public entry point."""

    def __init__(self, cfg: TrainConfig, loader_factory: Callable[..., Any] | None, log: Callable[[str], None]):
        self.cfg = cfg
        self.d = _Dist()
        self._log = log
        self.make_loader = loader_factory
        self.train_loader: Any = None
        self.val_loader: Any = None

    def log(self, msg: str) -> None:
        if self.d.main:
            self._log(msg)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.ckpt = load_resume_state(self.cfg.resume) if self.cfg.resume else None
        if self.ckpt is not None:
            self.cfg, ignored = resume_config(self.cfg, self.ckpt["train_args"])
            if ignored:
                self.log(f"warning: resume keeps the checkpoint's {', '.join(ignored)} "
                         f"(only {', '.join(RESUME_OVERRIDABLE)} may change); start a new run to change them")
        cfg = self.cfg
        cfg.validate()
        if not cfg.shards:
            raise TrainError("no SHARDS folder given")
        self.where = display_url(cfg.shards) if is_url(cfg.shards) else cfg.shards
        try:
            if is_url(cfg.shards):
                self.manifest = open_manifest(cfg.shards, cfg.storage_options)
            else:
                self.manifest = read_manifest(cfg.shards)
        except (FormatError, RemoteError) as e:
            raise TrainError(redact(str(e), cfg.storage_options)) from None
        m = self.manifest
        self.train_name = pick_split(m.splits, cfg.train_split, "train")
        if self.train_name is None:
            raise TrainError(f"{self.where}: no train split found (splits: {', '.join(sorted(m.splits)) or 'none'}); "
                             "name one with --train-split")
        self.val_name = pick_split(m.splits, cfg.val_split, "val")
        if cfg.imgsz is None:
            cfg.imgsz = 640 if m.size >= 640 else max(32, m.size // 32 * 32)
        self.names = list(m.names)

        self.device = _resolve_device(cfg.device, self.d)
        self.d.init(self.device)
        _seed_all(cfg.seed + 1 + self.d.rank)
        self.amp_dtype, use_scaler, amp_msg = choose_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        self._setup_out()
        self.log(f"data: {self.where} ({m.format}, packed at {m.size}px), {len(self.names)} classes, "
                 f"train split {self.train_name!r} {m.splits[self.train_name].num_samples} images, "
                 + (f"val split {self.val_name!r} {m.splits[self.val_name].num_samples} images"
                    if self.val_name else "no val split: validation off (best.pt follows the train loss)"))
        if cfg.imgsz > m.size:
            self.log(f"warning: --imgsz {cfg.imgsz} is larger than the packed size {m.size}: images get upscaled")
        self.log(f"device: {self.device}" + (f", DDP world size {self.d.world} ({'nccl' if self.device.type == 'cuda' else 'gloo'})"
                                            if self.d.ddp else ""))
        self.log(amp_msg)

        self._setup_model()
        self._setup_batch()
        self._setup_loaders()
        self._setup_optim()
        if self.ckpt is not None:
            self._restore()

    def _setup_out(self) -> None:
        cfg = self.cfg
        if cfg.resume:
            out = Path(cfg.resume).resolve().parent.parent  # runs/train/weights/last.pt -> runs/train
        else:
            out = _increment_dir(Path(cfg.out), cfg.exist_ok) if self.d.main else None
            out = Path(self.d.broadcast(str(out) if out else None))
        self.out = out
        self.wdir = out / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.csv = out / "results.csv"
        if self.d.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                self.csv.unlink(missing_ok=True)  # --exist-ok reuses the folder, not the old run's rows

    def _setup_model(self) -> None:
        cfg = self.cfg
        if self.ckpt is not None:
            model = self.ckpt["ema"].float()  # resume from the EMA weights, as ultralytics does
            if len(model.names) != len(self.names):
                raise TrainError(f"--resume: checkpoint has {len(model.names)} classes, the data {len(self.names)}")
        else:
            model = build_model(cfg.model, self.names)
            if cfg.weights:
                n, total = load_weights(model, cfg.weights)
                self.log(f"weights: transferred {n}/{total} tensors from {cfg.weights}")
        model.names = dict(enumerate(self.names))
        model.nc = len(self.names)
        for k, p in model.named_parameters():
            p.requires_grad = ".dfl" not in k  # ultralytics always freezes the DFL integral conv
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.hyp = {k: v for k, v in DEFAULT_CFG_DICT.items()}
        self.hyp.update(box=cfg.box, cls=cfg.cls, dfl=cfg.dfl, max_det=cfg.max_det, imgsz=cfg.imgsz,
                        epochs=cfg.epochs, batch=cfg.batch, nbs=cfg.nbs)
        attach_hyp(model, self.hyp)
        self.model = model
        self.stride = int(max(model.stride))
        if cfg.imgsz % self.stride:
            raise TrainError(f"--imgsz {cfg.imgsz} is not a multiple of the model stride {self.stride}")
        nparams = sum(p.numel() for p in model.parameters())
        self.log(f"model: {cfg.model if self.ckpt is None else 'resumed from ' + str(cfg.resume)} "
                 f"({nparams / 1e6:.2f}M parameters, nc={model.nc}), imgsz {cfg.imgsz}")

    def _setup_batch(self) -> None:
        cfg = self.cfg
        if cfg.batch == -1:
            per_rank = self._auto_batch()
            per_rank = min(self.d.gather(per_rank))  # every rank must use the same batch
            cfg.batch = per_rank * self.d.world
        if cfg.batch < self.d.world:
            raise TrainError(f"--batch {cfg.batch} is smaller than the number of processes ({self.d.world})")
        n_train = self.manifest.splits[self.train_name].num_samples
        if cfg.batch > n_train >= self.d.world:  # a tiny dataset: one full batch per epoch rather than none
            self.log(f"--batch {cfg.batch} is larger than the {n_train} training images: using batch "
                     f"{n_train // self.d.world * self.d.world}")
            cfg.batch = n_train // self.d.world * self.d.world
        self.rank_batch = cfg.batch // self.d.world
        self.global_batch = self.rank_batch * self.d.world

    def _auto_batch(self) -> int:
        """Largest batch that fits: ultralytics' estimate (profile 1..N, linear fit), then a real probe step."""
        default = 16
        if self.device.type != "cuda":
            self.log(f"--batch -1 (AutoBatch) is GPU-only: using batch {default} on {self.device.type}")
            return default
        from ultralytics.utils.autobatch import autobatch

        b = autobatch(self.model, imgsz=self.cfg.imgsz, fraction=0.6, batch_size=default)
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        while b >= 1:  # probe: one real forward/backward at the chosen size
            try:
                torch.cuda.reset_peak_memory_stats(self.device)
                img = torch.rand(b, 3, self.cfg.imgsz, self.cfg.imgsz, device=self.device)
                batch = {"img": img, "batch_idx": torch.zeros(0, device=self.device),
                         "cls": torch.zeros(0, 1, device=self.device), "bboxes": torch.zeros(0, 4, device=self.device)}
                with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, _ = self.model.loss(batch)
                loss.sum().backward()
                self.model.zero_grad(set_to_none=True)
                peak = torch.cuda.max_memory_reserved(self.device) / 2**30
                self.log(f"AutoBatch: batch {b} per GPU, probe used {peak:.2f} of {total:.1f} GiB")
                return b
            except torch.cuda.OutOfMemoryError:
                b //= 2
            finally:
                torch.cuda.empty_cache()
                self.model.criterion = None
        raise TrainError("AutoBatch: even batch 1 does not fit in GPU memory at this --imgsz")

    def _setup_loaders(self) -> None:
        cfg = self.cfg
        if self.make_loader is None:
            from trainer.data import make_loader  # the real data path

            self.make_loader = make_loader
        augment = None
        if not cfg.mosaic:
            from trainer.data.transforms import AugmentConfig

            augment = AugmentConfig(mosaic=0.0)
        common = dict(loader=cfg.loader, imgsz=cfg.imgsz, rank=self.d.rank, world_size=self.d.world,
                      seed=cfg.seed, workers=cfg.workers, device=self.device, verify=cfg.verify)
        if is_url(cfg.shards):  # network storage: only then (a custom loader_factory need not know these)
            common.update(storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                          cache_max_bytes=cfg.cache_max_bytes)
        try:
            self.train_loader = self.make_loader(cfg.shards, self.train_name, batch=self.rank_batch, train=True,
                                                 augment=augment, **common)
            if self.val_name:
                self.val_loader = self.make_loader(cfg.shards, self.val_name, batch=self.rank_batch * 2,
                                                   train=False, **common)
        except FormatError as e:
            raise TrainError(redact(str(e), cfg.storage_options)) from e
        self.nb = len(self.train_loader)
        if self.nb == 0:
            raise TrainError(f"the train split has fewer images than one batch ({self.rank_batch})")
        self.log(f"loader: {self.train_loader.kind}, batch {self.global_batch}"
                 + (f" ({self.rank_batch} per rank)" if self.d.ddp else "")
                 + f", {self.nb} steps per epoch" + (f", workers {cfg.workers}" if cfg.workers is not None else ""))

    def _setup_optim(self) -> None:
        cfg = self.cfg
        self.accumulate = accumulate_steps(cfg.nbs, self.global_batch)
        weight_decay = cfg.weight_decay * self.global_batch * self.accumulate / cfg.nbs
        self.accumulate = min(self.accumulate, self.nb * cfg.epochs)
        iterations = math.ceil(self.train_loader.num_samples / max(self.global_batch, cfg.nbs)) * cfg.epochs
        # ultralytics' build_optimizer reads only .args and .data from its trainer: a stub is enough
        stub = SimpleNamespace(args=SimpleNamespace(lr0=cfg.lr0, optimizer=cfg.optimizer,
                                                    warmup_bias_lr=cfg.warmup_bias_lr),
                               data={"nc": len(self.names)})
        if self.ckpt is not None:  # rebuild exactly what the first run chose ('auto' resolved)
            ta = self.ckpt["train_args"]
            stub.args.optimizer = ta.get("optimizer_resolved", cfg.optimizer)
            stub.args.warmup_bias_lr = ta.get("warmup_bias_lr_resolved", cfg.warmup_bias_lr)
        self.optimizer = BaseTrainer.build_optimizer(stub, self.model, name=stub.args.optimizer, lr=cfg.lr0,
                                                     momentum=cfg.momentum, decay=weight_decay,
                                                     iterations=iterations)
        self.optimizer_name = type(self.optimizer).__name__
        self.lr0 = self.optimizer.param_groups[0]["lr"]
        self.warmup_bias_lr = stub.args.warmup_bias_lr
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.lf = _lr_lambda(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        if self.d.ddp:
            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=False, **kw)
        else:
            self.train_model = self.model
        self.ema = ModelEMA(self.model)
        self.stopper = EarlyStopping(patience=cfg.patience)
        self.best_fitness: float | None = None
        self.start_epoch = 0
        self.log(f"optimizer: {self.optimizer_name}(lr={self.lr0:.6g}, momentum={cfg.momentum}) "
                 f"weight_decay {weight_decay:.3g}, accumulate {self.accumulate} (nominal batch {cfg.nbs}), "
                 f"{'cosine' if cfg.cos_lr else 'linear'} schedule, EMA on")

    def _restore(self) -> None:
        ck = self.ckpt
        self.start_epoch = int(ck["epoch"]) + 1
        if self.start_epoch >= self.cfg.epochs:
            raise TrainError(f"--resume {self.cfg.resume}: training to {self.cfg.epochs} epochs is already finished")
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.ema.ema.load_state_dict(ck["ema"].float().state_dict())
        self.ema.updates = int(ck.get("updates", 0))
        self.best_fitness = ck.get("best_fitness")
        self.stopper.__dict__.update(ck.get("stopper") or {})
        set_rng_state(ck.get("rng"))
        if self.d.rank:  # each rank continues its own stream, as in a fresh run
            _seed_all(self.cfg.seed + 1 + self.d.rank + self.start_epoch)
        self.log(f"resuming from {self.cfg.resume}: epoch {self.start_epoch + 1} of {self.cfg.epochs}")
        self.ckpt = None  # free the memory

    # -- bookkeeping ---------------------------------------------------------------------------
    def train_args(self) -> dict[str, Any]:
        a = asdict(self.cfg)
        # no credentials in args.yaml / checkpoints: URL user:password and query stripped, secret options masked
        a.update(shards=self.where, storage_options=redacted_options(self.cfg.storage_options))
        a.update(task="detect", mode="train", data=str(self.where), imgsz=self.cfg.imgsz,
                 batch=self.global_batch, optimizer_resolved=self.optimizer_name, lr0_resolved=self.lr0,
                 warmup_bias_lr_resolved=self.warmup_bias_lr,
                 device_resolved=str(self.device), world_size=self.d.world,
                 amp_resolved=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                 loader_resolved=getattr(self.train_loader, "kind", self.cfg.loader), accumulate=self.accumulate,
                 names=self.names, val_split_resolved=self.val_name, save_dir=str(self.out))
        return a

    def _write_args(self) -> None:
        if self.d.main:
            tmp = self.out / ".args.yaml.tmp"
            tmp.write_text(yaml.safe_dump(self.train_args(), sort_keys=False))
            os.replace(tmp, self.out / "args.yaml")

    def _trim_csv(self) -> None:
        """On resume, drop rows of epochs that will be trained again (a kill after the row, before last.pt)."""
        if not (self.d.main and self.csv.exists()):
            return
        with open(self.csv, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= self.start_epoch]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        os.replace(tmp, self.csv)

    def _append_csv(self, row: dict[str, Any]) -> None:
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(list(row))
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def _save(self, epoch_done: int, metrics: dict[str, float], paths: list[Path]) -> None:
        save_checkpoint(
            paths, self.ema.ema, epoch=epoch_done, train_args=self.train_args(), best_fitness=self.best_fitness,
            metrics=metrics, ema_updates=self.ema.updates, optimizer=self.optimizer, scaler=self.scaler,
            scheduler=self.scheduler,
            extra={"stopper": {"best_fitness": self.stopper.best_fitness, "best_epoch": self.stopper.best_epoch}},
        )

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, stop: _StopFlag) -> TrainResult:
        cfg = self.cfg
        nb, nw = self.nb, self._warmup_iters()
        acc0 = self.accumulate
        self._write_args()
        self._trim_csv()
        self.scheduler.last_epoch = self.start_epoch - 1
        metrics: dict[str, float] = {}
        t_start = time.time()
        steps = 0
        epoch = self.start_epoch
        self.done_epoch = self.start_epoch - 1
        interrupted = False
        mosaic_on = cfg.mosaic
        last_opt_step = -1
        self.optimizer.zero_grad()
        if self.d.main:
            self._log(f"training epochs {self.start_epoch + 1}..{cfg.epochs} -> {self.out}")
        while epoch < cfg.epochs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 'lr_scheduler.step() before optimizer.step()'
                self.scheduler.step()
            self.model.train()
            self.train_loader.set_epoch(epoch)
            want_mosaic = cfg.mosaic and not (cfg.close_mosaic and epoch >= cfg.epochs - cfg.close_mosaic)
            if want_mosaic != mosaic_on or epoch == self.start_epoch:
                self.train_loader.set_mosaic(want_mosaic)
                if mosaic_on and not want_mosaic:
                    self.log(f"closing mosaic for the last {cfg.close_mosaic} epochs")
                mosaic_on = want_mosaic
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            tloss = torch.zeros(3)
            t_wait = t_total = 0.0
            n_img = 0
            pbar = None
            if self.d.main:
                from tqdm import tqdm

                pbar = tqdm(total=nb, desc=f"{epoch + 1}/{cfg.epochs}", leave=True, dynamic_ncols=True,
                            file=sys.stderr, bar_format="{l_bar}{bar:10}{r_bar}")
            it = iter(self.train_loader)
            i = 0
            for i in range(nb):
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    raise RuntimeError(f"the train loader yielded {i} batches, {nb} promised by len()") from None
                t1 = time.perf_counter()
                ni = i + nb * epoch
                if nw and ni <= nw:
                    xi = [0, nw]
                    self.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
                    for g in self.optimizer.param_groups:
                        start = self.warmup_bias_lr if g.get("param_group") == "bias" else 0.0
                        g["lr"] = float(np.interp(ni, xi, [start, g["initial_lr"] * self.lf(epoch)]))
                        if "momentum" in g:
                            g["momentum"] = float(np.interp(ni, xi, [cfg.warmup_momentum, cfg.momentum]))
                loss_items = self._step(batch, ni, last_opt_step)
                if ni - last_opt_step >= self.accumulate:
                    self._optimizer_step()
                    last_opt_step = ni
                tloss = (tloss * i + loss_items) / (i + 1)
                n_img += int(batch["img"].shape[0])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # so the step time is the GPU's, not the launch queue's
                t2 = time.perf_counter()
                t_wait += t1 - t0
                t_total += t2 - t0
                steps += 1
                if pbar is not None:
                    pbar.set_postfix_str(
                        " ".join(f"{k.split('_')[0]}={v:.3f}" for k, v in zip(LOSS_NAMES, tloss.tolist(), strict=True))
                        + f" img/s={n_img * self.d.world / max(t_total, 1e-9):.1f}"
                        + f" stall={100 * t_wait / max(t_total, 1e-9):.0f}%", refresh=False)
                    pbar.update(1)
                if self.d.any_flag(stop.requested):
                    interrupted = True
                    break
            if pbar is not None:
                pbar.close()
            if interrupted:
                if self.d.main:
                    self._save(epoch - 1, metrics, [self.last])
                    self._log(f"interrupted in epoch {epoch + 1} after {i + 1}/{nb} steps: wrote {self.last} "
                              f"(resume with --resume {self.last}; epoch {epoch + 1} restarts)")
                break
            crit = unwrap_model(self.model).criterion
            if hasattr(crit, "update"):
                crit.update()
            lrs = {f"lr/pg{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)}
            self.ema.update_attr(self.model, include=["yaml", "nc", "args", "names", "stride", "class_weights"])

            # validation (collective: every rank evaluates its share)
            val_loss: dict[str, float] = {}
            if self.val_loader is not None:
                metrics, val_loss = run_validation(
                    self.ema.ema, self.val_loader, Evaluator(nc=len(self.names), max_det=cfg.max_det),
                    device=self.device, amp_dtype=self.amp_dtype)
                fitness = metrics["metrics/mAP50-95(B)"]
            else:
                metrics = dict.fromkeys(METRIC_KEYS, 0.0)
                fitness = -float(tloss.sum())
            is_best = self.best_fitness is None or fitness > self.best_fitness
            if is_best:
                self.best_fitness = fitness
            should_stop = self.stopper(epoch + 1, fitness) if self.val_loader is not None else False

            img_s = n_img * self.d.world / max(t_total, 1e-9)
            stall = 100 * t_wait / max(t_total, 1e-9)
            mem = torch.cuda.max_memory_reserved(self.device) / 2**30 if self.device.type == "cuda" else 0.0
            if self.d.main:
                row: dict[str, Any] = {"epoch": epoch + 1, "time": round(time.time() - t_start, 3)}
                row.update({f"train/{k}": float(v) for k, v in zip(LOSS_NAMES, tloss.tolist(), strict=True)})
                row.update({k: float(metrics[k]) for k in METRIC_KEYS})
                row.update({f"val/{k}": float(val_loss.get(k, 0.0)) for k in LOSS_NAMES})
                row.update({k: float(v) for k, v in lrs.items()})
                row.update({"img_per_s": float(img_s), "data_stall_pct": float(stall), "gpu_mem_gb": float(mem)})
                self._append_csv(row)
                self._print_epoch(epoch, metrics, img_s, stall, mem, self.val_loader is not None)
                paths = [self.last] + ([self.best] if is_best else [])
                self._save(epoch, metrics, paths)
            self.done_epoch = epoch
            epoch += 1
            if should_stop:
                self.log(f"early stop: no val improvement for {cfg.patience} epochs "
                         f"(best epoch {self.stopper.best_epoch})")
                break
        if self.d.main and not interrupted and self.best.exists():
            strip_checkpoint(self.best)  # best.pt is for inference/export; last.pt keeps the resume state
        steps_per_rank = self.d.gather(steps)
        if self.d.ddp:
            self.log(f"steps per rank: {', '.join(map(str, steps_per_rank))}")
        self.log(f"{'stopped' if interrupted else 'done'}: {epoch - self.start_epoch} epoch(s) in "
                 f"{(time.time() - t_start) / 60:.1f} min; best mAP50-95 {self.best_fitness if self.val_loader else 'n/a'}"
                 f"; weights in {self.wdir}")
        return TrainResult(out=self.out, last=self.last, best=self.best if self.best.exists() else None,
                           epochs_done=epoch, metrics=metrics, best_fitness=self.best_fitness,
                           interrupted=interrupted, steps=steps)

    def _warmup_iters(self) -> int:
        we = min(self.cfg.warmup_epochs, max(self.cfg.epochs - 1, 0))
        return round(we * self.nb) if we > 0 else 0

    def _step(self, batch: dict[str, Any], ni: int, last_opt_step: int) -> torch.Tensor:
        """Forward + backward of one batch; returns the detached loss items (box, cls, dfl)."""
        batch = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batch["img"] = batch["img"].float() / 255
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        # no gradient all-reduce on accumulation steps that do not end in an optimizer step
        sync = ni - last_opt_step >= self.accumulate
        no_sync = self.train_model.no_sync() if (self.d.ddp and not sync) else contextlib.nullcontext()
        with no_sync:
            with ctx:
                loss, items = self.train_model(batch)
                loss = loss.sum()
                if self.d.ddp:
                    loss = loss * self.d.world  # DDP averages gradients; ultralytics scales the loss back up
            self.scaler.scale(loss).backward()
        return torch.tensor([float(items[k]) for k in LOSS_NAMES])

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.ema.update(self.model)

    def _print_epoch(self, epoch: int, metrics: dict[str, float], img_s: float, stall: float, mem: float,
                     has_val: bool) -> None:
        if has_val:
            m = [metrics[k] for k in METRIC_KEYS]
            self._log(f"{'':>4}{'val':<10}{'P':>8}{'R':>8}{'mAP50':>8}{'mAP50-95':>10}\n"
                      f"{'':>4}{'all':<10}{m[0]:>8.3f}{m[1]:>8.3f}{m[2]:>8.3f}{m[3]:>10.3f}")
        mem_txt = f"peak GPU mem {mem:.2f} GB" if self.device.type == "cuda" else "no GPU"
        self._log(f"    epoch {epoch + 1}: {img_s:.1f} img/s, data stall {stall:.1f}%, {mem_txt}")
        if stall > STALL_WARN_PCT:
            self._log(f"warning: {stall:.0f}% of step time was spent waiting for data (> {STALL_WARN_PCT:.0f}%): "
                      + stall_advice(getattr(self.train_loader, "kind", ""), self.cfg.workers))

    def close(self) -> None:
        for ld in (self.train_loader, self.val_loader):
            if ld is not None:
                with contextlib.suppress(Exception):
                    ld.close()


def train(
    cfg: TrainConfig,
    *,
    loader_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a YOLO detector from packed shards; the whole `python -m trainer.run` job.

    Works alone or under torchrun (RANK/WORLD_SIZE/LOCAL_RANK); metrics and checkpoints come from rank 0.
    `loader_factory` defaults to `trainer.data.make_loader` (same signature). Raises TrainError/ModelError for
    bad options or data; a Ctrl-C returns a result with ``interrupted=True`` after writing last.pt.
    """
    run = _Run(cfg, loader_factory, log)
    try:
        with _StopFlag() as stop:
            run.setup()
            try:
                return run.fit(stop)
            except KeyboardInterrupt:
                # second Ctrl-C (or one outside the step loop): keep what we have, without collectives
                if run.d.main and getattr(run, "ema", None) is not None:
                    with contextlib.suppress(Exception):
                        run._save(getattr(run, "done_epoch", run.start_epoch - 1), {}, [run.last])
                raise
    except ModelError as e:
        raise TrainError(str(e)) from e
    finally:
        run.close()
        run.d.close()
