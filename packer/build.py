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
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer import __version__
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
    atomic_write_bytes,
    dumps_json,
    sha256_file,
    shard_name,
    write_manifest,
)
from packer.sample import ProcessOptions, SampleResult, process_candidate
from packer.sources.base import Candidate, Problem
from packer.sources.detect import Source, detect_source
from packer.writers import get_writer

STATE_DIR = ".packer-state"
PARTS_DIR = "parts"  # multi-machine packing: <out>/parts/part-IIIII-of-NNNNN/
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_MIN_SHARDS = 8  # so several ranks x workers can each own whole shards
CHUNK = 4  # candidates per task sent to a worker: amortizes IPC without hurting order


class BuildError(Exception):
    """A build that cannot start or must not finish (user-facing message)."""


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


# ------------------------------------------------------------------------- the state


class _State:
    """Resume journal in `<out>/.packer-state/`: finished shards and their labels/problems."""

    def __init__(self, out: Path, opts: BuildOptions, source: Source, part: dict[str, Any] | None = None):
        self.dir = out / STATE_DIR
        self.path = self.dir / "state.json"
        digest = opts.digest()
        if part is not None:  # a part's journal must not be adopted by another part selection
            digest = hashlib.sha256(json.dumps([digest, part], sort_keys=True).encode()).hexdigest()[:16]
        self.data: dict[str, Any] = {
            "options": asdict(opts),
            "digest": digest,
            "source": str(source.root),
            "packer_version": __version__,
            "splits": {},
        }

    def load_compatible(self) -> bool:
        """Adopt an existing journal if it was written with the same options and source."""
        if not self.path.is_file():
            return False
        old = json.loads(self.path.read_text())
        if old.get("digest") != self.data["digest"] or old.get("source") != self.data["source"]:
            raise BuildError(
                "cannot --resume: the unfinished build in this folder used other options or another "
                "source; rerun with the same options, or use --overwrite to start again"
            )
        self.data = old
        return True

    def shards(self, split: str) -> list[dict[str, Any]]:
        return self.data["splits"].setdefault(split, [])

    def piece(self, split: str, i: int, ext: str) -> Path:
        return self.dir / f"{split}-{i:05d}.{ext}"

    def add_shard(self, split: str, entry: dict[str, Any], labels: LabelArrays, problems: list[dict]) -> None:
        i = entry["number"]
        labels.save(self.piece(split, i, "npz"))
        atomic_write_bytes(self.piece(split, i, "json"), dumps_json(problems))
        self.shards(split).append(entry)
        self.save()

    def save(self) -> None:
        atomic_write_bytes(self.path, dumps_json(self.data))


# ------------------------------------------------------------------------ the report


class Tally:
    """Counts images/boxes per named reason for one split; reconciles by construction."""

    def __init__(self) -> None:
        self.images_found = self.images_packed = 0
        self.boxes_found = self.boxes_packed = 0
        self.by_kind: dict[str, Counter] = {k: Counter() for k in ("image", "box", "fix", "warning")}

    def add(self, res: SampleResult) -> list[Problem]:
        self.images_found += 1
        self.boxes_found += res.boxes_found
        if res.record is not None:
            self.images_packed += 1
            self.boxes_packed += len(res.record.cls)
        for p in res.problems:
            self.by_kind[p.kind][p.reason] += p.count
        return res.problems

    def merge(self, d: dict[str, Any]) -> None:
        """Add another tally's `as_dict()` (journaled shards, other splits)."""
        self.images_found += d["images"]["found"]
        self.images_packed += d["images"]["packed"]
        self.boxes_found += d["boxes"]["found"]
        self.boxes_packed += d["boxes"]["packed"]
        self.by_kind["image"].update(d["images"]["skipped"])
        self.by_kind["box"].update(d["boxes"]["dropped"])
        self.by_kind["fix"].update(d["fixes"])
        self.by_kind["warning"].update(d["warnings"])

    def as_dict(self) -> dict[str, Any]:
        d = {
            "images": {"found": self.images_found, "packed": self.images_packed,
                       "skipped": dict(sorted(self.by_kind["image"].items()))},
            "boxes": {"found": self.boxes_found, "packed": self.boxes_packed,
                      "dropped": dict(sorted(self.by_kind["box"].items()))},
            "fixes": dict(sorted(self.by_kind["fix"].items())),
            "warnings": dict(sorted(self.by_kind["warning"].items())),
        }
        skipped, dropped = sum(self.by_kind["image"].values()), sum(self.by_kind["box"].values())
        if self.images_found != self.images_packed + skipped or self.boxes_found != self.boxes_packed + dropped:
            # an internal bug, not bad input: every problem path must count what it loses
            raise AssertionError(f"report does not reconcile: {d}")
        return d


def _problem_dict(split: str, p: Problem) -> dict[str, Any]:
    return {"split": split, "kind": p.kind, "reason": p.reason, "source": p.source,
            "detail": p.detail, "count": p.count}


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
    depend on it. `resume` keeps shards an interrupted build finished (checksums checked);
    `overwrite` replaces a previous packed dataset in `out`. With `strict`, any problem in
    the input fails the build (StrictFailure) after writing report.json, and no manifest
    is written. `on_shard` is called after every finished shard (progress hooks, tests).

    Multi-machine packing: with `num_parts` N and `part` I (0-based), only part I of each
    split (a contiguous range of the shuffled candidate order, so the parts in order are
    the single-machine order) is packed, into `out/parts/part-IIIII-of-NNNNN/`; run every
    part (any machine, any order, same options), then `packer.parts.merge_parts(out)`.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise BuildError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if size < 32 or not 1 <= quality <= 100:
        raise BuildError("--size must be >= 32 and --quality within 1..100")
    if shard_size is not None and shard_size < 1:
        raise BuildError("--shard-size must be >= 1")
    if overwrite and resume:
        raise BuildError("--overwrite and --resume exclude each other")
    opts = BuildOptions(fmt, size, quality, shard_size, shard_bytes, max(1, min_shards), shuffle, seed,
                        tuple(splits) if splits else None, keep_crowd, upscale)
    from packer import parts as _parts

    _parts.check_part_args(num_parts, part)
    source = detect_source(src, splits)
    out = Path(out).resolve()
    part_info: dict[str, Any] | None = None
    notes = list(source.notes)
    if part is not None:
        dest = out
        out = _parts.prepare_part_dest(dest, source.root, num_parts, part, overwrite=overwrite)
        part_info = {"num_parts": num_parts, "part": part, "splits": {}}
        notes.append(f"part {part} of {num_parts} (0-based) in {out}; when all parts are done: packer merge {dest}")
    prepare_out(out, source.root, overwrite=overwrite, resume=resume)

    state = _State(out, opts, source, {"num_parts": num_parts, "part": part} if part_info else None)
    resumed = state.load_compatible() if resume else False
    remove_temp_files(out)
    if not resumed:
        shutil.rmtree(state.dir, ignore_errors=True)
        state.dir.mkdir(parents=True)
        state.save()

    popts = ProcessOptions(size=size, quality=quality, nc=len(source.names), keep_crowd=keep_crowd, upscale=upscale)
    workers = max(1, workers or os.cpu_count() or 1)
    total = sum(len(c) for c in source.splits.values())
    bar = _progress_bar(total, progress)
    pool = (
        cf.ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker)
        if workers > 1 else None
    )
    splits_info: dict[str, SplitInfo] = {}
    resumed_shards = 0
    input_bytes = 0
    try:
        for split, cands in source.splits.items():
            order = _order(len(cands), shuffle, seed, split)
            cands = [cands[i] for i in order]
            if part_info is not None:
                a, b = _parts.part_range(len(cands), part, num_parts)
                part_info["splits"][split] = {"start": a, "end": b, "total": len(cands),
                                              "sources_sha256": _parts.sources_digest(source.splits[split])}
                cands = cands[a:b]
            input_bytes += sum(_size(c.path) for c in cands)
            kept = _kept_shards(state, split, out, bar)
            resumed_shards += len(kept)
            _pack_split(split, cands, kept, opts, popts, out, state, workers, pool, bar, on_shard,
                        num_parts if part_info else 1)
            splits_info[split] = _finish_split(split, state, out, len(source.names))
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
    if pool is not None:
        pool.shutdown()
    bar.close()

    report, problems = _write_report(out, source, state)
    if strict and problems:
        lines = [f"{p['split']}/{p['source']}: {p['kind']} {p['reason']} {p['detail']}".rstrip() for p in problems]
        raise StrictFailure(f"--strict: {len(problems)} problem(s) in the input (see {out / REPORT_NAME})", lines)

    manifest = Manifest(
        format=fmt, size=size, names=list(source.names),
        source={"path": str(source.root), "layout": source.layout},
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        packer_version=__version__, splits=splits_info,
    )
    if part_info is not None:
        manifest.options[_parts.PART_OPTION] = part_info
    write_manifest(out, manifest)  # last: its presence means "complete"
    shutil.rmtree(state.dir, ignore_errors=True)
    output_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BuildResult(out, manifest, report, time.perf_counter() - t0, input_bytes, output_bytes,
                       resumed_shards, notes)


def prepare_out(out: Path, src_root: Path, *, overwrite: bool, resume: bool) -> None:
    if out == src_root or src_root.is_relative_to(out):
        raise BuildError(f"output folder {out} contains the source {src_root}; choose another -o")
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise BuildError(f"output path {out} exists and is not a folder")
    entries = [p for p in out.iterdir()]
    if not entries:
        return
    ours = (out / MANIFEST_NAME).exists() or (out / STATE_DIR).exists()
    if resume:
        if (out / MANIFEST_NAME).exists():
            raise BuildError(f"{out} already holds a complete packed dataset; nothing to resume (--overwrite to rebuild)")
        if not (out / STATE_DIR).exists():
            raise BuildError(f"{out} holds no unfinished build to resume")
        return
    if not ours:
        raise BuildError(f"output folder {out} is not empty and is not a packed dataset; choose another -o")
    if not overwrite:
        what = "a packed dataset" if (out / MANIFEST_NAME).exists() else "an unfinished build"
        raise BuildError(f"{out} already holds {what}; pass --overwrite to replace it or --resume to continue")
    # the manifest goes first so the folder stops looking complete at once
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for p in entries:
        if p.name == MANIFEST_NAME:
            continue
        if p.is_dir() and (p.name in (STATE_DIR, PARTS_DIR) or (p / LABELS_NAME).exists() or _looks_like_split(p)):
            shutil.rmtree(p)
        elif p.name == REPORT_NAME:
            p.unlink()


def remove_temp_files(out: Path) -> None:
    """Temp files of a killed build (ours are always hidden `.<name>.*.tmp`)."""
    for d in [out, *(p for p in out.iterdir() if p.is_dir() and p.name != STATE_DIR)]:
        for p in d.glob(".*.tmp*"):
            p.unlink(missing_ok=True)


def _looks_like_split(p: Path) -> bool:
    return any(q.suffix in (".tfrecord", ".tar", ".idx", ".lmdb") for q in p.iterdir())


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


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="packing", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _kept_shards(state: _State, split: str, out: Path, bar) -> list[dict[str, Any]]:
    """Journaled shards still intact on disk (a shard that fails its checksum is redone, with its successors)."""
    kept: list[dict[str, Any]] = []
    for entry in state.shards(split):
        p = out / entry["info"]["path"]
        idx = entry["info"]["index"]
        ok = (p.is_file() and p.stat().st_size == entry["info"]["bytes"] and sha256_file(p) == entry["info"]["sha256"]
              and (idx is None or (out / idx).is_file()))
        if not ok:
            break
        kept.append(entry)
        bar.update(entry["end"] - entry["start"])
    state.data["splits"][split] = kept
    state.save()
    return kept


def _pack_split(
    split: str, cands: list[Candidate], kept: list[dict[str, Any]], opts: BuildOptions,
    popts: ProcessOptions, out: Path, state: _State, workers: int, pool: cf.Executor | None, bar,
    on_shard: Callable[[str, ShardInfo], None] | None, num_parts: int = 1,
) -> None:
    start = kept[-1]["end"] if kept else 0
    number = len(kept)
    if start >= len(cands) and kept:
        return
    # a part makes its share of --min-shards, so the merged split still has at least that many
    cap = opts.shard_size or max(1, math.ceil(len(cands) / math.ceil(opts.min_shards / num_parts)))
    if opts.fmt == "lmdb":
        cap, number, start = None, 0, 0  # one environment per split: resumable per split only
    (out / split).mkdir(parents=True, exist_ok=True)

    writer = None
    approx_bytes = 0  # shard bytes estimated from the records: deterministic, writer-agnostic
    rows: list[tuple] = []
    problems: list[dict[str, Any]] = []
    tally = Tally()
    shard_start = start

    def finish(end: int) -> None:
        nonlocal writer, rows, problems, tally, number, shard_start, approx_bytes
        info = None
        if writer is not None:
            w = writer.close()
            info = ShardInfo(
                path=w.path.relative_to(out).as_posix(), num_samples=w.num_samples, bytes=w.bytes,
                sha256=w.sha256, index=w.index.relative_to(out).as_posix() if w.index else None,
            )
        entry = {"number": number, "start": shard_start, "end": end, "info": asdict(info) if info else None,
                 "tally": tally.as_dict()}
        state.add_shard(split, entry, LabelArrays.from_records(rows), problems)
        if info is not None and on_shard is not None:
            on_shard(split, info)
        number += info is not None
        writer, rows, problems, tally, shard_start, approx_bytes = None, [], [], Tally(), end, 0

    try:
        for i, res in enumerate(ordered_map(cands[start:], popts, workers, pool), start):
            problems.extend(_problem_dict(split, p) for p in tally.add(res))
            if res.record is not None:
                if writer is None:
                    writer = get_writer(opts.fmt, out / split / shard_name(split, number, opts.fmt))
                rec = res.record
                writer.add(rec)
                rows.append((label_only(rec), number, len(rows)))  # pos = position in the shard
                approx_bytes += len(rec.jpeg) + 20 * len(rec.cls) + 512
                full = (cap is not None and len(rows) >= cap) or (
                    cap is not None and bool(opts.shard_bytes) and approx_bytes >= opts.shard_bytes
                )
                if full:
                    finish(i + 1)
            bar.update(1)
        if writer is not None or rows or problems or shard_start < len(cands) or not state.shards(split):
            finish(len(cands))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def label_only(rec: Record) -> Record:
    """Drop the JPEG bytes: label pieces keep only what labels.npz needs."""
    return Record(rec.key, rec.source, b"", rec.height, rec.width, rec.orig_height, rec.orig_width, rec.cls, rec.boxes)


def _finish_split(split: str, state: _State, out: Path, nc: int) -> SplitInfo:
    entries = state.shards(split)
    pieces = [LabelArrays.load(state.piece(split, e["number"], "npz")) for e in entries]
    labels = LabelArrays.concat(pieces)
    # journal entries without a shard (a tail of skipped images) add no samples, so shard ids stay aligned
    labels.save(out / split / LABELS_NAME)
    shards = [ShardInfo(**e["info"]) for e in entries if e["info"]]
    counts = np.bincount(labels.cls, minlength=nc)[:nc] if len(labels.cls) else np.zeros(nc, dtype=np.int64)
    return SplitInfo(
        num_samples=len(labels), num_boxes=int(len(labels.cls)), class_counts=[int(c) for c in counts],
        labels=f"{split}/{LABELS_NAME}", shards=shards,
    )


def _write_report(out: Path, source: Source, state: _State) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    totals = Tally()
    per_split: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
    for split in source.splits:
        t = Tally()
        for e in state.shards(split):
            t.merge(e["tally"])
            problems.extend(json.loads(state.piece(split, e["number"], "json").read_text()))
        per_split[split] = t.as_dict()
        totals.merge(per_split[split])
    report = {
        "source": {"path": str(source.root), "layout": source.layout},
        "notes": list(source.notes),
        "totals": totals.as_dict(),
        "splits": per_split,
        "problems": problems,
    }
    atomic_write_bytes(out / REPORT_NAME, dumps_json(report))
    return report, problems
