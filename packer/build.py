"""`packer build`: source folder -> shards + index files + label arrays + report + manifest.

Order of events, chosen so that an interrupted build never looks complete:
1. detect the source and its candidates (one per image found);
2. per split, process candidates in parallel but consume results in candidate order
   (ordered, bounded window: memory does not grow with the dataset, and the output is
   byte-identical whatever the number of workers);
3. roll shards by sample count / bytes; after each finished shard, journal it in
   `.packer-state/` (shard checksum, candidate range, its labels and problems) so
   `--resume` can keep it;
4. write labels.npz per split and report.json, then manifest.json last, atomically.

With `num_parts`/`part`, step 2 packs only the part's contiguous range of each split's
shuffled candidate order, into `<out>/parts/part-IIIII-of-NNNNN/` (a complete packed folder
of its own); `packer.parts.merge_parts` later joins the parts (see packer/parts.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer import __version__, parts
from packer.format import (
    FORMATS,
    LABELS_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    LabelArrays,
    Manifest,
    Record,
    ShardInfo,
    SplitInfo,
    check_split_name,
    sha256_file,
    shard_name,
    write_manifest,
)
from packer.journal import BuildJournal, Tally, problem_dict, write_report
from packer.output import BuildError, OutputFolder, output_folder
from packer.sample import ProcessOptions, SampleResult, process_candidate
from packer.sources.base import Candidate
from packer.sources.detect import Source, detect_source
from packer.writers import get_writer

__all__ = ["BuildError", "BuildOptions", "BuildResult", "StrictFailure", "Tally", "build_dataset", "label_only"]

DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_MIN_SHARDS = 8  # so several ranks x workers can each own whole shards
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb warning limit, which ultralytics users live with
CHUNK = 4  # candidates per task sent to a worker: amortizes IPC without hurting order


class StrictFailure(BuildError):
    """--strict and the input had problems; `problems` lists them."""

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

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------- parallel map


def _process_chunk(chunk: list[Candidate], opts: ProcessOptions) -> list[SampleResult]:
    return [process_candidate(c, opts) for c in chunk]


def _init_worker() -> None:
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


def _mp_context() -> mp.context.BaseContext:
    """forkserver with the image stack preloaded: workers start in milliseconds (spawn costs
    ~0.5 s each re-importing OpenCV) and, unlike plain fork, it is safe when the caller
    already runs threads (torch, TensorFlow, a web server). PACKER_START_METHOD overrides."""
    ctx = mp.get_context(os.environ.get("PACKER_START_METHOD", "forkserver"))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["packer.sample", "packer.images"])
    return ctx


def ordered_map(
    items: Sequence[Candidate], opts: ProcessOptions, workers: int, pool: cf.Executor | None
) -> Iterator[SampleResult]:
    """process_candidate over `items`, results in input order, at most ~4 chunks per worker in flight."""
    if pool is None or workers <= 1:
        for c in items:
            yield process_candidate(c, opts)
        return
    chunks = [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
    window = max(2, workers * 4)
    pending: list[cf.Future] = []
    it = iter(chunks)
    try:
        for chunk in it:
            pending.append(pool.submit(_process_chunk, chunk, opts))
            if len(pending) >= window:
                break
        while pending:
            done = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_process_chunk, nxt, opts))
            yield from done.result()
    finally:
        for f in pending:
            f.cancel()




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
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    progress: bool = False,
    on_shard: Callable[[str, ShardInfo], None] | None = None,
    num_parts: int = 1,
    part: int | None = None,
) -> BuildResult:
    """Pack a COCO or YOLO folder `src` into `out` (see packer.format for the layout).

    `workers` processes decode/resize/encode (default: all cores); the output bytes do not
    depend on it. `resume` keeps shards an interrupted build finished (checksums checked;
    refused if the source changed); `overwrite` replaces what packer wrote in `out` (see
    packer.output). With `strict`, any problem in the input fails the build (StrictFailure)
    after writing report.json, and no manifest is written. Images above `max_pixels` are
    skipped unread; `follow_symlinks` packs symlinks that lead outside `src`. `on_shard`
    is called after every finished shard (progress hooks, tests).

    Multi-machine packing: with `num_parts` N and `part` I (0-based), only part I of each
    split (a contiguous range of the shuffled candidate order, so the parts in order are
    the single-machine order) is packed, into `out/parts/part-IIIII-of-NNNNN/`; run every
    part (any machine, any order, same options), then `packer.parts.merge_parts(out)`.
    """
    t0 = time.perf_counter()
    opts = _options(fmt, size, quality, shard_size, shard_bytes, min_shards, shuffle, seed, splits, keep_crowd,
                    upscale, max_pixels, follow_symlinks, overwrite, resume)
    parts.check_part_args(num_parts, part)
    source = detect_source(src, splits, follow_symlinks=follow_symlinks)
    for name in source.splits:
        check_split_name(name)
    out = Path(out).resolve()
    notes = list(source.notes)
    part_info: dict[str, Any] | None = None
    if part is not None:
        dest, out = out, parts.prepare_part_dest(out, source.root, num_parts, part, overwrite=overwrite)
        part_info = {"num_parts": num_parts, "part": part, "splits": {}}
        notes.append(f"part {part} of {num_parts} (0-based) in {out}; when all parts are done: packer merge {dest}")
    hint = "free some space (or choose another -o), then rerun with --resume"
    with output_folder(out, source=source.root, hint=hint) as folder:
        folder.prepare(overwrite=overwrite, resume=resume)
        notes += folder.notes
        digest = opts.digest()
        if part_info is not None:  # a part's journal must not be adopted by another part selection
            sel = {"num_parts": num_parts, "part": part}
            digest = hashlib.sha256(json.dumps([digest, sel], sort_keys=True).encode()).hexdigest()[:16]
        journal = BuildJournal(folder, asdict(opts), digest, source)
        journal.resume() if resume else journal.start()
        run = _Run(opts, _process_options(opts, source), out, folder, journal, max(1, workers or os.cpu_count() or 1),
                   on_shard, num_parts if part_info else 1)
        splits_info, resumed_shards, input_bytes = _pack_all(run, source, part_info, progress)
        folder.claim(REPORT_NAME)
        report, problems = write_report(out, source, journal)
        if strict and problems:
            lines = [f"{p['split']}/{p['source']}: {p['kind']} {p['reason']} {p['detail']}".rstrip() for p in problems]
            raise StrictFailure(f"--strict: {len(problems)} problem(s) in the input (see {out / REPORT_NAME})", lines)
        manifest = _manifest(opts, source, splits_info, part_info)
        folder.claim(MANIFEST_NAME)
        write_manifest(out, manifest)  # last: its presence means "complete"
        folder.finish()
    output_bytes = sum(out.joinpath(p).stat().st_size for p in _listed(manifest))
    return BuildResult(out, manifest, report, time.perf_counter() - t0, input_bytes, output_bytes,
                       resumed_shards, notes)


def _options(fmt: str, size: int, quality: int, shard_size: int | None, shard_bytes: int | None, min_shards: int,
             shuffle: bool, seed: int, splits: Sequence[str] | None, keep_crowd: bool, upscale: bool,
             max_pixels: int, follow_symlinks: bool, overwrite: bool, resume: bool) -> BuildOptions:
    """Check the build options (BuildError, one line) and freeze them."""
    if fmt not in FORMATS:
        raise BuildError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if size < 32 or not 1 <= quality <= 100:
        raise BuildError("--size must be >= 32 and --quality within 1..100")
    if shard_size is not None and shard_size < 1:
        raise BuildError("--shard-size must be >= 1")
    if max_pixels < 1:
        raise BuildError("--max-pixels must be >= 1")
    if overwrite and resume:
        raise BuildError("--overwrite and --resume exclude each other")
    for name in splits or ():
        check_split_name(name)
    return BuildOptions(fmt, size, quality, shard_size, shard_bytes, max(1, min_shards), shuffle, seed,
                        tuple(splits) if splits else None, keep_crowd, upscale, max_pixels, follow_symlinks)


def _process_options(opts: BuildOptions, source: Source) -> ProcessOptions:
    return ProcessOptions(size=opts.size, quality=opts.quality, nc=len(source.names), keep_crowd=opts.keep_crowd,
                          upscale=opts.upscale, max_pixels=opts.max_pixels)


def _manifest(opts: BuildOptions, source: Source, splits_info: dict[str, SplitInfo],
              part_info: dict[str, Any] | None) -> Manifest:
    manifest = Manifest(
        format=opts.fmt, size=opts.size, names=list(source.names),
        source={"path": str(source.root), "layout": source.layout},
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        packer_version=__version__, splits=splits_info,
    )
    if part_info is not None:
        manifest.options[parts.PART_OPTION] = part_info
    return manifest


def _listed(m: Manifest) -> list[str]:
    from packer.output import manifest_files

    return [*manifest_files(m), REPORT_NAME, MANIFEST_NAME]


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
    run.bar = _progress_bar(sum(len(c) for c in source.splits.values()), progress)
    if run.workers > 1:
        run.pool = cf.ProcessPoolExecutor(run.workers, mp_context=_mp_context(), initializer=_init_worker)
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
            kept = _kept_shards(run, split)
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
    except OSError:
        return 0


def _progress_bar(total: int, enabled: bool):  # noqa: ANN202 - tqdm
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="packing", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _kept_shards(run: _Run, split: str) -> list[dict[str, Any]]:
    """Journaled shards still intact on disk (a shard that fails its checksum is redone, with its successors)."""
    kept: list[dict[str, Any]] = []
    for entry in run.journal.shards(split):
        info = entry["info"]
        ok = all(run.journal.piece(split, entry["number"], ext).is_file() for ext in ("npz", "json"))
        if info is not None:
            p, idx = run.out / info["path"], info["index"]
            ok = ok and (p.is_file() and p.stat().st_size == info["bytes"] and sha256_file(p) == info["sha256"]
                         and (idx is None or (run.out / idx).is_file()))
        if not ok:
            break
        kept.append(entry)
        run.bar.update(entry["end"] - entry["start"])
    run.journal.data["splits"][split] = kept
    run.journal.save()
    return kept


class _Shards:
    """Rolls one split's records into shards, journaling each finished shard."""

    def __init__(self, run: _Run, split: str, number: int, start: int, cap: int | None):
        self.run, self.split, self.number, self.cap = run, split, number, cap
        self._reset(start)

    def _reset(self, start: int) -> None:
        self.writer = None
        self.rows: list[tuple] = []
        self.problems: list[dict[str, Any]] = []
        self.tally = Tally()
        self.start, self.approx_bytes = start, 0  # bytes estimated from the records: deterministic

    def add(self, i: int, res: SampleResult) -> None:
        self.problems.extend(problem_dict(self.split, p) for p in self.tally.add(res))
        if res.record is None:
            return
        opts = self.run.opts
        if self.writer is None:
            path = self.run.out / self.split / shard_name(self.split, self.number, opts.fmt)
            rel = path.relative_to(self.run.out).as_posix()
            self.run.folder.claim(rel, *([] if opts.fmt == "lmdb" else [rel + ".idx"]))
            self.writer = get_writer(opts.fmt, path)
        self.writer.add(res.record)
        self.rows.append((label_only(res.record), self.number, len(self.rows)))  # pos = position in the shard
        self.approx_bytes += len(res.record.jpeg) + 20 * len(res.record.cls) + 512
        if self.cap is not None and (len(self.rows) >= self.cap or (
                bool(opts.shard_bytes) and self.approx_bytes >= opts.shard_bytes)):
            self.finish(i + 1)

    def finish(self, end: int) -> None:
        out, info = self.run.out, None
        if self.writer is not None:
            w = self.writer.close()
            info = ShardInfo(path=w.path.relative_to(out).as_posix(), num_samples=w.num_samples, bytes=w.bytes,
                             sha256=w.sha256, index=w.index.relative_to(out).as_posix() if w.index else None)
        entry = {"number": self.number, "start": self.start, "end": end, "info": asdict(info) if info else None,
                 "tally": self.tally.as_dict()}
        self.run.journal.add_shard(self.split, entry, LabelArrays.from_records(self.rows), self.problems)
        if info is not None and self.run.on_shard is not None:
            self.run.on_shard(self.split, info)
        self.number += info is not None
        self._reset(end)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _pack_split(run: _Run, split: str, cands: list[Candidate], kept: list[dict[str, Any]]) -> None:
    opts = run.opts
    start = kept[-1]["end"] if kept else 0
    if start >= len(cands) and kept:
        return
    # a part makes its share of --min-shards, so the merged split still has at least that many
    cap = opts.shard_size or max(1, math.ceil(len(cands) / math.ceil(opts.min_shards / run.num_parts)))
    number = len(kept)
    if opts.fmt == "lmdb":
        cap, number, start = None, 0, 0  # one environment per split: resumable per split only
    (run.out / split).mkdir(parents=True, exist_ok=True)
    roll = _Shards(run, split, number, start, cap)
    try:
        for i, res in enumerate(ordered_map(cands[start:], run.popts, run.workers, run.pool), start):
            roll.add(i, res)
            run.bar.update(1)
        if roll.writer is not None or roll.rows or roll.problems or roll.start < len(cands) or not run.journal.shards(split):
            roll.finish(len(cands))
    except BaseException:
        roll.abort()
        raise


def label_only(rec: Record) -> Record:
    """Drop the JPEG bytes: label pieces keep only what labels.npz needs."""
    return Record(rec.key, rec.source, b"", rec.height, rec.width, rec.orig_height, rec.orig_width, rec.cls, rec.boxes)


def _finish_split(run: _Run, split: str, nc: int) -> SplitInfo:
    entries = run.journal.shards(split)
    labels = LabelArrays.concat([run.journal.load_piece(split, e["number"], "npz") for e in entries])
    # journal entries without a shard (a tail of skipped images) add no samples, so shard ids stay aligned
    run.folder.claim(f"{split}/{LABELS_NAME}")
    labels.save(run.out / split / LABELS_NAME)
    shards = [ShardInfo(**e["info"]) for e in entries if e["info"]]
    counts = np.bincount(labels.cls, minlength=nc)[:nc] if len(labels.cls) else np.zeros(nc, dtype=np.int64)
    return SplitInfo(
        num_samples=len(labels), num_boxes=int(len(labels.cls)), class_counts=[int(c) for c in counts],
        labels=f"{split}/{LABELS_NAME}", shards=shards,
    )
