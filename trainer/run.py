"""``python -m trainer.run SHARDS``: train a YOLO detector from a packed folder.

Alone, on one GPU, on a CPU-only machine, or on many GPUs/nodes through
``torchrun --nproc_per_node=N -m trainer.run SHARDS``. Usage errors exit 2 with one readable line;
a Ctrl-C writes ``weights/last.pt`` and exits 130.
"""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from packer.cli import ByteSize
from packer.remote import parse_storage_options, redact
from trainer.config import OPTIMIZERS, TrainConfig
from trainer.offline import setup_offline

_DEFAULT = TrainConfig()


class _OneLineCommand(click.Command):
    """Usage errors as one line on stderr and exit 2 (click's default adds a usage banner)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            sys.exit(130)


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
@click.option("--optimizer", default="auto", show_default=True, type=click.Choice(list(OPTIMIZERS)))
@click.option("--lr0", default=_DEFAULT.lr0, show_default=True, type=float, help="Initial lr (ignored by 'auto').")
@click.option("--lrf", default=_DEFAULT.lrf, show_default=True, type=float, help="Final lr = lr0 * lrf.")
@click.option("--momentum", default=_DEFAULT.momentum, show_default=True, type=float)
@click.option("--weight-decay", default=_DEFAULT.weight_decay, show_default=True, type=float)
@click.option("--warmup-epochs", default=_DEFAULT.warmup_epochs, show_default=True, type=float)
@click.option("--cos-lr", is_flag=True, help="Cosine lr schedule instead of linear.")
@click.option("--mosaic/--no-mosaic", default=True, show_default=True)
@click.option("--close-mosaic", default=_DEFAULT.close_mosaic, show_default=True, type=click.IntRange(min=0),
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
              help="Local cache of shards read from a URL by DALI/tfrecord/LMDB [default: ~/.cache/packer-trainer].")
@click.option("--cache-max-bytes", default=None, type=ByteSize(),
              help="Size bound of --cache-dir (20GB, 500MiB, ...): least recently used shards are evicted.")
@click.pass_context
def main(ctx: click.Context, shards: str | None, **opts: object) -> None:
    """Train a YOLO detector from SHARDS: a folder written by `packer build`, or its URL
    (s3://bucket/prefix, https://host/prefix, gs://, file://)."""
    if not shards and not opts["resume"]:
        raise click.UsageError("missing argument SHARDS (a packed folder), or --resume runs/train/weights/last.pt")
    try:
        opts["storage_options"] = parse_storage_options(opts["storage_options"]) or None  # type: ignore[arg-type]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    explicit = {k for k in opts if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    cfg = TrainConfig(shards=shards or "", **{k: v for k, v in opts.items() if k in TrainConfig.__dataclass_fields__})
    cfg.val_split = _none_or(str(opts["val_split"]))
    if cfg.resume:
        # options not given on the command line must not count as "changed" against the checkpoint
        for k in TrainConfig.__dataclass_fields__:
            if k not in explicit and k not in ("shards", "resume", "storage_options"):
                setattr(cfg, k, getattr(_DEFAULT, k))
    setup_offline()  # before anything imports ultralytics: nothing is downloaded, no update check
    from trainer.loop import train

    try:
        result = train(cfg)
    except ValueError as e:  # TrainError, ModelError, FormatError, the loader's input errors: the user's to fix
        msg = redact(str(e), cfg.storage_options)
        raise click.UsageError(msg.splitlines()[0] if msg else type(e).__name__) from None
    if result.interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main(prog_name="python -m trainer.run")
