"""Hyperparameters by ultralytics' names: `--cfg my.yaml` in its ``default.yaml`` vocabulary.

The keys that apply to detection training here act (`APPLIED`); the other keys of ultralytics'
own ``cfg/default.yaml`` are ignored with one note naming them, and a warning naming those set to
other than ultralytics' default (``single_cls: true``, ``cutmix: 0.5``: what the user asked for and
does not get); anything else is a usage error that names the closest valid key. The augmentation
keys go to the loaders' `AugmentConfig` by name.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from trainer.config import AUGMENT_KEYS, TrainConfig, TrainError

APPLIED: dict[str, tuple[str, ...]] = {
    "schedule": ("epochs", "batch", "imgsz", "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs",
                 "warmup_momentum", "warmup_bias_lr", "cos_lr", "close_mosaic", "patience", "nbs", "optimizer"),
    "loss gains": ("box", "cls", "dfl"),
    "augmentation": AUGMENT_KEYS,
    "run": ("seed", "workers", "fraction"),
}
APPLIED_KEYS = tuple(k for keys in APPLIED.values() for k in keys)
# our own options that ultralytics lacks (loader, verify, ...) may sit in the same file; `plots` means the same in both
_OWN_ONLY = ("plots", "loader", "train_split", "val_split", "verify", "cache_dir", "cache_max_bytes", "tensorboard",
             "weights", "out")
# what our args.yaml records beside the options (the data, the run folder, values as resolved): a run's own
# args.yaml is a valid --cfg (SHARDS names the data), these are noted and ignored
_RECORDS = ("shards", "names", "save_dir", "world_size", "accumulate", "storage_options")
# run options both trainers have, under the same name: they act too (ultralytics' spellings of a value are read)
SHARED_RUN = ("model", "device", "amp", "exist_ok", "cache", "max_det")


@cache
def ultralytics_defaults() -> dict[str, Any]:
    """ultralytics' own ``cfg/default.yaml``, read from the installed package (not imported)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "default.yaml"
    return dict(yaml.safe_load(path.read_text()) or {})


def ultralytics_vocabulary() -> frozenset[str]:
    """Every key of ultralytics' own ``cfg/default.yaml``."""
    return frozenset(ultralytics_defaults())


def read_cfg_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values that act, keys ignored as not applicable with their values) of a `--cfg` YAML; TrainError
    for a bad file or key."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise TrainError(f"--cfg {path}: key {e.args[0]!r} is given twice; keep one") from None
    except OSError as e:
        raise TrainError(f"--cfg {path}: cannot read it ({(e.strerror or type(e).__name__).lower()})") from None
    except yaml.YAMLError as e:
        raise TrainError(f"--cfg {path}: cannot read it as YAML ({type(e).__name__})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise TrainError(f"--cfg {path}: must be a mapping of ultralytics' names (lr0: 0.01, ...)")
    vocab, acting = ultralytics_vocabulary(), set(APPLIED_KEYS) | set(_OWN_ONLY) | set(SHARED_RUN)
    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in SHARED_RUN:
            value = _from_ultralytics(key, value)
            if value is not None or key == "cache":
                values[key] = _checked_type(path, key, value)
        elif key in acting:
            values[key] = _checked_type(path, key, value)
        elif key in vocab or _is_record(key):
            ignored[key] = value
        else:
            near = difflib.get_close_matches(key, sorted(acting | vocab), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TrainError(f"--cfg {path}: unknown key {key!r}{hint}")
    return values, ignored


class _DuplicateKey(Exception):
    pass


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # the file's own scalar keys only: `<<: *base` merge keys may be overridden, as YAML means them
        own = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]
        if len(own) != len(set(own)):
            raise _DuplicateKey(next(k for k in own if own.count(k) > 1))
        return super().construct_mapping(node, deep=deep)


def _from_ultralytics(key: str, value: Any) -> Any:
    """A shared run option as ultralytics writes it, in our terms (None: keep our default)."""
    if key == "amp" and isinstance(value, bool):
        return "auto" if value else "off"
    if key == "cache":  # ultralytics: true = "ram", false = none
        return {True: "ram", False: None}.get(value, value) if isinstance(value, bool) or value is None else value
    if key == "device" and value is not None:
        return _device_from_ultralytics(value)
    return value


def _device_from_ultralytics(value: Any) -> str:
    """ultralytics' `device` (0, "0", "cpu", "0,1", [0, 1]) in ours (cuda:N, cpu; several GPUs: torchrun)."""
    if isinstance(value, list | tuple) or (isinstance(value, str) and "," in value):
        raise TrainError(f"--cfg device {value!r}: several GPUs train under torchrun "
                         "(torchrun --nproc_per_node=N -m trainer.run ...), one device per process")
    if isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and value.strip().isdigit()):
        return f"cuda:{int(value)}"
    return str(value)


def _checked_type(path: str | Path, key: str, value: Any) -> Any:
    """The value if its type fits the option (numbers are range-checked later by TrainConfig.validate)."""
    default = TrainConfig.__dataclass_fields__[key].default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise TrainError(f"--cfg {path}: {key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_record(key: str) -> bool:
    return key in _RECORDS or key.endswith("_resolved")


def ignored_note(ignored: dict[str, Any]) -> str | None:
    """The note about the keys ignored (ultralytics' that do not apply here, a run's records), and a
    warning line naming those set to other than ultralytics' default: a copy of default.yaml names
    some 70 keys, and the few a user changed must not drown in them."""
    if not ignored:
        return None
    records = [k for k in ignored if _is_record(k)]
    parts = [f"keys that do not apply to this trainer are ignored: {', '.join(k for k in ignored if k not in records)}"
             if len(records) < len(ignored) else "",
             f"a run's records are ignored: {', '.join(records)}" if records else ""]
    lines = [f"note: --cfg {'; '.join(p for p in parts if p)}"]
    defaults = ultralytics_defaults()
    changed = [f"{k}={v!r}" for k, v in ignored.items() if k in defaults and not _is_record(k) and v != defaults[k]]
    if changed:
        lines.append(f"warning: --cfg sets {', '.join(changed)}: this trainer does not apply "
                     f"{'it' if len(changed) == 1 else 'them'} (they are ultralytics options it lacks)")
    return "\n".join(lines)


def augment_config(cfg: TrainConfig) -> Any:
    """The loaders' `AugmentConfig` from the run's augmentation keys (mosaic 0 when it is off)."""
    from trainer.data.transforms import AugmentConfig, AugmentError

    try:
        return AugmentConfig(**{k: float(getattr(cfg, k)) for k in AUGMENT_KEYS})
    except AugmentError as e:
        raise TrainError(str(e)) from None


def loader_fraction(cfg: TrainConfig, make_loader: Callable[..., Any]) -> dict[str, Any]:
    """``{"fraction": f}`` for a loader that takes it; refuses a fraction < 1 the loader cannot honour."""
    try:
        takes = "fraction" in inspect.signature(make_loader).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return {"fraction": cfg.fraction}
    if cfg.fraction != 1.0:
        raise TrainError(f"--fraction {cfg.fraction}: this loader factory takes no fraction (keep it at 1.0)")
    return {}
