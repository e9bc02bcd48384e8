"""Everything before the first step: options, data, device, model, batch, loaders, optimizer, resume.

`PreparedRun.setup` reads the manifest (local or URL), resolves the device, AMP and seeds
(`trainer.runtime`), makes the run folder (`trainer.records`), builds the model (`trainer.model`),
the loaders (`trainer.data.make_loader`) and ultralytics' optimizer (`trainer.optim`), and restores a
checkpoint's state on resume. `trainer.loop.Run` adds the epochs on top.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.utils.torch_utils import EarlyStopping, ModelEMA

from packer.format import FormatError
from packer.storage.fs import RemoteError, display_url, is_url, redact
from packer.storage.location import DatasetLocation
from trainer.config import (
    RESUME_OVERRIDABLE,
    TrainConfig,
    TrainError,
    check_resume_data,
    check_resume_epochs,
    data_identity,
    pick_split,
    redacted_options,
    resume_config,
)
from trainer.data.split import fraction_sizes
from trainer.hyp import augment_config, loader_fraction
from trainer.model import load_resume_state, prepare_model, set_rng_state
from trainer.optim import build_optim
from trainer.plots import RunPlots
from trainer.records import RunRecords, run_dir
from trainer.runtime import Dist, auto_batch, choose_amp, resolve_device, seed_all
from trainer.tensorboard import TensorBoardLog, resolve_tensorboard


class PreparedRun:
    """A training run up to its first step; `trainer.loop.Run` trains it."""

    def __init__(self, cfg: TrainConfig, loader_factory: Callable[..., Any] | None, log: Callable[[str], None],
                 given: Collection[str] | None = None):
        self.cfg = cfg
        self.given = given  # the options the caller set (see config.resume_config)
        self.d = Dist()
        self._log = log
        self.make_loader = loader_factory
        self.train_loader: Any = None
        self.val_loader: Any = None
        self.ema: Any = None
        self.plots = RunPlots(Path("."), [], enabled=False, log=log)  # the real ones once the run folder exists
        self.tb = TensorBoardLog(Path("."), enabled=False)
        self.start_epoch = 0
        self.first_epochs: int | None = None  # on resume: the epochs the run was started with (its warmup)
        self.done_epoch: int | None = None  # last completed epoch, once fit() runs

    def log(self, msg: str) -> None:
        if self.d.main:
            self._log(msg)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Options, data, device, model, batch, loaders, optimizer, and the resume state if any."""
        self.ckpt = load_resume_state(self.cfg.resume) if self.cfg.resume else None
        if self.ckpt is not None:
            self.cfg, ignored = resume_config(self.cfg, self.ckpt["train_args"], self.given)
            if ignored:
                self.log(f"warning: resume keeps the checkpoint's {', '.join(ignored)} "
                         f"(only {', '.join(RESUME_OVERRIDABLE)} may change); start a new run to change them")
        self.cfg.validate()
        self.augment = augment_config(self.cfg)  # refuses augmentations the loaders lack, before anything heavy
        self.cfg.tensorboard = resolve_tensorboard(self.cfg.tensorboard)
        if self.ckpt is not None:
            self.first_epochs = self.ckpt["train_args"].get("epochs")
            note = check_resume_epochs(self.cfg, int(self.ckpt["epoch"]), self.first_epochs)
            if note:
                self.log(note)
        self._setup_data()
        self.data_id = data_identity(self.manifest, self.train_name, self.val_name)
        if self.ckpt is not None:
            note = check_resume_data(self.ckpt.get("data_identity"), self.data_id, self.where)
            if note:
                self.log(note)
        self.device = resolve_device(self.cfg.device, self.d)
        self.d.init(self.device)
        seed_all(self.cfg.seed + 1 + self.d.rank)
        self.amp_dtype, use_scaler, amp_msg = choose_amp(self.cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self._setup_records()
        self._log_setup(amp_msg)
        self.model = prepare_model(self.cfg, self.names, self.device, self.ckpt["ema"] if self.ckpt else None,
                                   self.log)
        self._setup_batch()
        self._setup_loaders()
        self._plot_labels()
        self._setup_optim()
        if self.ckpt is not None:
            self._restore()

    def _setup_data(self) -> None:
        """The manifest (local or URL) and the train/val splits it offers."""
        cfg = self.cfg
        if not cfg.shards:
            raise TrainError("no SHARDS folder given")
        self.where = display_url(cfg.shards) if is_url(cfg.shards) else cfg.shards
        try:
            self.location = DatasetLocation(cfg.shards, cfg.storage_options)
            m = self.location.manifest()
        except (FormatError, RemoteError) as e:
            raise TrainError.like(e, redact(str(e), cfg.storage_options)) from None
        self.manifest = m
        self.train_name = pick_split(m.splits, cfg.train_split, "train")
        if self.train_name is None:
            raise TrainError(f"{self.where}: no train split found (splits: {', '.join(sorted(m.splits)) or 'none'}); "
                             "name one with --train-split")
        self.val_name = pick_split(m.splits, cfg.val_split, "val")
        if cfg.imgsz is None:
            cfg.imgsz = 640 if m.size >= 640 else max(32, m.size // 32 * 32)
        self.names = list(m.names)

    def _setup_records(self) -> None:
        if self.cfg.resume:
            out = Path(self.cfg.resume).resolve().parent.parent  # runs/train/weights/last.pt -> runs/train
        else:
            out = run_dir(self.cfg.out, self.cfg.exist_ok) if self.d.main else None
            out = Path(self.d.broadcast(str(out) if out else None))
        self.rec = RunRecords(out, main=self.d.main, resume=bool(self.cfg.resume))
        self.out = out
        self.plots = RunPlots(out, self.names, enabled=self.cfg.plots and self.d.main, log=self.log)
        self.tb = TensorBoardLog(out, enabled=bool(self.cfg.tensorboard) and self.d.main)

    def _log_setup(self, amp_msg: str) -> None:
        m, cfg = self.manifest, self.cfg
        self.log(f"data: {self.where} ({m.format}, packed at {m.size}px), {len(self.names)} classes, "
                 f"train split {self.train_name!r} {m.splits[self.train_name].num_samples} images"
                 + (f" (fraction {cfg.fraction}: {self._train_images()})" if cfg.fraction < 1 else "") + ", "
                 + (f"val split {self.val_name!r} {m.splits[self.val_name].num_samples} images"
                    if self.val_name else "no val split: validation off (best.pt follows the train loss)"))
        if cfg.imgsz > m.size:
            self.log(f"warning: --imgsz {cfg.imgsz} is larger than the packed size {m.size}: images get upscaled")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.log(f"device: {self.device}" + (f", DDP world size {self.d.world} ({backend})" if self.d.ddp else ""))
        self.log(amp_msg)

    def _train_images(self) -> int:
        """Images the train loader will read: the leading share a --fraction keeps (its own rule)."""
        shards = self.manifest.splits[self.train_name].shards
        return sum(fraction_sizes([sh.num_samples for sh in shards], self.cfg.fraction))

    def _setup_batch(self) -> None:
        cfg = self.cfg
        if cfg.batch == -1:
            per_rank = auto_batch(self.model, cfg.imgsz, self.device, self.amp_dtype, self.log)
            cfg.batch = min(self.d.gather(per_rank)) * self.d.world  # every rank must use the same batch
        if cfg.batch < self.d.world:
            raise TrainError(f"--batch {cfg.batch} is smaller than the number of processes ({self.d.world})")
        n_train = self._train_images()
        if cfg.batch > n_train >= self.d.world:  # a tiny dataset: one full batch per epoch rather than none
            self.log(f"--batch {cfg.batch} is larger than the {n_train} training images: using batch "
                     f"{n_train // self.d.world * self.d.world}")
            cfg.batch = n_train // self.d.world * self.d.world
        n_val = self.manifest.splits[self.val_name].num_samples if self.val_name else self.d.world
        if n_val < self.d.world:  # refused now, before a decoded cache of the train split is built
            raise TrainError(f"the val split {self.val_name!r} has {n_val} images: fewer than the {self.d.world} "
                             "processes that must share it; pass --val-split none, or use fewer processes")
        self.rank_batch = cfg.batch // self.d.world
        self.global_batch = self.rank_batch * self.d.world

    def _setup_loaders(self) -> None:
        cfg = self.cfg
        if self.make_loader is None:
            from trainer.data import make_loader  # the real data path

            self.make_loader = make_loader
        extra = loader_fraction(cfg, self.make_loader)
        common = dict(loader=cfg.loader, imgsz=cfg.imgsz, rank=self.d.rank, world_size=self.d.world,
                      seed=cfg.seed, workers=cfg.workers, device=self.device, verify=cfg.verify)
        if cfg.cache:  # only then: a custom loader_factory need not know the decoded cache
            common.update(cache=cfg.cache, cache_dir=cfg.cache_dir)
        if is_url(cfg.shards):  # network storage: only then (a custom loader_factory need not know these)
            common.update(storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                          cache_max_bytes=cfg.cache_max_bytes)
        try:
            self.train_loader = self.make_loader(cfg.shards, self.train_name, batch=self.rank_batch, train=True,
                                                 augment=self.augment, **extra, **common)
            if self.val_name:
                self.val_loader = self.make_loader(cfg.shards, self.val_name, batch=self.rank_batch * 2,
                                                   train=False, **common)
        except FormatError as e:
            raise TrainError.like(e, redact(str(e), cfg.storage_options)) from e
        self.nb = len(self.train_loader)
        if self.nb == 0:
            raise TrainError(f"the train split has fewer images than one batch ({self.rank_batch})")
        reason = getattr(self.train_loader, "reason", "")
        self.log(f"loader: {self.train_loader.kind}" + (f" ({reason})" if reason else "") + f", batch {self.global_batch}"
                 + (f" ({self.rank_batch} per rank)" if self.d.ddp else "")
                 + f", {self.nb} step{'s' if self.nb != 1 else ''} per epoch" + (f", workers {cfg.workers}" if cfg.workers is not None else ""))

    def _plot_labels(self) -> None:
        """labels.jpg from the train split's label arrays (labels.npz; no shard is read)."""
        if not self.plots.enabled:
            return
        cfg = self.cfg
        try:
            la = self.location.labels(self.train_name)
        except (OSError, FormatError, RemoteError) as e:
            self.log(f"warning: could not draw labels.jpg: {redact(str(e), cfg.storage_options)}")
            return
        self.plots.labels(la.cls, la.boxes)

    def _setup_optim(self) -> None:
        cfg = self.cfg
        self.opt = build_optim(cfg, self.model, global_batch=self.global_batch, steps_per_epoch=self.nb,
                               num_samples=self.train_loader.num_samples, num_classes=len(self.names),
                               resumed_args=self.ckpt["train_args"] if self.ckpt is not None else None)
        self.optimizer, self.scheduler, self.accumulate = self.opt.optimizer, self.opt.scheduler, self.opt.accumulate
        if self.d.ddp:
            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=False, **kw)
        else:
            self.train_model = self.model
        self.ema = ModelEMA(self.model)
        self.stopper = EarlyStopping(patience=cfg.patience)
        self.best_fitness: float | None = None
        self.best_state: dict[str, Any] | None = None  # the best EMA weights, kept for the final plots
        self.log(f"optimizer: {self.opt.name}(lr={self.opt.lr0:.6g}, momentum={self.opt.momentum:.3g}) "
                 f"weight_decay {self.opt.weight_decay:.3g}, accumulate {self.accumulate} (nominal batch {cfg.nbs}), "
                 f"{'cosine' if cfg.cos_lr else 'linear'} schedule, EMA on")
        dropped = sorted({"lr0", "momentum"} & set(self.given or ())) if cfg.optimizer.lower() == "auto" else []
        if dropped and self.ckpt is None:  # ultralytics says the same: auto picks both
            self.log(f"note: optimizer auto chooses lr0 and momentum itself: the {' and '.join(dropped)} given "
                     f"{'is' if len(dropped) == 1 else 'are'} ignored (name an optimizer, e.g. --optimizer SGD, "
                     "to use it)")

    def _restore(self) -> None:
        ck = self.ckpt
        self.start_epoch = int(ck["epoch"]) + 1
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.ema.ema.load_state_dict(ck["ema"].float().state_dict())
        self.ema.updates = int(ck.get("updates", 0))
        self.best_fitness = ck.get("best_fitness")
        self.stopper.__dict__.update(ck.get("stopper") or {})
        set_rng_state(ck.get("rng"))
        # the final plots validate the best weights, which may come from before the resume: every rank reads them,
        # or none does, so that the final validation stays collective
        if self.cfg.plots and self.val_loader is not None and min(self.d.gather(int(self.rec.best.is_file()))):
            best = torch.load(self.rec.best, map_location="cpu", weights_only=False)  # our own checkpoint
            self.best_state = best["ema"].float().state_dict()
        if self.d.rank:  # each rank continues its own stream, as in a fresh run
            seed_all(self.cfg.seed + 1 + self.d.rank + self.start_epoch)
        self.log(f"resuming from {self.cfg.resume}: epoch {self.start_epoch + 1} of {self.cfg.epochs}")
        self.ckpt = None  # free the memory

    # -- bookkeeping ---------------------------------------------------------------------------
    def train_args(self) -> dict[str, Any]:
        """args.yaml and the checkpoints' train_args: the options as given and as resolved."""
        a = asdict(self.cfg)
        # no credentials in args.yaml / checkpoints: URL user:password and query stripped, secret options masked
        a.update(shards=self.where, storage_options=redacted_options(self.cfg.storage_options))
        a.update(task="detect", mode="train", data=str(self.where), imgsz=self.cfg.imgsz,
                 batch=self.global_batch, optimizer_resolved=self.opt.name, lr0_resolved=self.opt.lr0,
                 warmup_bias_lr_resolved=self.opt.warmup_bias_lr, momentum_resolved=self.opt.momentum,
                 device_resolved=str(self.device), world_size=self.d.world,
                 amp_resolved=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                 loader_resolved=getattr(self.train_loader, "kind", self.cfg.loader), accumulate=self.accumulate,
                 names=self.names, val_split_resolved=self.val_name, save_dir=str(self.out))
        return a

    def save(self, epoch_done: int, metrics: dict[str, float], paths: list[Path]) -> None:
        self.rec.save(
            paths, self.ema.ema, epoch=epoch_done, train_args=self.train_args(), best_fitness=self.best_fitness,
            metrics=metrics, ema_updates=self.ema.updates, optimizer=self.optimizer, scaler=self.scaler,
            scheduler=self.scheduler,
            extra={"stopper": {"best_fitness": self.stopper.best_fitness, "best_epoch": self.stopper.best_epoch},
                   "data_identity": self.data_id},
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.plots.wait()
        with contextlib.suppress(Exception):
            self.tb.close()
        for ld in (self.train_loader, self.val_loader):
            if ld is not None:
                with contextlib.suppress(Exception):
                    ld.close()
        # the DDP wrapper's reducer holds the process group: freed now, not by the interpreter's exit-time
        # teardown, where destroying gloo's threads aborted 1 run in ~10 ("terminate called without an active exception")
        self.train_model = None
        gc.collect()
