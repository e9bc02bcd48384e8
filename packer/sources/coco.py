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

from packer.format import FormatError, check_split_name
from packer.sources.base import (
    Candidate,
    Problem,
    SourceError,
    dedupe_sorted,
    inside_root,
    rel_posix,
    safe_text,
)
from packer.sources.walk import Scope

_INSTANCES = re.compile(r"^instances_(.*)\.json$")


def split_of(path: Path) -> str:
    """The split a COCO json stands for: `instances_<split>.json` -> `<split>`, else the file
    stem. Split names become folder names under -o, so they are checked (SourceError)."""
    m = _INSTANCES.match(path.name)
    split = m.group(1) if m else path.stem
    try:
        return check_split_name(split)
    except FormatError as e:
        raise SourceError(f"{safe_text(path.name)}: {safe_text(str(e))} (rename the json)") from None


def find_coco_jsons(root: Path) -> dict[str, Path]:
    """split -> `annotations/instances_<split>.json` under `root` (empty if none)."""
    ann = root / "annotations"
    if not ann.is_dir():
        return {}
    out = {}
    for p in sorted(ann.iterdir()):
        if _INSTANCES.match(p.name) and p.is_file():
            out[split_of(p)] = p
    return out


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SourceError(f"cannot read COCO annotations {safe_text(str(path))}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # their messages give positions, not content
        raise SourceError(f"cannot read COCO annotations {safe_text(str(path))}: {e}") from None
    except RecursionError:
        raise SourceError(f"cannot read COCO annotations {safe_text(str(path))}: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{safe_text(str(path))} is not a COCO instances file (no 'images' list)")
    return data


def category_names(data: dict[str, Any], path: Path) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names (index = class id)."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise SourceError(f"{safe_text(path.name)} has no 'categories'")
    try:
        by_id = {int(c["id"]): safe_text(str(c.get("name", c["id"]))) for c in cats}
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
        raise SourceError(f"{safe_text(path.name)}: every category needs an integer 'id'") from None
    if len(by_id) != len(cats):  # two names for one id would shift every later class index
        dup = next(i for i in by_id if sum(1 for c in cats if int(c["id"]) == i) > 1)
        raise SourceError(f"{safe_text(path.name)}: category id {dup} appears more than once in 'categories'")
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


def _id(v: Any) -> int | str | None:
    """An image id usable as a key, else None. Ints, and the strings and integral floats that spell
    one (exports of other tools give one image "338" in 'images' and 338 or 338.0 in 'annotations':
    keyed apart, its boxes became orphans and the image a background); other strings as they are."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdecimal() and v.strip().isascii():
        return int(v.strip())
    return v if isinstance(v, int | str) else None


def _size(im: dict[str, Any]) -> tuple[int, int] | None:
    h, w = im.get("height"), im.get("width")
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (h, w))
    return (int(h), int(w)) if ok else None


def _class_of(a: dict[str, Any], cat_index: dict[int, int]) -> int | None:
    try:
        return cat_index.get(int(a.get("category_id")))
    except (TypeError, ValueError, OverflowError):
        return None


CocoBox = tuple[int, float, float, float, float, int]  # class, x, y, w, h (json pixels), iscrowd


def _image_boxes(anns: list[dict[str, Any]], cat_index: dict[int, int]) -> tuple[list[CocoBox], list[Problem]]:
    """The boxes of one image's annotations and the problems of the others."""
    boxes: list[CocoBox] = []
    problems: list[Problem] = []
    for j, a in enumerate(anns):
        b = _bbox(a)
        if b is None:  # the detail names the annotation, never its content
            problems.append(Problem("box", "bad_line", "", f"annotation {j}: bbox is not 4 numbers"))
            continue
        c = _class_of(a, cat_index)
        if c is None:
            cid = a.get("category_id")
            shown = f"category_id {cid}" if isinstance(cid, int) and not isinstance(cid, bool) else "category_id"
            problems.append(Problem("box", "class_out_of_range", "", f"annotation {j}: {shown} not in 'categories'"))
            continue
        boxes.append((c, *b, 1 if a.get("iscrowd") else 0))
    return boxes, problems


def _index_annotations(data: dict[str, Any], name: str) -> tuple[dict[Any, list[dict[str, Any]]], int]:
    """image_id -> annotations, and the number of entries that are not objects."""
    raw = data.get("annotations")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise SourceError(f"{name}: 'annotations' must be a list")
    anns: dict[Any, list[dict[str, Any]]] = {}
    for a in raw:
        if isinstance(a, dict):
            anns.setdefault(_id(a.get("image_id")), []).append(a)
    return anns, sum(not isinstance(a, dict) for a in raw)


def _unique_ids(images: list[Any], name: str) -> set[Any]:
    """Ids of the images; two images with one id make the json ambiguous (SourceError)."""
    ids: set[Any] = set()
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            raise SourceError(f"{name}: entry {i} of 'images' is not an object")
        k = _id(im.get("id"))
        if k is not None and k in ids:
            shown = k if isinstance(k, int) else repr(safe_text(k[:40]))
            raise SourceError(f"{name}: image id {shown} is used by more than one image; ids must be unique")
        ids.add(k)
    return ids


def _locate(root: Path, scope: Scope, bases: list[str], cand: Candidate, fname: str, name: str) -> None:
    """Set the candidate's source and path (or its reject reason) from its json file_name."""
    if not fname:
        cand.reject, cand.detail = "missing_image", "the entry has no file_name"
        return
    # a file_name that climbs above the root (absolute, or leading "..") is rejected
    # whatever folder it would be looked up in; the lookups below then stay inside
    paths = [p for b in bases if (p := inside_root(root, os.path.join(b, fname)))]
    if inside_root(root, fname) is None or not paths:
        cand.reject, cand.detail = "path_outside_root", "file_name resolves outside the dataset root"
        return
    found = next((p for p in paths if os.path.isfile(p)), None)
    cand.source = rel_posix(root, found or paths[0])
    if found is None:
        cand.reject, cand.detail = "missing_image", f"listed in {name} but not found"
    elif scope.escapes(found):
        cand.reject = "symlink_outside_root"
        cand.detail = "the image is a symlink resolving outside the dataset root (--follow-symlinks packs it)"
    else:
        cand.path = found


def load_split(
    root: Path, split: str, data: dict[str, Any], cat_index: dict[int, int], scope: Scope, json_path: Path
) -> tuple[list[Candidate], list[str]]:
    """Candidates (sorted by source) of one COCO split, plus notes. Every annotation is
    counted: as a box of its image, or as a box problem ("orphan_annotation" for an image_id
    that matches no image, "bad_line" for a non-object) on the split's first candidate."""
    name = safe_text(json_path.name)
    notes: list[str] = []
    anns, not_objects = _index_annotations(data, name)
    image_ids = _unique_ids(data["images"], name)
    bases = [str(b) for b in (root / split, root / "images" / split, root / "images") if b.is_dir()] + [str(root)]
    cands: list[Candidate] = []
    for i, im in enumerate(data["images"]):
        fname = im.get("file_name")
        fname = fname.replace("\\", "/") if isinstance(fname, str) else ""
        k = _id(im.get("id"))
        boxes, problems = _image_boxes(anns.get(k, []) if k is not None else [], cat_index)
        cand = Candidate(split=split, source=safe_text(fname), path=None, coco_boxes=boxes, coco_size=_size(im),
                         problems=problems)
        _locate(root, scope, bases, cand, fname, name)
        if not fname:  # a source of its own, so it is not mistaken for a duplicate
            cand.source = f"{name}#images[{i}]"
        for p in cand.problems:
            p.source = cand.source
        cands.append(cand)
    cands, dup = dedupe_sorted(cands)
    if dup:
        notes.append(f"{split}: {dup} images listed twice in {name}; counted as 'duplicate_image' (packed once)")
    orphans = sum(len(v) for k, v in anns.items() if k is None or k not in image_ids)
    if cands and (orphans or not_objects):
        where = rel_posix(root, str(json_path)) if inside_root(root, str(json_path)) else name
        if orphans:
            cands[0].problems.append(Problem("box", "orphan_annotation", where,
                                             f"{orphans} annotations refer to an image_id not in 'images'", orphans))
        if not_objects:
            cands[0].problems.append(Problem("box", "bad_line", where,
                                             f"{not_objects} entries of 'annotations' are not objects", not_objects))
    if orphans:
        notes.append(f"{split}: {orphans} annotations refer to image ids not in 'images'; counted as 'orphan_annotation'")
    return cands, notes


def load_coco(
    root: Path, jsons: dict[str, Path], follow_symlinks: bool = False
) -> tuple[list[str], dict[str, list[Candidate]], list[str]]:
    """Names, split -> candidates, notes for COCO json files (split name -> path)."""
    names: list[str] | None = None
    ids: list[int] = []
    splits: dict[str, list[Candidate]] = {}
    notes: list[str] = []
    first = None
    scope = Scope(root, follow_symlinks)
    for split, path in jsons.items():
        data = _load_json(path)
        s_ids, s_names = category_names(data, path)
        if names is None:
            ids, names, first = s_ids, s_names, path
        elif (s_ids, s_names) != (ids, names):
            raise SourceError(f"categories differ between {first.name} and {path.name}")
        cat_index = {cid: i for i, cid in enumerate(ids)}
        splits[split], more = load_split(root, split, data, cat_index, scope, path)
        notes += more
    if ids and ids != list(range(len(ids))):
        notes.append(f"{len(ids)} category ids ({ids[0]}..{ids[-1]}) mapped to class indices 0..{len(ids) - 1}")
    return names or [], splits, notes
