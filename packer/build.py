"""`packer build`: source folder -> shards + index files + label arrays + report + manifest.

Order of events, chosen so that an interrupted build never looks complete:
1. detect the source and its candidates (one per image found);
2. per split, process candidates in parallel but consume results in candidate order
   (ordered, bounded window: memory does not grow with the dataset, and the output is
   byte-identical whatever the number of workers);
3. roll shards by sample count / bytes, journaling each finished shard (packer/journal.py)
   so `--resume` can keep it; the output folder rules are packer/output.py;
4. write labels.npz per split and report.json, then manifest.json last, atomically.

With `num_parts`/`part`, step 2 packs only the part's range of each split (packer/parts.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer import __version__, parts
from packer.errors import DATA
from packer.format import (
    FORMATS,
    MANIFEST_NAME,
    REPORT_NAME,
    LabelArrays,
    Manifest,
    ShardInfo,
    SplitInfo,
    check_split_name,
    write_manifest,
)
from packer.images import CHROMA_CHOICES, DEFAULT_MAX_PIXELS
from packer.journal import BuildJournal, ShardRoller, write_report
from packer.output import BuildError, OutputFolder, manifest_files, output_folder
from packer.pool import ordered_map, refuse_script_reimport, start_pool
from packer.progress import progress_bar
from packer.sample import ProcessOptions
from packer.sources.base import Candidate, safe_text
from packer.sources.detect import Source, detect_source

__all__ = ["BuildError", "BuildOptions", "BuildResult", "StrictFailure", "build_dataset"]

DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_MIN_SHARDS = 8  # so several ranks x workers can each own whole shards


class StrictFailure(BuildError):
    """--strict and the input had problems; `problems` lists them (exit 1)."""

    exit_code = DATA

    def __init__(self, message: str, problems: list[dict[str, Any]]):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class BuildOptions:
    """Everything that determines the bytes of the output (workers does not)."""

    fmt: str = "tfrecord"
    size: int = 704
    quality: int = 95
    shard_size: int | None = None
    shard_bytes: int | None = DEFAULT_SHARD_BYTES
    min_shards: int = DEFAULT_MIN_SHARDS
    shuffle: bool = True
    seed: int = 0
    splits: tuple[str, ...] | None = None
    keep_crowd: bool = False
    upscale: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False
    chroma: str = "auto"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise BuildError(f"unknown format {self.fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.size < 32 or not 1 <= self.quality <= 100:
            raise BuildError("--size must be >= 32 and --quality within 1..100")
        if self.chroma not in CHROMA_CHOICES:
            raise BuildError(f"--chroma must be one of {', '.join(CHROMA_CHOICES)}")
        if (self.shard_size is not None and self.shard_size < 1) or self.max_pixels < 1:
            raise BuildError("--shard-size and --max-pixels must be >= 1")
        if not 0 <= self.seed < 2**63:
            raise BuildError("--seed must be an integer in [0, 2**63)")
        for name in self.splits or ():
            check_split_name(name)

    def digest(self, part: dict[str, int] | None = None) -> str:
        """Options digest; with `part`, a part's journal is never adopted by another part selection."""
        key = asdict(self) if part is None else [asdict(self), part]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any]
    elapsed: float
    input_bytes: int
    output_bytes: int
    resumed_shards: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The figures a person or a pipeline wants after a build (what --json prints)."""
        t = self.report["totals"]
        packed = t["images"]["packed"]
        return {
            "out": str(self.out),
            "format": self.manifest.format,
            "layout": self.manifest.source["layout"],
            "splits": {k: v.num_samples for k, v in self.manifest.splits.items()},
            "images": t["images"],
            "boxes": t["boxes"],
            "fixes": t["fixes"],
            "warnings": t["warnings"],
            "shards": sum(len(s.shards) for s in self.manifest.splits.values()),
            "resumed_shards": self.resumed_shards,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "elapsed_s": round(self.elapsed, 3),
            "img_per_s": round(packed / self.elapsed, 1) if self.elapsed > 0 else None,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------- the build


def build_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike = "shards",
    *,
    fmt: str = "tfrecord",
    size: int = 704,
    quality: int = 95,
    shard_size: int | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    min_shards: int = DEFAULT_MIN_SHARDS,
    workers: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    splits: Sequence[str] | None = None,
    keep_crowd: bool = False,
    upscale: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    follow_symlinks: bool = False,
    chroma: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    progress: bool = False,
    on_shard: Callable[[str, ShardInfo], None] | None = None,
    num_parts: int = 1,
    part: int | None = None,
) -> BuildResult:
    """Pack a COCO or YOLO folder `src` into `out` (layout: packer.format; options: README).

    Output bytes do not depend on `workers`. `resume` keeps finished shards (refused if the
    source changed); `overwrite` replaces only what packer wrote; `strict` fails on any input
    problem after writing report.json; `on_shard` runs after every finished shard. `num_parts`
    N with `part` I packs part I of each split into `out/parts/` for `parts.merge_parts(out)`.
    """
    refuse_script_reimport()
    t0 = time.perf_counter()
    splits = [splits] if isinstance(splits, str) else splits  # one split name, not its letters
    if overwrite and resume:
        raise BuildError("--overwrite and --resume exclude each other")
    opts = BuildOptions(fmt, size, quality, shard_size, shard_bytes, max(1, min_shards), shuffle, seed,
                        tuple(splits) if splits else None, keep_crowd, upscale, max_pixels, follow_symlinks, chroma)
    parts.check_part_args(num_parts, part)
    source = detect_source(src, splits, follow_symlinks=follow_symlinks)
    out, part_info, notes = _part_setup(Path(out).resolve(), source, num_parts, part, overwrite)
    with output_folder(out, source=source.root, hint="free some space (or choose another -o), "
                       "then rerun with --resume") as folder:
        folder.prepare(overwrite=overwrite, resume=resume, splits=source.splits)
        notes += folder.notes
        digest = opts.digest({"num_parts": num_parts, "part": part} if part_info else None)
        journal = BuildJournal(folder, asdict(opts), digest, source)
        journal.resume() if resume else journal.start()
        popts = ProcessOptions(size=size, quality=quality, nc=len(source.names), keep_crowd=keep_crowd,
                               upscale=upscale, max_pixels=max_pixels, chroma=chroma)
        run = _Run(opts, popts, out, folder, journal, max(1, workers or os.cpu_count() or 1), on_shard,
                   num_parts if part_info else 1)
        manifest, report, resumed_shards, input_bytes = _pack_into(run, source, part_info, progress, strict)
    output_bytes = sum(out.joinpath(p).stat().st_size for p in [*manifest_files(manifest), REPORT_NAME, MANIFEST_NAME])
    return BuildResult(out, manifest, report, time.perf_counter() - t0, input_bytes, output_bytes,
                       resumed_shards, [*source.notes, *notes])


def _pack_into(run: _Run, source: Source, part_info: dict[str, Any] | None, progress: bool,
               strict: bool) -> tuple[Manifest, dict[str, Any], int, int]:
    """Pack, report, manifest last: (manifest, report, shards kept from the journal, input bytes)."""
    splits_info, resumed, input_bytes = _pack_all(run, source, part_info, progress)
    run.folder.claim(REPORT_NAME)
    report, problems = write_report(run.out, source, run.journal)
    # crowd boxes are dropped by choice (as ultralytics does; --keep-crowd keeps them), not damage:
    # with them counted, stock COCO could never pass --strict
    problems = [p for p in problems if (p["kind"], p["reason"]) != ("box", "crowd")]
    if strict and problems:
        lines = [f"{p['split']}: {p['source']}: {p['kind']} {p['reason']} {p['detail']}".rstrip() for p in problems]
        raise StrictFailure(f"--strict: {len(problems)} problem(s) in the input (see {run.out / REPORT_NAME}); "
                            "fix them, then rerun with --overwrite", lines)
    manifest = _manifest(run.opts, source, splits_info, part_info)
    run.folder.claim(MANIFEST_NAME)
    write_manifest(run.out, manifest)  # last: its presence means "complete"
    run.folder.finish()
    return manifest, report, resumed, input_bytes


def _part_setup(out: Path, source: Source, num_parts: int, part: int | None,
                overwrite: bool) -> tuple[Path, dict[str, Any] | None, list[str]]:
    """(folder to pack into, the part selection or None, notes) for a part of a multi-machine build;
    the split names are checked first (they become folder names in it)."""
    for name in source.splits:
        check_split_name(name)
    if part is None:
        return out, None, []
    folder = parts.prepare_part_dest(out, source.root, num_parts, part, overwrite=overwrite)
    note = f"part {part} of {num_parts} (0-based) in {folder}; when all parts are done: packer merge {out}"
    return folder, {"num_parts": num_parts, "part": part, "splits": {}}, [note]


def _manifest(opts: BuildOptions, source: Source, splits_info: dict[str, SplitInfo],
              part_info: dict[str, Any] | None) -> Manifest:
    manifest = Manifest(
        format=opts.fmt, size=opts.size, names=list(source.names),
        source={"path": safe_text(str(source.root)), "layout": source.layout},
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        packer_version=__version__, splits=splits_info,
    )
    if part_info is not None:
        manifest.options[parts.PART_OPTION] = part_info
    return manifest


@dataclass
class _Run:
    """What every split of one build shares."""

    opts: BuildOptions
    popts: ProcessOptions
    out: Path
    folder: OutputFolder
    journal: BuildJournal
    workers: int
    on_shard: Callable[[str, ShardInfo], None] | None
    num_parts: int = 1
    pool: cf.Executor | None = None
    bar: Any = None


def _pack_all(run: _Run, source: Source, part_info: dict[str, Any] | None,
              progress: bool) -> tuple[dict[str, SplitInfo], int, int]:
    """Pack every split in turn: (split infos, shards kept from the journal, input bytes)."""
    run.bar = progress_bar(sum(len(c) for c in source.splits.values()), "packing", "img", enabled=progress,
                           smoothing=0.1)
    if run.workers > 1:
        run.pool = start_pool(run.workers)
    splits_info: dict[str, SplitInfo] = {}
    resumed = input_bytes = 0
    try:
        for split, cands in source.splits.items():
            cands = [cands[i] for i in _order(len(cands), run.opts.shuffle, run.opts.seed, split)]
            if part_info is not None:
                a, b = parts.part_range(len(cands), part_info["part"], part_info["num_parts"])
                part_info["splits"][split] = {"start": a, "end": b, "total": len(cands),
                                              "sources_sha256": parts.sources_digest(source.splits[split])}
                cands = cands[a:b]
            input_bytes += sum(_size(c.path) for c in cands)
            kept = run.journal.kept_shards(split, run.out, run.bar.update)
            resumed += len(kept)
            _pack_split(run, split, cands, kept)
            splits_info[split] = _finish_split(run, split, len(source.names))
    except BaseException:
        if run.pool is not None:
            run.pool.shutdown(wait=False, cancel_futures=True)
        run.bar.close()
        raise
    if run.pool is not None:
        run.pool.shutdown()
    run.bar.close()
    return splits_info, resumed, input_bytes


def _order(n: int, shuffle: bool, seed: int, split: str) -> list[int]:
    """Pack-time shuffle (streaming readers only shuffle within a buffer); per-split stream."""
    if not shuffle:
        return list(range(n))
    salt = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, salt]).permutation(n).tolist()


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:  # vanished since discovery: counted as missing_image by the worker
        return 0




def _pack_split(run: _Run, split: str, cands: list[Candidate], kept: list[dict[str, Any]]) -> None:
    opts = run.opts
    start = kept[-1]["end"] if kept else 0
    if start >= len(cands) and kept:
        return
    # a part makes its share of --min-shards, so the merged split still has at least that many;
    # without --shard-size the candidates are spread evenly over them (12 images: 8 shards, not 6 of 2)
    cap, spread = opts.shard_size, None
    if cap is None:
        cap, spread = len(cands), (len(cands), math.ceil(opts.min_shards / run.num_parts))
    number = len(kept)
    if opts.fmt == "lmdb":
        cap, spread, number, start = None, None, 0, 0  # one environment per split: resumable per split only
    (run.out / split).mkdir(parents=True, exist_ok=True)
    roll = ShardRoller(run.journal, split, opts.fmt, number, start, cap, opts.shard_bytes, run.on_shard, spread)
    try:
        for i, res in enumerate(ordered_map(cands[start:], run.popts, run.workers, run.pool), start):
            roll.add(i, res)
            run.bar.update(1)
        if roll.writer is not None or roll.rows or roll.problems or roll.start < len(cands) or not run.journal.shards(split):
            roll.finish(len(cands))
    except BaseException:
        roll.abort()
        raise


def _finish_split(run: _Run, split: str, nc: int) -> SplitInfo:
    entries = run.journal.shards(split)
    # journal entries without a shard (a tail of skipped images) add no samples, so shard ids stay aligned
    labels = LabelArrays.concat([run.journal.load_piece(split, e["number"], "npz") for e in entries])
    run.folder.save_labels(split, labels)
    shards = [ShardInfo(**e["info"]) for e in entries if e["info"]]
    return SplitInfo.of(split, labels, nc, shards)
