"""``python -m trainer.run SHARDS``: train a YOLO detector from a packed folder.

Alone, on one GPU, on a CPU-only machine, or on many GPUs/nodes through
``torchrun --nproc_per_node=N -m trainer.run SHARDS``. Usage errors exit 2 with one readable line;
a Ctrl-C writes ``weights/last.pt`` and exits 130.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from packer.cli import ByteSize
from packer.cli_errors import run_one_line
from packer.storage.fs import parse_storage_options
from trainer.config import OPTIMIZERS, TrainConfig
from trainer.offline import setup_offline

_DEFAULT = TrainConfig()


class _OneLineCommand(click.Command):
    """Errors as one line on stderr and their exit status (`packer.cli_errors.run_one_line`; click's
    default adds a usage banner)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        return run_one_line(self, args, prog_name, "Error: ", complete_var=complete_var, **extra)


# ultralytics hyperparameters without an option above: --name and --name-with-dashes, both meaning the same
_HYP_HELP = {"warmup_momentum": "Momentum at the start of warmup.", "warmup_bias_lr": "Bias lr at the start of warmup.",
             "box": "Box loss gain.", "cls": "Class loss gain.", "dfl": "DFL loss gain.",
             "fraction": "Share of the train split to use."}
_HYP_AUG = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr",
            "mixup")


def hyp_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The hyperparameter options named as in ultralytics (``--hsv_h``, also ``--hsv-h``), plus ``--mosaic P``
    (alone: 1.0) and ``--no-mosaic`` (0.0)."""
    for name in reversed(("warmup_momentum", "warmup_bias_lr", "box", "cls", "dfl", *_HYP_AUG, "fraction")):
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        f = click.option(*flags, name, default=getattr(_DEFAULT, name), show_default=True, type=float,
                         help=_HYP_HELP.get(name, "Augmentation (ultralytics' meaning)."))(f)
    f = click.option("--no-mosaic", "no_mosaic", is_flag=True, help="Same as --mosaic 0.")(f)
    return click.option("--mosaic", default=_DEFAULT.mosaic, show_default=True, type=float, is_flag=False,
                        flag_value=1.0, help="Mosaic probability (--mosaic alone: 1.0).")(f)


def _none_or(value: str) -> str | None:
    return None if value.lower() == "none" else value


@click.command(cls=_OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("shards", required=False, type=click.Path(file_okay=False))
@click.option("--model", default=_DEFAULT.model, show_default=True,
              help="ultralytics model YAML (yolov8n.yaml, yolo11s.yaml, ...): built offline with the data's classes.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Initialise from a local ultralytics .pt (matching layers only). Never downloaded.")
@click.option("--epochs", default=_DEFAULT.epochs, show_default=True, type=int)
@click.option("--batch", default=_DEFAULT.batch, show_default=True, type=int,
              help="Global batch over all processes; -1 = largest that fits GPU memory.")
@click.option("--nbs", default=_DEFAULT.nbs, show_default=True, type=int, help="Nominal batch (accumulation target).")
@click.option("--imgsz", default=None, type=int, help="Square network input [default: 640, or the packed size if smaller].")
@click.option("--loader", default="auto", show_default=True, type=click.Choice(["auto", "dali", "torch"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "off"]),
              help="auto = bf16 where the GPU supports it, fp16+GradScaler otherwise, off on CPU.")
@click.option("--workers", default=None, type=click.IntRange(min=0), help="Loader threads/workers per process.")
@click.option("--optimizer", default="auto", show_default=True, type=click.Choice(list(OPTIMIZERS), case_sensitive=False))
@click.option("--lr0", default=_DEFAULT.lr0, show_default=True, type=float, help="Initial lr (ignored by 'auto').")
@click.option("--lrf", default=_DEFAULT.lrf, show_default=True, type=float, help="Final lr = lr0 * lrf.")
@click.option("--momentum", default=_DEFAULT.momentum, show_default=True, type=float)
@click.option("--weight-decay", "--weight_decay", "weight_decay", default=_DEFAULT.weight_decay, show_default=True, type=float)
@click.option("--warmup-epochs", "--warmup_epochs", "warmup_epochs", default=_DEFAULT.warmup_epochs, show_default=True, type=float)
@click.option("--cos-lr", "--cos_lr", "cos_lr", is_flag=True, help="Cosine lr schedule instead of linear.")
@click.option("--close-mosaic", "--close_mosaic", "close_mosaic", default=_DEFAULT.close_mosaic, show_default=True, type=click.IntRange(min=0),
              help="Turn mosaic off for the last N epochs.")
@click.option("--patience", default=_DEFAULT.patience, show_default=True, type=int,
              help="Early stop after N epochs without val improvement.")
@click.option("--train-split", default="auto", show_default=True,
              help="Split to train on; auto = 'train', else the one 'train*' split (train2017), else the only split.")
@click.option("--val-split", default="auto", show_default=True,
              help="Split to validate on; auto = 'val', else the one 'val*' split (val2017); 'none' = no validation.")
@click.option("--out", default=_DEFAULT.out, show_default=True, type=click.Path(file_okay=False),
              help="Run folder (runs/train -> runs/train2 if it exists, unless --exist-ok).")
@click.option("--exist-ok", is_flag=True, help="Reuse --out even if it exists.")
@click.option("--resume", default=None, type=click.Path(dir_okay=False),
              help="Continue from a last.pt (options come from the checkpoint; SHARDS optional).")
@click.option("--seed", default=_DEFAULT.seed, show_default=True, type=int)
@click.option("--verify", is_flag=True, help="Check shard sha256 against the manifest before training.")
@click.option("--storage-options", "storage_options", envvar="PACKER_STORAGE_OPTIONS", default=None,
              metavar="JSON|@FILE",
              help="fsspec options for a URL SHARDS (credentials, endpoint), as JSON or @file.json; also "
                   "$PACKER_STORAGE_OPTIONS. Default: the standard environment (AWS_ENDPOINT_URL, ...). Never saved.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Local cache of shards read from a URL by DALI/tfrecord/LMDB [default: $XDG_CACHE_HOME/packer-trainer, else ~/.cache/packer-trainer].")
@click.option("--cache-max-bytes", default=None, type=ByteSize(),
              help="Size bound of --cache-dir (20GB, 500MiB, ...): least recently used shards are evicted.")
@click.option("--cache", default=None, type=click.Choice(["ram", "disk"]),
              help="Decode the packed JPEGs once into one store per node shared by every rank and worker: "
                   "ram = /dev/shm, disk = --cache-dir/decoded. Refused in one line if it will not fit.")
@click.option("--cfg", "cfg_file", default=None, type=click.Path(dir_okay=False),
              help="YAML of hyperparameters in ultralytics' default.yaml names (lr0, hsv_h, mosaic, ...); "
                   "command-line options override it.")
@hyp_options
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write ultralytics' plots (train/val batches, labels, results, PR curves) into the run folder.")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="TensorBoard event file in the run folder [default: on when tensorboard is installed].")
@click.pass_context
def main(ctx: click.Context, shards: str | None, **opts: object) -> None:
    """Train a YOLO detector from SHARDS: a folder written by `packer build`, or its URL
    (s3://bucket/prefix, https://host/prefix, gs://, file://)."""
    if not shards and not opts["resume"]:
        raise click.UsageError("missing argument SHARDS (a packed folder), or --resume runs/train/weights/last.pt")
    opts["storage_options"] = parse_storage_options(opts["storage_options"]) or None  # type: ignore[arg-type]
    ctx.ensure_object(dict)["storage_options"] = opts["storage_options"]  # masked in any error message
    explicit = {k for k in opts if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if opts.pop("no_mosaic"):
        opts["mosaic"], explicit = 0.0, explicit | {"mosaic"}
    from_file = _read_cfg(opts.pop("cfg_file"))  # type: ignore[arg-type]
    opts.update({k: v for k, v in from_file.items() if k not in explicit})
    cfg = TrainConfig(shards=shards or "", **{k: v for k, v in opts.items() if k in TrainConfig.__dataclass_fields__})
    cfg.val_split = _none_or(str(opts["val_split"]))
    setup_offline()  # before anything imports ultralytics: nothing is downloaded, no update check
    _show_data_log()
    from trainer.loop import train

    result = train(cfg, given=explicit | set(from_file))
    if result.interrupted:
        sys.exit(130)


def _show_data_log() -> None:
    """The data path's info lines (a decoded cache being built: where, how big) on stdout beside the
    trainer's own; its warnings stay one plain line on stderr, as Python prints them by default."""
    lg = logging.getLogger("trainer.data")
    if lg.handlers:
        return
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda r: r.levelno < logging.WARNING)
    warn = logging.StreamHandler(sys.stderr)
    warn.setLevel(logging.WARNING)
    for h in (info, warn):
        lg.addHandler(h)
    lg.setLevel(logging.INFO)


def _read_cfg(path: str | None) -> dict[str, Any]:
    """The acting values of a --cfg file (one note for the keys that do not apply); a bad key is exit 2."""
    if not path:
        return {}
    from trainer.hyp import ignored_note, read_cfg_file

    values, ignored = read_cfg_file(path)  # TrainError (exit 2) for a bad file or key
    note = ignored_note(ignored)
    if note:
        click.echo(note, err=True)
    return values


if __name__ == "__main__":
    main(prog_name="python -m trainer.run")
