"""ultralytics' optimisation recipe (REFERENCE §2.4), as functions of the run's config.

Gradient accumulation to a nominal batch (``nbs``), weight decay scaled to it, the three parameter
groups of ultralytics' own ``build_optimizer``, linear or cosine ``LambdaLR``, and the warmup of
lr / momentum / bias lr / accumulation over the first iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.utils.torch_utils import one_cycle

from trainer.config import TrainConfig


def accumulate_steps(nbs: int, global_batch: int) -> int:
    """ultralytics' gradient accumulation: batches per optimizer step to reach the nominal batch."""
    return max(round(nbs / global_batch), 1)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The lr factor of each epoch: cosine (one_cycle) or linear from 1 down to `lrf`."""
    if cfg.cos_lr:
        return one_cycle(1, cfg.lrf, cfg.epochs)
    return lambda x: max(1 - x / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf


@dataclass
class Optim:
    """The optimizer of a run and what its schedule needs."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lf: Callable[[int], float]
    accumulate: int  # batches per optimizer step after warmup
    weight_decay: float  # as scaled to the nominal batch
    name: str  # the optimizer 'auto' resolved to
    lr0: float  # its initial lr (auto chooses one)
    warmup_bias_lr: float
    momentum: float  # as the optimizer holds it (Adam's beta1; 'auto' picks 0.9)


def build_optim(cfg: TrainConfig, model: nn.Module, *, global_batch: int, steps_per_epoch: int, num_samples: int,
                num_classes: int, resumed_args: dict[str, Any] | None = None) -> Optim:
    """The optimizer and schedule ultralytics' trainer would build; `resumed_args` (a checkpoint's
    train_args) makes a resume rebuild exactly what the first run chose ('auto' resolved)."""
    accumulate = accumulate_steps(cfg.nbs, global_batch)
    weight_decay = cfg.weight_decay * global_batch * accumulate / cfg.nbs
    accumulate = min(accumulate, steps_per_epoch * cfg.epochs)
    iterations = math.ceil(num_samples / max(global_batch, cfg.nbs)) * cfg.epochs
    # ultralytics' build_optimizer reads only .args and .data from its trainer: a stub is enough
    args = SimpleNamespace(lr0=cfg.lr0, optimizer=cfg.optimizer, warmup_bias_lr=cfg.warmup_bias_lr,
                           momentum=cfg.momentum)
    if resumed_args is not None:  # the lr that 'auto' chose is the base of the schedule (LambdaLR's base_lrs)
        args.optimizer = resumed_args.get("optimizer_resolved", cfg.optimizer)
        args.lr0 = float(resumed_args.get("lr0_resolved", cfg.lr0))
        args.warmup_bias_lr = resumed_args.get("warmup_bias_lr_resolved", cfg.warmup_bias_lr)
        args.momentum = float(resumed_args.get("momentum_resolved", cfg.momentum))  # 'auto' -> AdamW takes 0.9
    stub = SimpleNamespace(args=args, data={"nc": num_classes})
    optimizer = BaseTrainer.build_optimizer(stub, model, name=args.optimizer, lr=args.lr0, momentum=args.momentum,
                                            decay=weight_decay, iterations=iterations)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    lf = lr_lambda(cfg)
    g0 = optimizer.param_groups[0]
    return Optim(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf), lf, accumulate,
                 weight_decay, type(optimizer).__name__, g0["lr"], args.warmup_bias_lr,
                 float(g0["betas"][0] if "betas" in g0 else g0.get("momentum", cfg.momentum)))


def warmup_iters(cfg: TrainConfig, steps_per_epoch: int, epochs: int | None = None) -> int:
    """Iterations of warmup: --warmup-epochs worth, but never the whole run. `epochs` is the total the run
    started with when a resume extends it (the warmup it had is not stretched over the new total)."""
    we = min(cfg.warmup_epochs, max((epochs or cfg.epochs) - 1, 0))
    return round(we * steps_per_epoch) if we > 0 else 0


def warm_up(opt: Optim, cfg: TrainConfig, ni: int, nw: int, epoch: int) -> int:
    """Set lr/momentum of iteration `ni` of a `nw`-iteration warmup; returns its accumulation."""
    xi = [0, nw]
    for g in opt.optimizer.param_groups:
        start = opt.warmup_bias_lr if g.get("param_group") == "bias" else 0.0
        g["lr"] = float(np.interp(ni, xi, [start, g["initial_lr"] * opt.lf(epoch)]))
        if "momentum" in g:
            g["momentum"] = float(np.interp(ni, xi, [cfg.warmup_momentum, cfg.momentum]))
    return max(1, int(np.interp(ni, xi, [1, opt.accumulate]).round()))
