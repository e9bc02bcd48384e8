"""Multi-machine packing: deterministic parts of one build, and `packer merge`.

`packer build SRC -o DEST --num-parts N --part I` (see `packer.build.build_dataset`) packs
part I (0-based) of every split: the contiguous range ``[n*I//N, n*(I+1)//N)`` of the
split's *shuffled* candidate order, so the parts are balanced and part 0, part 1, ... in
order are exactly the single-machine sample order. Each part is a complete packed folder::

    DEST/parts/part-00000-of-00004/{manifest.json, report.json, <split>/...}
    DEST/parts/part-00001-of-00004/...

and records in its manifest ``options["parts"]`` = ``{"num_parts", "part", "splits":
{split: {"start", "end", "total", "sources_sha256"}}}`` (its candidate range, the split's
candidate count and a digest of the split's images and annotations, so a merge can prove that every
part saw the same source and that the ranges tile it).

`merge_parts(DEST)` checks all N parts (complete, same options/classes/format/size/source,
ranges that tile every split, no sample key twice) and writes ``DEST/<split>/labels.npz``
(shard numbers remapped), a combined ``DEST/report.json`` and, last and atomically,
``DEST/manifest.json`` whose shard paths point into the part folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from packer.errors import DataFailed
from packer.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    dumps_json,
    read_manifest,
    sha256_file,
    write_manifest,
)
from packer.journal import Tally
from packer.output import (
    LOCK_NAME,
    PARTS_OPTION,
    STATE_DIR,
    BuildError,
    check_not_inside,
    is_temp_name,
    our_manifest,
    output_folder,
    record_written,
    remove_owned,
)
from packer.sources.base import Candidate

PARTS_DIR = "parts"  # multi-machine packing: <out>/parts/part-IIIII-of-NNNNN/
PART_OPTION = PARTS_OPTION  # manifest options key: part selection (part manifests) / part count (merged)
_PART_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")


class PartsError(BuildError, ValueError):
    """Parts that cannot be packed or merged as asked (one readable line naming the part)."""


class PartDamaged(PartsError, DataFailed):
    """A finished part whose files disagree with its manifest: the data failed (exit 1)."""


def part_dir_name(part: int, num_parts: int) -> str:
    """Folder of part `part` (0-based) of `num_parts`, inside `DEST/parts/`."""
    return f"part-{part:05d}-of-{num_parts:05d}"


def part_range(n: int, part: int, num_parts: int) -> tuple[int, int]:
    """The candidate range [start, end) of `part` in a split of `n` (sizes differ by at most one)."""
    return n * part // num_parts, n * (part + 1) // num_parts


def sources_digest(cands: Sequence[Candidate]) -> str:
    """Digest of a split's images and their annotations (discovery order): parts of one build
    must agree on it, or a node with a stale annotation copy merges silently mislabelled.

    COCO boxes are already in memory; YOLO label files are read here, every part reading all
    of them: small reads next to the decode and encode that a part exists to share out.
    """
    h = hashlib.sha256()
    for c in cands:
        h.update(c.source.encode("utf-8") + b"\n")
        if c.coco_boxes is not None:
            h.update(repr((c.coco_size, c.coco_boxes)).encode() + b"\n")
        elif c.label_file is not None:
            h.update(_file_digest(c.label_file) + b"\n")
    return h.hexdigest()


def _file_digest(path: str) -> bytes:
    try:
        return sha256_file(Path(path)).encode()
    except OSError:  # the worker names it when it packs that image; here it only has to differ
        return b"unreadable"


def check_part_args(num_parts: int, part: int | None) -> None:
    """Validate --num-parts/--part (PartsError with a readable message)."""
    if num_parts < 1 or num_parts > 99999:
        raise PartsError(f"--num-parts must be within 1..99999, got {num_parts}")
    if part is None:
        if num_parts > 1:
            raise PartsError(f"--num-parts {num_parts} needs --part I (0..{num_parts - 1}): which part to pack here")
        return
    if not 0 <= part < num_parts:
        raise PartsError(f"--part must be within 0..{num_parts - 1} (0-based) for --num-parts {num_parts}, got {part}")


def prepare_part_dest(dest: Path, src_root: Path, num_parts: int, part: int, *, overwrite: bool) -> Path:
    """Check the shared destination of all parts and return this part's folder.

    Several parts may run this at the same time on shared storage: it only creates
    folders (exist_ok) and never touches another part's folder, except that `overwrite`
    removes what packer wrote in folders of an earlier run with another --num-parts, and
    turns a merged dataset back into an unfinished merge (its manifest goes first).
    """
    dest = Path(dest).resolve()
    check_not_inside(dest, src_root)
    if dest.exists() and not dest.is_dir():
        raise PartsError(f"output path {dest} exists and is not a folder")
    merged = our_manifest(dest) if dest.is_dir() else None
    if merged is not None:
        if PART_OPTION not in merged.options:
            raise PartsError(f"{dest} holds a single-machine packed dataset; choose another -o for parts")
        if not overwrite:
            raise PartsError(
                f"{dest} holds the merged dataset; pass --overwrite to rebuild part {part} "
                "(the merged manifest is removed until `packer merge` runs again)"
            )
        # the merged files stay listed as packer's, so the next merge may replace them
        record_written(dest, [s.labels for s in merged.splits.values()] + [REPORT_NAME])
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
    elif dest.is_dir() and not (dest / PARTS_DIR).is_dir() and any(
            p.name not in (PARTS_DIR, STATE_DIR, LOCK_NAME) and not is_temp_name(p.name) for p in dest.iterdir()):
        raise PartsError(f"output folder {dest} is not empty and holds no parts; choose another -o")
    parts_root = dest / PARTS_DIR
    if parts_root.is_dir():
        other = sorted(p.name for p in parts_root.iterdir()
                       if (m := _PART_DIR.match(p.name)) and int(m.group(2)) != num_parts)
        if other and not overwrite:
            raise PartsError(
                f"{parts_root} holds parts of a run with another --num-parts ({', '.join(other[:3])}); "
                "pass --overwrite to remove them, or choose another -o"
            )
        for name in other:  # other parts may be removing them too: every step tolerates that
            with contextlib.suppress(OSError):
                remove_owned(parts_root / name)
                (parts_root / name).rmdir()
    parts_root.mkdir(parents=True, exist_ok=True)
    return parts_root / part_dir_name(part, num_parts)


def find_parts(dest: str | os.PathLike) -> tuple[int, list[Path]]:
    """(N, [folder of part 0..N-1]) from `dest/parts/`; PartsError if none or mixed runs."""
    parts_root = Path(dest) / PARTS_DIR
    if not parts_root.is_dir():
        raise PartsError(f"{dest}: no {PARTS_DIR}/ folder, nothing to merge (pack with --num-parts N --part I first)")
    counts = {int(m.group(2)) for p in parts_root.iterdir() if (m := _PART_DIR.match(p.name))}
    if not counts:
        raise PartsError(f"{parts_root}: no part-IIIII-of-NNNNN folders, nothing to merge")
    if len(counts) > 1:
        raise PartsError(
            f"{parts_root} mixes parts of runs with different --num-parts ({', '.join(map(str, sorted(counts)))}); "
            "remove the stale ones"
        )
    n = counts.pop()
    return n, [parts_root / part_dir_name(i, n) for i in range(n)]


def merge_parts(dest: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Join the N packed parts in `dest/parts/` into one dataset rooted at `dest`.

    Refuses (PartsError naming the part) when a part is missing or unfinished, was built
    with other options, another format/size/class list/source layout/packer version, or
    another source image list, when the parts' candidate ranges do not tile every split,
    when a sample key occurs twice, or (`check_files`) when a listed shard file is absent
    or has another size (full checksums: `packer verify`). Writes `dest/<split>/labels.npz`
    (each part's `shard` numbers shifted by the shards of the parts before it; `pos`
    unchanged, so for LMDB it is the position inside that part's `data.lmdb`),
    `dest/report.json` (sum of the parts' reports; problems in part order) and last,
    atomically, `dest/manifest.json`. Merging again rewrites the same bytes.
    """
    dest = Path(dest).resolve()
    n, folders = find_parts(dest)
    with output_folder(dest, hint="free some space, then merge again") as folder:
        folder.load_owned()
        manifest, merged_labels, report = _merged(dest, n, folders, check_files)
        folder.drop_stale_temps()
        folder.start()
        folder.claim(*(f"{split}/{LABELS_NAME}" for split in merged_labels), REPORT_NAME, MANIFEST_NAME)
        (dest / MANIFEST_NAME).unlink(missing_ok=True)  # a re-merge must not look complete half-way
        for split, labels in merged_labels.items():
            folder.save_labels(split, labels)  # claimed above, before the old manifest went
        atomic_write_bytes(dest / REPORT_NAME, dumps_json(report))
        write_manifest(dest, manifest)  # last: its presence means "complete"
        folder.finish()
    return manifest


def _merged(dest: Path, n: int, folders: list[Path],
            check_files: bool) -> tuple[Manifest, dict[str, LabelArrays], dict[str, Any]]:
    """The merged manifest, label arrays per split and report of the parts (all checks done)."""
    manifests = [_read_part(dest, i, n, d) for i, d in enumerate(folders)]
    first = manifests[0]
    for i, m in enumerate(manifests[1:], 1):
        _check_same(folders[i], i, n, first, m)
    splits = list(first.splits)  # names checked by read_manifest (Manifest.validate)
    if PARTS_DIR in splits:
        raise PartsError(f"a split named {PARTS_DIR!r} would clash with the parts folder; rename that split")
    reports = [_read_report(dest, i, n, d) for i, d in enumerate(folders)]

    split_infos: dict[str, SplitInfo] = {}
    merged_labels: dict[str, LabelArrays] = {}
    for split in splits:
        _check_ranges(dest, split, folders, manifests, reports)
        split_infos[split], merged_labels[split] = _merge_split(dest, split, folders, manifests, check_files)

    options = {k: v for k, v in first.options.items() if k != PART_OPTION}
    options[PART_OPTION] = {"num_parts": n, "folders": [d.relative_to(dest).as_posix() for d in folders]}
    manifest = Manifest(format=first.format, size=first.size, names=list(first.names), source=dict(first.source),
                        options=options, packer_version=first.packer_version, splits=split_infos)
    manifest.validate()
    return manifest, merged_labels, _merge_reports(reports, folders, dest, splits)


def _merge_split(dest: Path, split: str, folders: list[Path], manifests: list[Manifest],
                 check_files: bool) -> tuple[SplitInfo, LabelArrays]:
    n = len(folders)
    pieces, shards, owner = [], [], []
    for i, (d, m) in enumerate(zip(folders, manifests, strict=True)):
        info = m.splits[split]
        rel = d.relative_to(dest).as_posix()
        try:
            la = LabelArrays.load(d / info.labels, num_classes=len(m.names), num_shards=len(info.shards))
        except (FormatError, FileNotFoundError) as e:
            raise PartDamaged(f"part {i} of {n} ({rel}): {split} label arrays unreadable: {e}") from None
        if len(la) != info.num_samples:
            raise PartDamaged(f"part {i} of {n} ({rel}): {split} labels.npz holds {len(la)} samples, "
                             f"its manifest says {info.num_samples}")
        la.shard = la.shard + len(shards)
        for sh in info.shards:
            if check_files:
                _check_file(d, sh, i, n, rel)
            shards.append(ShardInfo(
                path=f"{rel}/{sh.path}", num_samples=sh.num_samples, bytes=sh.bytes, sha256=sh.sha256,
                index=f"{rel}/{sh.index}" if sh.index else None,
            ))
        pieces.append(la)
        owner.append(np.full(len(la), i, dtype=np.int64))
    labels = LabelArrays.concat(pieces)
    _check_unique(split, labels, np.concatenate(owner) if owner else np.zeros(0, np.int64))
    return SplitInfo.of(split, labels, len(manifests[0].names), shards), labels


def _read_part(dest: Path, i: int, n: int, d: Path) -> Manifest:
    rel = d.relative_to(dest).as_posix()
    if not d.is_dir():
        raise PartsError(f"part {i} of {n} ({rel}) is missing: run it with --num-parts {n} --part {i}, then merge again")
    if not (d / MANIFEST_NAME).is_file():
        raise PartsError(f"part {i} of {n} ({rel}) is not finished (no manifest.json): "
                         f"rerun it with --num-parts {n} --part {i} --resume")
    try:
        m = read_manifest(d)
    except FormatError as e:
        raise PartsError(f"part {i} of {n} ({rel}): {e}") from None
    p = m.options.get(PART_OPTION)
    if not isinstance(p, dict) or p.get("num_parts") != n or p.get("part") != i or not isinstance(p.get("splits"), dict):
        raise PartsError(f"part {i} of {n} ({rel}): its manifest does not record being part {i} of {n}")
    return m


def _check_same(d: Path, i: int, n: int, a: Manifest, b: Manifest) -> None:
    """Part `b` must match part 0 `a` in everything but the part selection."""
    where = f"part {i} of {n} ({PARTS_DIR}/{d.name}) differs from part 0"
    for attr in ("format", "size", "format_version", "packer_version"):
        if getattr(a, attr) != getattr(b, attr):
            raise PartsError(f"{where}: {attr} {getattr(b, attr)!r} vs {getattr(a, attr)!r}")
    if a.names != b.names:
        raise PartsError(f"{where}: class names differ")
    if a.source.get("layout") != b.source.get("layout"):
        raise PartsError(f"{where}: source layout {b.source.get('layout')!r} vs {a.source.get('layout')!r}")
    keys = sorted((set(a.options) | set(b.options)) - {PART_OPTION})
    diff = [k for k in keys if a.options.get(k) != b.options.get(k)]
    if diff:
        k = diff[0]
        raise PartsError(f"{where}: option {k} = {b.options.get(k)!r} vs {a.options.get(k)!r}; "
                         "rebuild it with the same options")
    if list(a.splits) != list(b.splits):
        raise PartsError(f"{where}: splits {', '.join(b.splits)} vs {', '.join(a.splits)}")


def _read_report(dest: Path, i: int, n: int, d: Path) -> dict[str, Any]:
    path = d / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PartsError(f"part {i} of {n} ({d.relative_to(dest).as_posix()}): {REPORT_NAME} unreadable: {e}") from None


def _check_ranges(dest: Path, split: str, folders: list[Path], manifests: list[Manifest],
                  reports: list[dict[str, Any]]) -> None:
    """The parts' candidate ranges of `split` tile [0, total) and they saw the same image list."""
    n = len(folders)
    first = manifests[0].options[PART_OPTION]["splits"].get(split)
    expect = 0
    for i, (d, m, r) in enumerate(zip(folders, manifests, reports, strict=True)):
        rel = d.relative_to(dest).as_posix()
        s = m.options[PART_OPTION]["splits"].get(split)
        if not isinstance(s, dict) or first is None:
            raise PartsError(f"part {i} of {n} ({rel}): no candidate range recorded for split {split!r}")
        if s.get("total") != first.get("total") or s.get("sources_sha256") != first.get("sources_sha256"):
            raise PartsError(f"part {i} of {n} ({rel}): split {split!r} was packed from another image list "
                             f"or other annotations ({s.get('total')} vs {first.get('total')} images): the same "
                             "source folder and annotation files for every part")
        if s.get("start") != expect or not isinstance(s.get("end"), int) or s["end"] < expect:
            raise PartsError(f"part {i} of {n} ({rel}): split {split!r} range {s.get('start')}..{s.get('end')} "
                             f"does not continue at {expect} (samples would be missing or twice)")
        expect = s["end"]
        found = r.get("splits", {}).get(split, {}).get("images", {})
        if found.get("found") != s["end"] - s["start"] or found.get("packed") != m.splits[split].num_samples:
            raise PartsError(f"part {i} of {n} ({rel}): report.json for {split!r} does not match its range/manifest")
    if expect != first["total"]:
        raise PartsError(f"split {split!r}: the parts cover {expect} of {first['total']} images")


def _check_file(d: Path, sh: ShardInfo, i: int, n: int, rel: str) -> None:
    for p, size in ((sh.path, sh.bytes), (sh.index, None)):
        if p is None:
            continue
        f = d / p
        if not f.is_file() or (size is not None and f.stat().st_size != size):
            raise PartDamaged(f"part {i} of {n} ({rel}): {p} is missing or has another size than its manifest "
                             f"says; rebuild that part")


def _check_unique(split: str, labels: LabelArrays, owner: np.ndarray) -> None:
    keys, _, counts = np.unique(labels.keys, return_index=True, return_counts=True)
    if len(keys) == len(labels):
        return
    k = int(np.flatnonzero(counts > 1)[0])
    where = np.flatnonzero(labels.keys == keys[k])
    parts = sorted({int(owner[j]) for j in where})
    raise PartsError(f"split {split!r}: sample {keys[k]} occurs {counts[k]} times "
                     f"(parts {', '.join(map(str, parts))}); the parts overlap")


def _merge_reports(reports: list[dict[str, Any]], folders: list[Path], dest: Path,
                   splits: list[str]) -> dict[str, Any]:
    totals = Tally()
    per_split: dict[str, Any] = {}
    for split in splits:
        t = Tally()
        for r in reports:
            t.merge(r["splits"][split])
        per_split[split] = t.as_dict()  # raises if the sums do not reconcile
        totals.merge(per_split[split])
    notes: list[str] = []
    for r in reports:
        notes += [x for x in r.get("notes", []) if x not in notes]
    return {
        "source": reports[0].get("source", {}),
        "notes": notes,
        "parts": [d.relative_to(dest).as_posix() for d in folders],
        "totals": totals.as_dict(),
        "splits": per_split,
        "problems": [p for r in reports for p in r.get("problems", [])],
    }
