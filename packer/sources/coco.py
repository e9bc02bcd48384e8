"""COCO detection datasets: `annotations/instances_<split>.json` + image folders.

Category ids map to contiguous class indices in ascending id order (for COCO's 80
categories this is exactly ultralytics' `coco91_to_coco80_class`). Images are looked up in
`<split>/`, `images/<split>/`, then relative to the dataset root (`file_name` paths).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from packer.sources.base import Candidate, Problem, SourceError, dedupe_sorted, inside_root, rel_posix

_INSTANCES = re.compile(r"^instances_(.+)\.json$")


def find_coco_jsons(root: Path) -> dict[str, Path]:
    """split -> `annotations/instances_<split>.json` under `root` (empty if none)."""
    ann = root / "annotations"
    if not ann.is_dir():
        return {}
    out = {}
    for p in sorted(ann.iterdir()):
        m = _INSTANCES.match(p.name)
        if m and p.is_file():
            out[m.group(1)] = p
    return out


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read COCO annotations {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{path} is not a COCO instances file (no 'images' list)")
    return data


def category_names(data: dict[str, Any], path: Path) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names (index = class id)."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise SourceError(f"{path} has no 'categories'")
    try:
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    except (KeyError, TypeError, ValueError):
        raise SourceError(f"{path}: every category needs an integer 'id'") from None
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _bbox(ann: dict[str, Any]) -> tuple[float, float, float, float] | None:
    b = ann.get("bbox")
    if not isinstance(b, list | tuple) or len(b) != 4:
        return None
    try:
        return tuple(float(v) for v in b)  # type: ignore[return-value]
    except (TypeError, ValueError):
        return None


def load_split(root: Path, split: str, data: dict[str, Any], cat_index: dict[int, int]) -> tuple[list[Candidate], list[str]]:
    """Candidates (sorted by source) of one COCO split, plus notes."""
    notes: list[str] = []
    anns: dict[Any, list[dict[str, Any]]] = {}
    for a in data.get("annotations") or []:
        if isinstance(a, dict):
            anns.setdefault(a.get("image_id"), []).append(a)
    image_ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    orphans = sum(len(v) for k, v in anns.items() if k not in image_ids)
    if orphans:
        notes.append(f"{split}: {orphans} annotations refer to image ids not in 'images'; ignored")

    bases = [str(b) for b in (root / split, root / "images" / split, root / "images") if b.is_dir()] + [str(root)]
    cands: list[Candidate] = []
    for im in data["images"]:
        if not isinstance(im, dict):
            continue
        fname = str(im.get("file_name", "")).replace("\\", "/")
        boxes: list[tuple[int, float, float, float, float, int]] = []
        problems: list[Problem] = []
        for j, a in enumerate(anns.get(im.get("id"), [])):
            b = _bbox(a)
            if b is None:
                problems.append(Problem("box", "bad_line", fname, f"annotation {j}: bbox {a.get('bbox')!r} is not 4 numbers"))
                continue
            try:
                c = cat_index.get(int(a.get("category_id")))
            except (TypeError, ValueError):
                c = None
            if c is None:
                problems.append(Problem("box", "class_out_of_range", fname,
                                        f"annotation {j}: category_id {a.get('category_id')!r} is not in 'categories'"))
                continue
            boxes.append((c, *b, 1 if a.get("iscrowd") else 0))
        h, w = im.get("height"), im.get("width")
        size = (int(h), int(w)) if isinstance(h, int | float) and isinstance(w, int | float) and h > 0 and w > 0 else None
        if size is not None and not all(math.isfinite(v) for v in size):
            size = None

        cand = Candidate(split=split, source=fname, path=None, coco_boxes=boxes, coco_size=size, problems=problems)
        # a file_name that climbs above the root (absolute, or leading "..") is rejected
        # whatever folder it would be looked up in; the lookups below then stay inside
        paths = [p for b in bases if (p := inside_root(root, os.path.join(b, fname)))]
        if not fname or inside_root(root, fname) is None or not paths:
            cand.reject, cand.detail = "path_outside_root", f"file_name {fname!r} resolves outside the dataset root"
        else:
            found = next((p for p in paths if os.path.isfile(p)), None)
            cand.source = rel_posix(root, found or paths[0])
            if found is None:
                cand.reject, cand.detail = "missing_image", f"listed in instances_{split}.json but not found"
            else:
                cand.path = found
        for p in cand.problems:
            p.source = cand.source
        cands.append(cand)
    cands, dup = dedupe_sorted(cands)
    if dup:
        notes.append(f"{split}: {dup} duplicate image entries ignored")
    return cands, notes


def load_coco(root: Path, jsons: dict[str, Path]) -> tuple[list[str], dict[str, list[Candidate]], list[str]]:
    """Names, split -> candidates, notes for COCO json files (split name -> path)."""
    names: list[str] | None = None
    ids: list[int] = []
    splits: dict[str, list[Candidate]] = {}
    notes: list[str] = []
    first = None
    for split, path in jsons.items():
        data = _load_json(path)
        s_ids, s_names = category_names(data, path)
        if names is None:
            ids, names, first = s_ids, s_names, path
        elif (s_ids, s_names) != (ids, names):
            raise SourceError(f"categories differ between {first.name} and {path.name}")
        cat_index = {cid: i for i, cid in enumerate(ids)}
        splits[split], more = load_split(root, split, data, cat_index)
        notes += more
    if ids and ids != list(range(len(ids))):
        notes.append(f"{len(ids)} category ids ({ids[0]}..{ids[-1]}) mapped to class indices 0..{len(ids) - 1}")
    return names or [], splits, notes
