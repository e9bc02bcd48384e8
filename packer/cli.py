"""`packer` command line: thin wrappers over build_dataset, verify_dataset, dataset_info.

Exit codes: 0 ok; 1 the data failed (verify mismatch, --strict problems); 2 usage error
(bad option, undetectable source, output folder conflict); 130 interrupted.
"""

from __future__ import annotations

import json
import sys

import click

from packer import __version__
from packer.cli_params import DATASET, LOCAL_FOLDER, STORAGE_OPTIONS, ByteSize, not_empty
from packer.format import FORMATS


def _progress_default() -> bool:
    return sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="packer")
def cli() -> None:
    """Pack YOLO/COCO image folders into pre-resized, indexed, checksummed shards."""


@cli.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--out", callback=not_empty, default="shards", show_default=True, help="Output folder, or a URL (s3://, gs://, file://).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="tfrecord", show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=704, show_default=True, help="Long side in pixels (aspect kept).")
@click.option("--upscale", is_flag=True, help="Also enlarge images smaller than --size.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG quality of re-encoded images.")
@click.option("--chroma", type=click.Choice(["auto", "420", "444"]), default="auto", show_default=True,
              help="Chroma subsampling of re-encoded images: 420 (colour at half resolution), 444 (full; 1.33x the "
                   "bytes, 1.46x the decode), or auto: 444 where most boxes are small (< 32x32 px), 420 elsewhere.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None, help="Samples per shard (default: by --shard-bytes, at least --min-shards shards).")
@click.option("--shard-bytes", type=ByteSize(), default="256MiB", show_default=True, help="Target shard size.")
@click.option("--min-shards", type=click.IntRange(min=1), default=8, show_default=True, help="Small splits still get this many shards.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True, help="Shuffle sample order at pack time.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--splits", default=None, help="Comma-separated splits to pack (default: all found).")
@click.option("--keep-crowd", is_flag=True, help="Keep COCO iscrowd=1 boxes.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485, show_default=True,
              help="Skip images whose header declares more pixels (reason too_large), without decoding them.")
@click.option("--follow-symlinks", is_flag=True,
              help="Pack symlinks that lead outside SRC (default: skipped as symlink_outside_root).")
@click.option("--overwrite", is_flag=True,
              help="Replace what packer wrote in --out (your other files there are kept).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted build, keeping finished shards (refused if the source changed).")
@click.option("--strict", is_flag=True,
              help="Fail (exit 1) on any problem in the input (COCO crowd boxes, dropped by choice, excepted).")
@click.option("--num-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Multi-machine packing: split the work into N parts (then `packer merge`).")
@click.option("--part", type=click.IntRange(min=0), default=None,
              help="Which part (0-based) to pack here; it goes to OUT/parts/part-IIIII-of-NNNNN/.")
@click.option("--staging", type=click.Path(file_okay=False), default=None,
              help="With -o URL: local folder to build in before the upload (default: a temp folder, removed).")
@STORAGE_OPTIONS
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="With -o URL: retries per file on transient network errors (exponential backoff).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def build(src, out, fmt, size, upscale, quality, chroma, shard_size, shard_bytes, min_shards, workers, shuffle, seed,
          splits, keep_crowd, max_pixels, follow_symlinks, overwrite, resume, strict, num_parts, part, staging,
          storage_options, retries, as_json, progress) -> None:
    """Pack SRC (a COCO or YOLO folder, detected automatically) into shards.

    -o may be a URL (s3://bucket/prefix, gs://..., file://...): the dataset is built in a
    local staging folder, then uploaded with its manifest last."""
    from packer.build import StrictFailure, build_dataset
    from packer.storage.fs import is_url, parse_storage_options

    remote = is_url(out)
    if remote:
        if num_parts > 1:
            raise click.UsageError("multi-part builds write to a local or shared folder; push the merged result")
        from packer.storage.push import build_to_url

        so = parse_storage_options(storage_options)

        def build_dataset(src, out, **kw):  # noqa: ANN001, ANN202 - same call, remote destination
            kw.pop("num_parts", None)
            kw.pop("part", None)
            return build_to_url(src, out, staging=staging, storage_options=so, attempts=retries + 1, **kw)[0]

    try:
        res = build_dataset(
            src, out, fmt=fmt, size=size, quality=quality, chroma=chroma, shard_size=shard_size,
            shard_bytes=shard_bytes,
            min_shards=min_shards, workers=workers, shuffle=shuffle, seed=seed,
            splits=[s.strip() for s in splits.split(",") if s.strip()] if splits else None,
            keep_crowd=keep_crowd, upscale=upscale, max_pixels=max_pixels, follow_symlinks=follow_symlinks,
            overwrite=overwrite, resume=resume, strict=strict,
            progress=_progress_default() if progress is None else progress,
            num_parts=num_parts, part=part,
        )
    except StrictFailure as e:
        if as_json:  # a pipeline parsing stdout still gets one object
            click.echo(json.dumps({"ok": False, "exit_code": 1, "error": str(e), "problems": e.problems}))
        click.echo(f"packer: {e}", err=True)
        for line in e.problems[:50]:
            click.echo(f"  {line}", err=True)
        if len(e.problems) > 50:
            click.echo(f"  ... and {len(e.problems) - 50} more", err=True)
        sys.exit(1)
    summary = res.summary()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(format_build_summary(summary))


def _stored(counts: dict[str, int]) -> str:
    """How the packed images were stored: "120 source bytes kept, 8 re-encoded 4:2:0, 3 re-encoded 4:4:4"."""
    names = {"source": "source bytes kept", "420": "re-encoded 4:2:0", "444": "re-encoded 4:4:4"}
    return ", ".join(f"{counts[k]} {v}" for k, v in names.items() if counts.get(k))


def format_build_summary(s: dict) -> str:
    """The table printed after a build."""
    im, bx = s["images"], s["boxes"]
    rows = [
        f"packed {s['layout']} -> {s['format']} in {s['out']}",
        f"  splits        {', '.join(f'{k} {v}' for k, v in s['splits'].items())}",
        f"  images        {im['packed']} packed / {im['found']} found" + _reasons(im["skipped"], "skipped"),
        f"  boxes         {bx['packed']} packed / {bx['found']} found" + _reasons(bx["dropped"], "dropped"),
    ]
    if im.get("stored"):
        rows.append(f"  stored        {_stored(im['stored'])}")
    if s["fixes"] or s["warnings"]:
        rows.append(f"  fixed/warned  {_plain(s['fixes'])}{'; ' if s['fixes'] and s['warnings'] else ''}{_plain(s['warnings'])}")
    ratio = s["output_bytes"] / s["input_bytes"] if s["input_bytes"] else 0
    rows += [
        f"  shards        {s['shards']}" + (f" ({s['resumed_shards']} kept from the interrupted build)" if s["resumed_shards"] else ""),
        f"  size          {s['output_bytes'] / 1e6:.1f} MB out vs {s['input_bytes'] / 1e6:.1f} MB in ({ratio:.2f}x)",
        f"  time          {s['elapsed_s']:.1f} s, {s['img_per_s'] or 0:.1f} img/s",
    ]
    rows += [f"  note          {n}" for n in s["notes"]]
    if any(im["skipped"].values()) or any(bx["dropped"].values()):
        rows.append("  details       report.json lists every skipped image and dropped box")
    return "\n".join(rows)


def _reasons(d: dict, verb: str) -> str:
    return f"; {verb}: {_plain(d)}" if d else ""


def _plain(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


@cli.command()
@click.argument("shards", type=DATASET)
@click.option("--deep", is_flag=True, help="Also decode every image.")
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--progress/--no-progress", default=None)
def verify(shards, deep, storage_options, as_json, progress) -> None:
    """Check checksums, index files, record counts and labels of a packed dataset (folder or URL)."""
    from packer.storage.fs import display_url, parse_storage_options
    from packer.verify import verify_dataset

    res = verify_dataset(shards, deep=deep, progress=_progress_default() if progress is None else progress,
                         storage_options=parse_storage_options(storage_options))
    shards = display_url(shards)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        what = f"{res.checked_shards} shards, {res.checked_records} records" + (f", {res.decoded_images} images decoded" if deep else "")
        if res.ok:
            click.echo(f"OK: {shards}: {what}")
        else:
            click.echo(f"FAILED: {shards}: {len(res.errors)} problem(s) in {what}", err=True)
            for e in res.errors:
                click.echo(f"  {e}", err=True)
    sys.exit(0 if res.ok else 1)


@cli.command()
@click.argument("shards", type=DATASET)
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print as one JSON object.")
def info(shards, storage_options, as_json) -> None:
    """Summarize a packed dataset (folder or URL): splits, counts, per-class table, shard balance."""
    from packer.info import dataset_info, format_info
    from packer.storage.fs import parse_storage_options

    d = dataset_info(shards, parse_storage_options(storage_options))
    click.echo(json.dumps(d) if as_json else format_info(d))


@cli.command()
@click.argument("shards", type=LOCAL_FOLDER)
@click.argument("url")
@STORAGE_OPTIONS
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="Retries per file on transient network errors (exponential backoff).")
@click.option("--overwrite", is_flag=True,
              help="Replace another dataset packer wrote at URL (only its files; others there are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None)
def push(shards, url, storage_options, retries, overwrite, as_json, progress) -> None:
    """Upload packed dataset SHARDS to URL (s3://, gs://, file://), manifest last; files
    already there with the same size and sha256 are skipped, so a rerun finishes a cut-off push.
    URL must be empty, this same dataset or its unfinished push; another packed dataset needs
    --overwrite; a folder holding files packer did not write is refused either way."""
    from packer.storage.fs import parse_storage_options
    from packer.storage.push import push as push_dataset
    from packer.storage.transfer import format_transfer_summary

    res = push_dataset(shards, url, storage_options=parse_storage_options(storage_options), attempts=retries + 1,
                       progress=_progress_default() if progress is None else progress, overwrite=overwrite)
    s = res.summary()
    click.echo(json.dumps(s) if as_json else format_transfer_summary(s, "pushed"))


@cli.command()
@click.argument("url")
@click.argument("out", type=click.Path(file_okay=False))
@STORAGE_OPTIONS
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="Retries per file on transient network errors (exponential backoff).")
@click.option("--overwrite", is_flag=True,
              help="Replace another dataset packer wrote in OUT (your other files there are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None)
def pull(url, out, storage_options, retries, overwrite, as_json, progress) -> None:
    """Download the packed dataset at URL (s3://, gs://, http(s)://, file://) into folder OUT,
    manifest last; every file is checked against the manifest, matching local files are kept.
    OUT must be new, empty, this same dataset or an unfinished pull of URL (else --overwrite)."""
    from packer.storage.fs import parse_storage_options
    from packer.storage.pull import pull as pull_dataset
    from packer.storage.transfer import format_transfer_summary

    res = pull_dataset(url, out, storage_options=parse_storage_options(storage_options), attempts=retries + 1,
                       progress=_progress_default() if progress is None else progress, overwrite=overwrite)
    s = res.summary()
    click.echo(json.dumps(s) if as_json else format_transfer_summary(s, "pulled"))


@cli.command()
@click.argument("dest", type=LOCAL_FOLDER)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def merge(dest, as_json) -> None:
    """Join the parts packed with --num-parts/--part in DEST into one dataset."""
    from packer.parts import merge_parts

    m = merge_parts(dest)
    s = {"out": dest, "format": m.format, "parts": m.options["parts"]["num_parts"],
         "splits": {k: v.num_samples for k, v in m.splits.items()},
         "shards": sum(len(v.shards) for v in m.splits.values())}
    if as_json:
        click.echo(json.dumps(s))
    else:
        click.echo(f"merged {s['parts']} parts -> {m.format} in {dest}: "
                   + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + f"; {s['shards']} shards")


@cli.command()
@click.argument("shards", type=LOCAL_FOLDER)
@click.option("-o", "--out", callback=not_empty, required=True, help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Target format.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Samples per output shard (default: keep the source's shard boundaries).")
@click.option("--overwrite", is_flag=True,
              help="Replace what packer wrote in --out (your other files there are kept).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check source checksums and labels while copying.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None)
def convert(shards, out, fmt, shard_size, overwrite, check, as_json, progress) -> None:
    """Re-shard SHARDS into another format (JPEG bytes and labels copied, no re-encode)."""
    import time

    from packer.convert import convert_dataset

    t0 = time.perf_counter()
    m = convert_dataset(shards, out, fmt, shard_size=shard_size, overwrite=overwrite, check=check,
                        progress=_progress_default() if progress is None else progress)
    s = {"out": out, "format": m.format, "from": m.options["converted_from"]["format"],
         "splits": {k: v.num_samples for k, v in m.splits.items()},
         "shards": sum(len(v.shards) for v in m.splits.values()), "elapsed_s": round(time.perf_counter() - t0, 3)}
    if as_json:
        click.echo(json.dumps(s))
    else:
        click.echo(f"converted {s['from']} -> {m.format} in {out}: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
                   + f"; {s['shards']} shards in {s['elapsed_s']:.1f} s")


@cli.command()
@click.argument("shards", type=DATASET)
@click.option("--split", default=None, help="Split to show (default: train, the one train* split, else the first).")
@click.option("-n", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Samples in the grid.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Which samples (same seed, same picture).")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Show what the trainer's loader feeds the model (needs the [train] extra).")
@click.option("--imgsz", default=640, show_default=True, type=click.IntRange(min=32), help="Input size with --augment.")
@click.option("-o", "--out", callback=not_empty, default="preview.jpg", show_default=True, help="The grid image (.jpg).")
@STORAGE_OPTIONS
def preview(shards, split, n, seed, augment, imgsz, out, storage_options) -> None:
    """Draw packed samples with their boxes and class names into one grid image."""
    from packer.preview import write_preview
    from packer.storage.fs import parse_storage_options

    # PreviewError exits 2, PreviewDataError (a shard or image that cannot be read) 1
    path = write_preview(shards, out, split=split, n=n, seed=seed, augment=augment, imgsz=imgsz,
                         storage_options=parse_storage_options(storage_options))
    click.echo(str(path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one readable line and exit 2 for usage errors, 1 for data and disk
    problems, never a traceback (`cli_errors.run_one_line`)."""
    from packer.cli_errors import run_one_line

    _log_notes()
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args if not a.startswith("-")), "")
    again = {"build": "rerun with --resume to continue", "convert": "rerun with --overwrite",
             "merge": "rerun it", "pull": "rerun it to finish: what was copied is kept",
             "push": "rerun it to finish: what was copied is kept"}.get(command)
    run_one_line(cli, argv, "packer", "packer: error: ",  # the commands that only read wrote nothing to speak of
                 interrupted=f"packer: interrupted; no manifest was written ({again})" if again else "packer: interrupted")


def _log_notes() -> None:
    """Library notes (e.g. a stale output lock taken over) go to stderr as `packer: note: ...`."""
    import logging

    log = logging.getLogger("packer")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("packer: note: %(message)s"))
        log.addHandler(h)
        log.propagate = False


if __name__ == "__main__":
    main()
