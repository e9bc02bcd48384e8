"""`packer convert`: re-shard a packed dataset into another format, images untouched.

Records are read from the source shards and written to the new format's writer one at a
time (bounded memory): the JPEG bytes, labels and sizes are copied, never decoded or
re-encoded. The output has its own index files and label arrays (`shard`/`pos` for its
own shards), the source's report.json (copied) and a manifest written last, atomically,
with `format` changed and ``options["converted_from"]`` naming the source.

Shard boundaries are kept by default: output shard k holds exactly the samples of source
shard k. LMDB holds one environment per split, so converting *to* lmdb joins the shards
and records their sizes in ``options["shard_sizes"]``; converting *from* such an lmdb
restores them, which makes tfrecord -> wds -> lmdb -> tfrecord reproduce the original
tfrecord shards, index files and labels.npz byte for byte. `shard_size` re-shards instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packer import __version__
from packer.errors import DATA
from packer.format import (
    FORMATS,
    LABEL_FIELDS,
    MANIFEST_NAME,
    REPORT_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    Record,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    read_manifest,
    sha256_file,
    shard_name,
    write_manifest,
)
from packer.journal import label_only
from packer.output import (
    BuildError,
    OutputError,
    OutputFolder,
    output_folder,
)
from packer.progress import progress_bar
from packer.storage.location import DatasetLocation
from packer.writers import ShardWriter, get_writer, open_reader

CONVERTED_FROM = "converted_from"  # manifest options key: {"format", "path", "shard_size"}
SHARD_SIZES = "shard_sizes"  # manifest options key (lmdb outputs): {split: [samples per source shard]}


class ConvertError(BuildError, ValueError):
    """A conversion that cannot start or whose source is inconsistent (one readable line)."""


class SourceDamaged(ConvertError):
    """The source's shards or records disagree with its manifest or labels: the data failed (exit 1)."""

    exit_code = DATA


def convert_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    progress: bool = False,
) -> Manifest:
    """Write the packed dataset `src` to `out` in format `fmt` ("tfrecord", "wds", "lmdb").

    Keeps the source's shard boundaries unless `shard_size` (samples per output shard;
    not for lmdb, which has one environment per split) is given. With `check` (default)
    each source shard's size and sha256 are checked against the source manifest before it
    is read, and the copied labels are compared with the source's labels.npz, so a
    damaged source is refused (ConvertError) instead of copied. `overwrite` replaces a
    packed dataset (or an unfinished conversion) in `out`; otherwise `out` must be new or
    empty. Returns the new manifest.
    """
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if shard_size is not None and shard_size < 1:
        raise ConvertError("--shard-size must be >= 1")
    if shard_size is not None and fmt == "lmdb":
        raise ConvertError("--shard-size does not apply to lmdb (one environment per split)")
    src = Path(src).resolve()
    m = read_manifest(src)  # split names checked there (Manifest.validate)
    try:
        with output_folder(out, source=src, hint="free some space (or choose another -o), then convert again") as folder:
            folder.prepare(overwrite=overwrite, verb="replace", splits=m.splits)
            folder.start()  # marks the folder as an unfinished conversion until the manifest exists
            manifest = _convert_all(src, m, folder, fmt, shard_size, check, progress)
            folder.finish()
    except OutputError as e:  # the output folder's refusals, as this module's error type
        raise ConvertError(str(e)) from None
    return manifest


def _convert_all(src: Path, m: Manifest, folder: OutputFolder, fmt: str, shard_size: int | None, check: bool,
                 progress: bool) -> Manifest:
    out = folder.root
    splits: dict[str, SplitInfo] = {}
    sizes_out: dict[str, list[int]] = {}
    total = sum(s.num_samples for s in m.splits.values())
    with progress_bar(total, "converting", "rec", enabled=progress) as bar:
        for split in m.splits:
            plan = _plan(m, split, shard_size)
            splits[split] = _convert_split(src, m, split, folder, fmt, plan, check, bar)
            if isinstance(plan, list):
                sizes_out[split] = plan

    report = src / REPORT_NAME
    if report.is_file():
        folder.claim(REPORT_NAME)
        atomic_write_bytes(out / REPORT_NAME, report.read_bytes())
    options: dict[str, Any] = {k: v for k, v in m.options.items() if k not in (CONVERTED_FROM, SHARD_SIZES)}
    if "fmt" in options:
        options["fmt"] = fmt
    options[CONVERTED_FROM] = {"format": m.format, "path": str(src), "shard_size": shard_size}
    if fmt == "lmdb":
        options[SHARD_SIZES] = sizes_out
    manifest = Manifest(format=fmt, size=m.size, names=list(m.names), source=dict(m.source), options=options,
                        packer_version=__version__, splits=splits)
    folder.claim(MANIFEST_NAME)
    write_manifest(out, manifest)  # last: its presence means "complete"
    return manifest


def _plan(m: Manifest, split: str, shard_size: int | None) -> list[int] | int:
    """Samples per output shard: a list (keep boundaries) or a fixed size (re-shard)."""
    info = m.splits[split]
    if shard_size is not None:
        return shard_size
    sizes = [sh.num_samples for sh in info.shards]
    recorded = m.options.get(SHARD_SIZES, {})
    recorded = recorded.get(split) if isinstance(recorded, dict) else None
    if (m.format == "lmdb" and len(sizes) == 1 and isinstance(recorded, list)
            and all(isinstance(x, int) and x > 0 for x in recorded) and sum(recorded) == info.num_samples):
        return list(recorded)  # an lmdb made by convert: restore the boundaries it joined
    return [s for s in sizes if s > 0]


def _convert_split(src: Path, m: Manifest, split: str, folder: OutputFolder, fmt: str, plan: list[int] | int,
                   check: bool, bar) -> SplitInfo:  # noqa: ANN001 - tqdm
    out = folder.root
    info = m.splits[split]
    (out / split).mkdir(parents=True, exist_ok=True)
    targets = iter(plan) if isinstance(plan, list) else None
    shards: list[ShardInfo] = []
    rows: list[tuple] = []
    writer: ShardWriter | None = None
    in_shard = 0  # records in the open output shard
    target = 0

    def close() -> None:
        nonlocal writer, in_shard
        assert writer is not None
        w = writer.close()
        shards.append(ShardInfo(
            path=w.path.relative_to(out).as_posix(), num_samples=w.num_samples, bytes=w.bytes, sha256=w.sha256,
            index=w.index.relative_to(out).as_posix() if w.index else None,
        ))
        writer, in_shard = None, 0

    try:
        for sh in info.shards:
            path = src / sh.path
            if check:
                _check_shard(path, sh)
            count = 0
            for rec in _source_records(m.format, path, sh.path):
                if writer is None:
                    writer = _open_writer(folder, split, len(shards), fmt)
                    target = (next(targets, 0) if targets is not None else plan) if fmt != "lmdb" else 0
                writer.add(rec)  # the output side's errors pass on as they are: not the source's fault
                rows.append((label_only(rec), len(shards), in_shard))
                in_shard += 1
                count += 1
                bar.update(1)
                if target and in_shard >= target:
                    close()
            if count != sh.num_samples:
                raise SourceDamaged(f"{sh.path}: {count} records, the source manifest says {sh.num_samples}")
        if writer is not None:
            close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    return _split_info(folder, split, len(m.names), LabelArrays.from_records(rows), shards,
                       DatasetLocation(src, manifest=m) if check else None)


def _split_info(folder: OutputFolder, split: str, nc: int, labels: LabelArrays, shards: list[ShardInfo],
                check_against: DatasetLocation | None) -> SplitInfo:
    """Write the split's labels.npz (after comparing with the source's) and describe the split."""
    if check_against is not None:
        _check_labels(check_against, labels, split)
    folder.save_labels(split, labels)
    return SplitInfo.of(split, labels, nc, shards)


def _open_writer(folder: OutputFolder, split: str, number: int, fmt: str) -> ShardWriter:
    rel = f"{split}/{shard_name(split, number, fmt)}"
    folder.claim(rel, *([] if fmt == "lmdb" else [rel + ".idx"]))
    return get_writer(fmt, folder.root / rel)


def _check_shard(path: Path, sh: ShardInfo) -> None:
    if not path.is_file():
        raise SourceDamaged(f"{sh.path}: source shard missing")
    if path.stat().st_size != sh.bytes or sha256_file(path) != sh.sha256:
        raise SourceDamaged(f"{sh.path}: source shard does not match its manifest checksum (corrupt or changed); "
                           "run packer verify")


def _source_records(fmt: str, path: Path, rel: str) -> Iterator[Record]:
    """The records of a source shard; what cannot be read is SourceDamaged (exit 1)."""
    try:
        with open_reader(fmt, path) as reader:
            yield from reader
    except (FormatError, OSError) as e:
        raise SourceDamaged(f"{rel}: cannot read the source shard ({e}); run packer verify on it") from None


def _check_labels(source: DatasetLocation, got: LabelArrays, split: str) -> None:
    """The copied records must carry exactly the labels the source's labels.npz lists (order included)."""
    try:
        want = source.labels(split)
    except FormatError as e:
        raise SourceDamaged(f"{split}: source label arrays unreadable: {e}") from None
    for f in LABEL_FIELDS:
        if f in ("shard", "pos"):
            continue
        if not np.array_equal(getattr(want, f), getattr(got, f)):
            raise SourceDamaged(f"{split}: source records differ from its labels.npz ({f}); run packer verify")
