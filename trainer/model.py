"""Build the ultralytics detection model offline, load local weights, write ultralytics-compatible checkpoints.

Checkpoints are the dict ultralytics itself writes (``{"ema": DetectionModel (fp16), "model": None,
"train_args": {...}, "epoch": ...}``) so ``ultralytics.YOLO("best.pt")`` can predict, val and export them;
the resume state (optimizer, scaler, scheduler, EMA updates, RNG) rides along under extra keys.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT, get_cfg
from ultralytics.nn.tasks import DetectionModel, load_checkpoint
from ultralytics.utils import IterableSimpleNamespace
from ultralytics.utils.torch_utils import (
    convert_optimizer_state_dict_to_fp16,
    intersect_dicts,
    unwrap_model,
)

from packer.errors import PackerError
from packer.format import atomic_write_bytes

__all__ = [
    "ModelError",
    "build_model",
    "load_weights",
    "attach_hyp",
    "save_checkpoint",
    "strip_checkpoint",
    "load_resume_state",
    "rng_state",
    "set_rng_state",
    "packaged_model_yaml",
    "prepare_model",
]


class ModelError(PackerError, ValueError):
    """A model name or weights file the user gave cannot be used."""


def packaged_model_yaml(name: str) -> str:
    """Check that `name` is a model YAML ultralytics ships (or an existing local YAML) and return it.

    ``yolo11n.yaml`` resolves to the packaged ``yolo11.yaml`` at scale ``n``; nothing is downloaded.
    """
    if not name.endswith((".yaml", ".yml")):
        raise ModelError(f"--model must be a model YAML such as yolo11n.yaml or yolov8s.yaml, got {name!r} "
                         "(use --weights for a .pt file)")
    if Path(name).is_file():
        return name
    from ultralytics.nn.tasks import guess_model_scale  # noqa: F401  (import check only)
    from ultralytics.utils.checks import check_yaml

    try:
        check_yaml(Path(name).with_stem(_strip_scale(Path(name).stem)).name, hard=True)
    except Exception as e:  # ultralytics raises FileNotFoundError with a long message
        raise ModelError(f"unknown model {name!r}: not a local file nor a YAML packaged with ultralytics") from e
    return name


def _strip_scale(stem: str) -> str:
    import re

    return re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem)


def build_model(cfg: str, names: list[str], *, verbose: bool = False) -> DetectionModel:
    """Build a fresh `DetectionModel` from a packaged YAML (e.g. ``yolo11n.yaml``) with the dataset's classes."""
    cfg = packaged_model_yaml(cfg)
    if not names:
        raise ModelError("the dataset has no class names")
    model = DetectionModel(cfg, nc=len(names), verbose=verbose)
    model.names = dict(enumerate(names))
    model.nc = len(names)
    return model


def prepare_model(cfg: Any, names: list[str], device: torch.device, resumed: nn.Module | None,
                  log: Callable[[str], None]) -> DetectionModel:
    """The model a run trains, on `device`: `resumed` (a checkpoint's EMA model) or `cfg.model` built
    fresh (plus `cfg.weights`), with the data's class names, ultralytics' frozen DFL conv and the loss
    hyperparameters of `cfg` (a TrainConfig) attached."""
    if resumed is not None:
        model = resumed.float()  # resume from the EMA weights, as ultralytics does
        if len(model.names) != len(names):
            raise ModelError(f"--resume: checkpoint has {len(model.names)} classes, the data {len(names)}")
    else:
        model = build_model(cfg.model, names)
        if cfg.weights:
            n, total, arch = load_weights(model, cfg.weights)
            log(f"weights: transferred {n}/{total} tensors from {cfg.weights}")
            if n < total // 2:  # another architecture: most of the model starts from scratch, silently
                log(f"warning: --weights {cfg.weights} is a {arch or 'different'} model and --model is {cfg.model}: "
                    f"only {n} of {total} tensors fit; pass --model {arch or 'MODEL.yaml'} to start from all of them")
    model.names = dict(enumerate(names))
    model.nc = len(names)
    for k, p in model.named_parameters():
        p.requires_grad = ".dfl" not in k  # ultralytics always freezes the DFL integral conv
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    attach_hyp(model, {**DEFAULT_CFG_DICT, "box": cfg.box, "cls": cfg.cls, "dfl": cfg.dfl, "max_det": cfg.max_det,
                       "imgsz": cfg.imgsz, "epochs": cfg.epochs, "batch": cfg.batch, "nbs": cfg.nbs})
    stride = int(max(model.stride))
    if cfg.imgsz % stride:
        raise ModelError(f"--imgsz {cfg.imgsz} is not a multiple of the model stride {stride}")
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model if resumed is None else 'resumed from ' + str(cfg.resume)} "
        f"({nparams / 1e6:.2f}M parameters, nc={model.nc}), imgsz {cfg.imgsz}")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> tuple[int, int, str | None]:
    """Initialise `model` from a local ultralytics checkpoint, matching layers only.

    Returns (tensors loaded, tensors in the model, the checkpoint model's yaml name). Never downloads: a missing file is an error
    (ultralytics would look it up on GitHub).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"--weights {path}: no such file (weights are never downloaded)")
    try:
        src, _ = load_checkpoint(p)
    except Exception as e:
        raise ModelError(f"--weights {path}: not an ultralytics checkpoint ({e})") from e
    names = getattr(model, "names", None)
    model.load(src, verbose=False)  # ultralytics' own transfer: shape-matched tensors, cls-head remap by name
    if names is not None:
        model.names = names  # keep the dataset's names, whatever the source model had
    csd = src.float().state_dict()
    msd = model.state_dict()
    loaded = len(intersect_dicts(csd, msd))
    arch = (getattr(src, "yaml", None) or {}).get("yaml_file")
    return loaded, len(msd), Path(arch).name if arch else None


def attach_hyp(model: nn.Module, overrides: dict[str, Any] | None = None) -> None:
    """Give the model the hyperparameter namespace the loss reads (``hyp.box`` etc.) and reset the criterion."""
    m = unwrap_model(model)
    m.args = get_cfg(DEFAULT_CFG, overrides or {})
    m.criterion = None  # the criterion caches device/args/stride on first use


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (python, numpy, torch CPU and CUDA)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any] | None) -> None:
    """Restore what `rng_state` captured (missing parts are left alone)."""
    if not st:
        return
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"].cpu() if hasattr(st["torch"], "cpu") else st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _portable(v: Any) -> Any:
    """Make args YAML/pickle-plain (Paths and namespaces become strings/dicts)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (SimpleNamespace, IterableSimpleNamespace)):
        return {k: _portable(x) for k, x in vars(v).items()}
    if isinstance(v, dict):
        return {k: _portable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_portable(x) for x in v]
    return v


def save_checkpoint(
    paths: list[Path],
    ema_model: nn.Module,
    *,
    epoch: int,
    train_args: dict[str, Any],
    best_fitness: float | None = None,
    metrics: dict[str, float] | None = None,
    ema_updates: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one checkpoint to every path in `paths`, each atomically (temp file + os.replace).

    The EMA model is stored as ultralytics stores it: a half-precision, criterion-free copy under "ema".
    `epoch` is the 0-based index of the last *completed* epoch (ultralytics' convention; resume starts at +1).
    """
    e = deepcopy(unwrap_model(ema_model)).half().to(memory_format=torch.contiguous_format)
    e.criterion = None
    for v in e.state_dict().values():
        if v.is_floating_point():
            torch.nan_to_num_(v)  # an fp16 overflow must not poison the saved file
    args = _portable(dict(train_args))
    e.args = args  # YOLO(...) reads imgsz/task from model.args
    ckpt = {
        "epoch": epoch,
        "best_fitness": best_fitness,
        "model": None,
        "ema": e,
        "updates": ema_updates,
        "optimizer": convert_optimizer_state_dict_to_fp16(deepcopy(optimizer.state_dict())) if optimizer else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "train_args": args,
        "train_metrics": dict(metrics or {}),
        "rng": rng_state(),
        "date": datetime.now().astimezone().isoformat(),
        "version": ULTRALYTICS_VERSION,
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    for p in paths:
        atomic_write_bytes(Path(p), data)


def strip_checkpoint(path: str | os.PathLike) -> None:
    """Drop the resume state (optimizer, scaler, scheduler, RNG) from a finished run's checkpoint, atomically.

    What is left is what inference, val and export need (about a fifth of the size).
    """
    p = Path(path)
    ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own checkpoint: holds a pickled model
    for k in ("optimizer", "scaler", "scheduler", "rng"):
        ckpt[k] = None
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(p, buf.getvalue())


def load_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` for resuming (ModelError if it cannot resume)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own checkpoint: holds a pickled model
    except Exception as e:
        raise ModelError(f"--resume {path}: cannot read checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema"), nn.Module) or ckpt.get("optimizer") is None:
        raise ModelError(f"--resume {path}: not a resumable checkpoint (no optimizer state; was it stripped?)")
    if "train_args" not in ckpt or "epoch" not in ckpt:
        raise ModelError(f"--resume {path}: checkpoint lacks train_args/epoch")
    return ckpt
