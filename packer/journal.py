"""The resume journal of `packer build` and the report built from it.

`<out>/.packer-state/` holds, while a build runs:

- `state.json`: the options digest, the source folder, the source fingerprint's digest and,
  per split, every finished shard (checksum, candidate range, tally);
- `fingerprint.json`: what is being packed, written once at the start: per split the
  ordered candidate list (relative path, size and mtime of the image, size and mtime of
  its YOLO label file or a digest of its COCO annotations) and the class names;
- `<split>-NNNNN.npz` / `.json`: the labels and problems of finished shard NNNNN.

`--resume` adopts the journal only if the options, the source folder and the fingerprint
are unchanged; otherwise it names what changed (N added, M removed, K modified) and
points to `--overwrite`. A damaged journal is named in one line, never a traceback.
Everything here is stat-only: no image or label file is read to fingerprint it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from packer import __version__
from packer.format import (
    INDEX_SUFFIX,
    REPORT_NAME,
    LabelArrays,
    Record,
    ShardInfo,
    atomic_write_bytes,
    dumps_json,
    sha256_file,
    shard_name,
)
from packer.output import STATE_DIR, BuildError, OutputFolder
from packer.sample import SampleResult
from packer.sources.base import Candidate, Problem, safe_text
from packer.sources.detect import Source
from packer.writers import ShardWriter, get_writer

STATE_NAME = "state.json"
FINGERPRINT_NAME = "fingerprint.json"


class JournalError(BuildError):
    """The journal cannot be used for --resume (damaged, or another source or options)."""


# ------------------------------------------------------------------------ fingerprint


def _stat(path: str | None) -> list[int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if st else None


def candidate_signature(c: Candidate) -> list[Any]:
    """What decides this candidate's sample: image stat, label file stat or COCO annotations."""
    if c.coco_boxes is not None or c.coco_size is not None:
        ann = hashlib.sha256(json.dumps([c.coco_boxes, c.coco_size]).encode()).hexdigest()[:16]
    else:
        ann = _stat(c.label_file) if c.label_file else None
    return [_stat(c.path), ann, c.reject]


def fingerprint(source: Source) -> dict[str, Any]:
    """The ordered candidate lists of every split with their signatures, and the class names."""
    return {
        "names": list(source.names),
        "splits": {k: [[c.source, *candidate_signature(c)] for c in cands] for k, cands in source.splits.items()},
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """"3 added, 1 removed, 2 modified" (plus class names / split list changes) between fingerprints."""
    parts = []
    if old.get("names") != new["names"]:
        parts.append("class names changed")
    o = {(s, e[0]): e[1:] for s, lst in old.get("splits", {}).items() for e in lst}
    n = {(s, e[0]): e[1:] for s, lst in new["splits"].items() for e in lst}
    added, removed = len(n.keys() - o.keys()), len(o.keys() - n.keys())
    modified = sum(o[k] != n[k] for k in o.keys() & n.keys())
    if added or removed or modified:
        parts.append(f"{added} added, {removed} removed, {modified} modified")
    elif old.get("splits") != new["splits"]:
        parts.append("the image order or split list changed")
    return "; ".join(parts) or "its fingerprint differs"


# ---------------------------------------------------------------------------- journal


class BuildJournal:
    """Resume journal in `<out>/.packer-state/`: finished shards and their labels/problems."""

    def __init__(self, folder: OutputFolder, options: dict[str, Any], digest: str, source: Source):
        self.folder = folder
        self.dir = folder.root / STATE_DIR
        self.path = self.dir / STATE_NAME
        self.fingerprint = fingerprint(source)
        self.data: dict[str, Any] = {
            "options": options,
            "digest": digest,
            "source": safe_text(str(source.root)),
            "fingerprint": _digest(self.fingerprint),
            "packer_version": __version__,
            "splits": {},
        }

    def start(self) -> None:
        """A fresh journal (the folder was empty or has just been cleared)."""
        self.folder.start()
        atomic_write_bytes(self.dir / FINGERPRINT_NAME, dumps_json(self.fingerprint))
        self.save()

    def resume(self) -> None:
        """Adopt the journal on disk, or JournalError saying why it cannot be continued."""
        old = self._load()
        if old["digest"] != self.data["digest"] or old["source"] != self.data["source"]:
            raise JournalError(
                "cannot --resume: the unfinished build in this folder used other options or another "
                "source; rerun with the same options, or use --overwrite to start again"
            )
        if old.get("fingerprint") != self.data["fingerprint"]:
            try:
                before = json.loads((self.dir / FINGERPRINT_NAME).read_text())
                change = describe_change(before if isinstance(before, dict) else {}, self.fingerprint)
            except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError):
                change = "its fingerprint differs"
            raise JournalError(f"cannot --resume: the source changed since the interrupted build ({change}); "
                               "rerun with --overwrite to pack it again from the start")
        old["splits"] = {k: v for k, v in old["splits"].items() if k in self.fingerprint["splits"]}
        self.data = old

    def _load(self) -> dict[str, Any]:
        damaged = f"the resume journal {self.path} is damaged"
        try:
            old = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            raise JournalError(f"{damaged} (missing); rerun with --overwrite to start again") from None
        except (OSError, ValueError, RecursionError) as e:
            raise JournalError(f"{damaged} ({type(e).__name__}); rerun with --overwrite to start again") from None
        if not _valid(old):
            raise JournalError(f"{damaged} (unexpected content); rerun with --overwrite to start again")
        return old

    def kept_shards(self, split: str, out: Path, done: Callable[[int], Any]) -> list[dict[str, Any]]:
        """Journaled shards still intact on disk (a shard that fails its checksum is redone, with
        its successors); `done(n)` is told how many candidates each kept shard covers."""
        kept: list[dict[str, Any]] = []
        for entry in self.shards(split):
            info = entry["info"]
            ok = all(self.piece(split, entry["number"], ext).is_file() for ext in ("npz", "json"))
            if info is not None:
                p, idx = out / info["path"], info["index"]
                ok = ok and (p.is_file() and p.stat().st_size == info["bytes"] and sha256_file(p) == info["sha256"]
                             and (idx is None or (out / idx).is_file()))
            if not ok:
                break
            kept.append(entry)
            done(entry["end"] - entry["start"])
        self.data["splits"][split] = kept
        self.save()
        return kept

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

    def load_piece(self, split: str, i: int, ext: str) -> Any:
        """A finished shard's labels (npz) or problems (json); JournalError if damaged."""
        path = self.piece(split, i, ext)
        try:
            if ext == "npz":  # shard i's own labels: shard numbers are i
                return LabelArrays.load(path, num_classes=len(self.fingerprint["names"]), num_shards=i + 1)
            problems = json.loads(path.read_bytes())
            if not isinstance(problems, list) or not all(isinstance(p, dict) for p in problems):
                raise ValueError("not a list of problems")
            return problems
        except (OSError, ValueError) as e:
            raise JournalError(f"the resume journal piece {path} is damaged ({type(e).__name__}); "
                               "rerun with --overwrite to start again") from None


def _valid(d: Any) -> bool:
    """The journal has the shape this module writes (types checked, not trusted)."""
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("source"), str):
        return False
    splits = d.get("splits")
    if not isinstance(splits, dict):
        return False
    for entries in splits.values():
        if not isinstance(entries, list):
            return False
        for e in entries:
            if not (isinstance(e, dict) and all(type(e.get(k)) is int for k in ("number", "start", "end"))
                    and isinstance(e.get("tally"), dict) and (e.get("info") is None or _valid_info(e["info"]))):
                return False
    return True


def _valid_info(info: Any) -> bool:
    return (isinstance(info, dict) and isinstance(info.get("path"), str) and type(info.get("bytes")) is int
            and isinstance(info.get("sha256"), str) and type(info.get("num_samples")) is int
            and (info.get("index") is None or isinstance(info.get("index"), str)))


# ---------------------------------------------------------------------- shard rolling


class ShardRoller:
    """Rolls one split's records into shards of at most `cap` samples / ~`shard_bytes` (None:
    one shard), journaling each finished shard; every shard path is claimed before it is written.

    `spread=(n, m)` also closes shard k once candidate ceil((k+1)*n/m) is reached, so n candidates
    fill at least min(n, m) shards of near-equal size. Both rules depend only on candidate
    indices and shard numbers, so a resumed build cuts where an uninterrupted one does."""

    def __init__(self, journal: BuildJournal, split: str, fmt: str, number: int, start: int, cap: int | None,
                 shard_bytes: int | None, on_shard: Callable[[str, ShardInfo], None] | None = None,
                 spread: tuple[int, int] | None = None):
        self.journal, self.split, self.fmt, self.number = journal, split, fmt, number
        self.cap, self.shard_bytes, self.on_shard, self.spread = cap, shard_bytes, on_shard, spread
        self._reset(start)

    def _reset(self, start: int) -> None:
        self.writer: ShardWriter | None = None
        self.rows: list[tuple] = []
        self.problems: list[dict[str, Any]] = []
        self.tally = Tally()
        self.start, self.approx_bytes = start, 0  # bytes estimated from the records: deterministic

    def add(self, i: int, res: SampleResult) -> None:
        """Candidate `i`'s result: counted, and its record (if any) appended to the open shard."""
        self.problems.extend(problem_dict(self.split, p) for p in self.tally.add(res))
        if res.record is None:
            return
        if self.writer is None:
            rel = f"{self.split}/{shard_name(self.split, self.number, self.fmt)}"
            self.journal.folder.claim(rel, *([] if self.fmt == "lmdb" else [rel + INDEX_SUFFIX]))
            self.writer = get_writer(self.fmt, self.journal.folder.root / rel)
        self.writer.add(res.record)
        self.rows.append((label_only(res.record), self.number, len(self.rows)))  # pos = position in the shard
        self.approx_bytes += len(res.record.jpeg) + 20 * len(res.record.cls) + 512
        if self.cap is not None and (len(self.rows) >= self.cap or self._spread_due(i + 1) or (
                bool(self.shard_bytes) and self.approx_bytes >= self.shard_bytes)):
            self.finish(i + 1)

    def _spread_due(self, end: int) -> bool:
        if self.spread is None:
            return False
        n, m = self.spread
        return end * m >= (self.number + 1) * n  # end >= ceil((number+1) * n / m), in integers

    def finish(self, end: int) -> None:
        """Close the open shard (if any) and journal it with candidates [start, end)."""
        out, info = self.journal.folder.root, None
        if self.writer is not None:
            w = self.writer.close()
            info = ShardInfo(path=w.path.relative_to(out).as_posix(), num_samples=w.num_samples, bytes=w.bytes,
                             sha256=w.sha256, index=w.index.relative_to(out).as_posix() if w.index else None)
        entry = {"number": self.number, "start": self.start, "end": end, "info": asdict(info) if info else None,
                 "tally": self.tally.as_dict()}
        self.journal.add_shard(self.split, entry, LabelArrays.from_records(self.rows), self.problems)
        if info is not None and self.on_shard is not None:
            self.on_shard(self.split, info)
        self.number += info is not None
        self._reset(end)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def label_only(rec: Record) -> Record:
    """Drop the JPEG bytes: label pieces keep only what labels.npz needs."""
    return Record(rec.key, rec.source, b"", rec.height, rec.width, rec.orig_height, rec.orig_width, rec.cls, rec.boxes)


# ------------------------------------------------------------------------ the report


class Tally:
    """Counts images/boxes per named reason for one split; reconciles by construction."""

    def __init__(self) -> None:
        self.images_found = self.images_packed = 0
        self.boxes_found = self.boxes_packed = 0
        self.by_kind: dict[str, Counter] = {k: Counter() for k in ("image", "box", "fix", "warning")}
        self.stored: Counter = Counter()  # packed images by how they were stored (SampleResult.stored)

    def add(self, res: SampleResult) -> list[Problem]:
        self.images_found += 1
        self.boxes_found += res.boxes_found
        if res.record is not None:
            self.images_packed += 1
            self.boxes_packed += len(res.record.cls)
            self.stored[res.stored] += 1
        for p in res.problems:
            self.by_kind[p.kind][p.reason] += p.count
        return res.problems

    def merge(self, d: dict[str, Any]) -> None:
        """Add another tally's `as_dict()` (journaled shards, other splits)."""
        try:
            self.images_found += d["images"]["found"]
            self.images_packed += d["images"]["packed"]
            self.boxes_found += d["boxes"]["found"]
            self.boxes_packed += d["boxes"]["packed"]
            self.by_kind["image"].update(d["images"]["skipped"])
            self.by_kind["box"].update(d["boxes"]["dropped"])
            self.by_kind["fix"].update(d["fixes"])
            self.by_kind["warning"].update(d["warnings"])
            self.stored.update(d["images"].get("stored", {}))  # absent from journals of older versions
        except (KeyError, TypeError, ValueError) as e:
            raise JournalError(f"a shard tally in the journal or a report is damaged ({e!r}); "
                               "rerun with --overwrite") from None

    def as_dict(self) -> dict[str, Any]:
        d = {
            "images": {"found": self.images_found, "packed": self.images_packed,
                       "skipped": dict(sorted(self.by_kind["image"].items())),
                       "stored": dict(sorted(self.stored.items()))},
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


def problem_dict(split: str, p: Problem) -> dict[str, Any]:
    return {"split": split, "kind": p.kind, "reason": p.reason, "source": p.source,
            "detail": p.detail, "count": p.count}


def write_report(out: Path, source: Source, journal: BuildJournal) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """report.json from the journal's shard tallies and problems (claimed by the caller)."""
    totals = Tally()
    per_split: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
    for split in source.splits:
        t = Tally()
        for e in journal.shards(split):
            t.merge(e["tally"])
            problems.extend(journal.load_piece(split, e["number"], "json"))
        per_split[split] = t.as_dict()
        totals.merge(per_split[split])
    report = {
        "source": {"path": safe_text(str(source.root)), "layout": source.layout},
        "notes": list(source.notes),
        "totals": totals.as_dict(),
        "splits": per_split,
        "problems": problems,
    }
    atomic_write_bytes(out / REPORT_NAME, dumps_json(report))
    return report, problems
