"""Layout detection: a path in, a `Source` (layout, names, candidates per split) out.

Order of detection for a folder: a dataset yaml (data.yaml) -> COCO
(`annotations/instances_<split>.json`) -> `images/<split>/` folders -> flat `images/`.
SRC may also be a data.yaml or a COCO instances json file directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from packer.sources.base import Candidate, Source, SourceError
from packer.sources.coco import _INSTANCES, find_coco_jsons, load_coco
from packer.sources.yolo import find_yaml, is_image, load_folders, load_yaml, names_from_files

__all__ = ["Source", "SourceError", "detect_source"]


def _coco_json_source(path: Path) -> Source:
    m = _INSTANCES.match(path.name)
    split = m.group(1) if m else path.stem
    # annotations/instances_x.json lives one level below the dataset root
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    names, splits, notes = load_coco(root, {split: path})
    return Source("coco", root, names, splits, notes)


def _detect(src: Path) -> Source:
    if src.is_file():
        if src.suffix in (".yaml", ".yml"):
            root, names, splits, notes = load_yaml(src)
            if names is None:
                names = names_from_files(root, splits, notes)
            return Source("yolo-yaml", root, names, splits, notes)
        if src.suffix == ".json":
            return _coco_json_source(src)
        raise SourceError(f"{src} is a file: pass a dataset folder, a data.yaml or a COCO instances json")
    if not src.is_dir():
        raise SourceError(f"{src} does not exist")

    y = find_yaml(src)
    if y is not None:
        root, names, splits, notes = load_yaml(y)
        notes.insert(0, f"dataset yaml: {y.name}")
        if names is None:
            names = names_from_files(root, splits, notes)
        return Source("yolo-yaml", root, names, splits, notes)

    jsons = find_coco_jsons(src)
    if jsons:
        names, splits, notes = load_coco(src, jsons)
        return Source("coco", src, names, splits, notes)

    images = src / "images"
    if images.is_dir():
        entries = sorted(os.scandir(images), key=lambda e: e.name)
        dirs = {e.name: e.path for e in entries if e.is_dir() and not e.name.startswith(".")}
        flat = any(e.is_file() and is_image(e.name) for e in entries)
        notes: list[str] = []
        if dirs and not flat:
            layout, splits = "yolo-dirs", load_folders(src, dirs)
        else:
            layout, splits = "yolo-flat", load_folders(src, {"train": str(images)})
            notes.append("flat images/ folder packed as split 'train'")
        names = names_from_files(src, splits, notes)
        return Source(layout, src, names, splits, notes)

    raise SourceError(
        f"could not detect layout of {src}: expected a data.yaml, annotations/instances_<split>.json (COCO), "
        "images/<split>/ or images/ (YOLO)"
    )


def detect_source(src: str | Path, splits: Sequence[str] | None = None) -> Source:
    """Detect the dataset layout under `src` and list every image of every split.

    `splits=None` keeps every split found; otherwise only those named (SourceError if one
    is missing). Candidates are sorted by `source` within each split. Raises SourceError
    (one readable line) when nothing usable is found.
    """
    path = Path(src).expanduser()
    source = _detect(path.resolve() if path.exists() else path)
    source.root = Path(source.root).resolve()
    found = {k: v for k, v in source.splits.items() if v}
    for k in source.splits.keys() - found.keys():
        source.notes.append(f"split {k!r} has no images; left out")
    if splits is not None:
        want = list(dict.fromkeys(splits))
        missing = [s for s in want if s not in found]
        if missing:
            have = ", ".join(found) or "none"
            raise SourceError(f"split(s) {', '.join(missing)} not found in {src} (found: {have})")
        found = {s: found[s] for s in want}
    if not found:
        raise SourceError(f"no images found under {src}")
    source.splits = found
    if source.layout.startswith("yolo"):
        for k, cands in found.items():
            bg = sum(c.label_file is None and c.reject is None for c in cands)
            if bg:
                source.notes.append(f"{k}: {bg} of {len(cands)} images have no label file (kept as background)")
    for cands in found.values():
        cands.sort(key=_by_source)
    if not source.names:
        raise SourceError(f"no class names for {src}: add a data.yaml or classes.txt")
    return source


def _by_source(c: Candidate) -> str:
    return c.source
