"""Layout detection: a path in, a `Source` (layout, names, candidates per split) out.

Order of detection for a folder: a dataset yaml (data.yaml) -> COCO
(`annotations/instances_<split>.json`) -> `images/<split>/` folders -> flat `images/`.
SRC may also be a data.yaml or a COCO instances json file directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packer.format import FormatError, check_split_name
from packer.sources.base import Candidate, Source, SourceError, safe_text
from packer.sources.coco import find_coco_jsons, load_coco, split_of
from packer.sources.dataset_yaml import DatasetYaml, check_dataset_yaml
from packer.sources.walk import FOLLOW_HINT, Scope
from packer.sources.yolo import find_yaml, is_image, load_folders, load_yaml, names_from_files

__all__ = ["Source", "SourceError", "detect_source"]


def _coco_json_source(path: Path, follow: bool) -> Source:
    split = split_of(path)
    # annotations/instances_x.json lives one level below the dataset root
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    names, splits, notes = load_coco(root, {split: path}, follow)
    return Source("coco", root, names, splits, notes)


def _yaml_source(y: Path, follow: bool, d: Any = None) -> tuple[Source, DatasetYaml]:
    root, cfg, splits, notes = load_yaml(y, follow, d)
    names = cfg.names if cfg.names is not None else names_from_files(Scope(root, follow), splits, notes)
    return Source("yolo-yaml", root, names, splits, notes), cfg


def _folder_source(src: Path, images: Path, follow: bool, cfg: DatasetYaml | None) -> Source:
    scope = Scope(src, follow)
    try:
        entries = sorted(os.scandir(images), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"cannot read {images}: {e.strerror or e}") from None
    dirs = {e.name: e.path for e in entries if e.is_dir() and not e.name.startswith(".")}
    flat = any(e.is_file() and is_image(e.name) for e in entries)
    notes: list[str] = []
    if dirs and not flat:
        for name in dirs:
            try:
                check_split_name(name)
            except FormatError as e:
                raise SourceError(f"images/{safe_text(name)}: {safe_text(str(e))} (rename the folder)") from None
        layout, splits = "yolo-dirs", load_folders(scope, dirs)
    else:
        layout, splits = "yolo-flat", load_folders(scope, {"train": str(images)})
        notes.append("flat images/ folder packed as split 'train'")
    notes += scope.notes
    if cfg is not None and cfg.names is not None:
        names = cfg.names
        notes.append("names from data.yaml (it lists no splits; the folders were used)")
    else:
        names = names_from_files(scope, splits, notes)
    return Source(layout, src, names, splits, notes)


def _detect(src: Path, follow: bool) -> tuple[Source, DatasetYaml | None]:
    if src.is_file():
        if src.suffix in (".yaml", ".yml"):
            return _yaml_source(src, follow)
        if src.suffix == ".json":
            return _coco_json_source(src, follow), None
        raise SourceError(f"{src} is a file: pass a dataset folder, a data.yaml or a COCO instances json")
    if not src.is_dir():
        raise SourceError(f"{src} does not exist")

    notes: list[str] = []
    y, d = find_yaml(src, notes)
    cfg = check_dataset_yaml(d, y.name) if y is not None else None
    if y is not None and cfg.has_splits:
        source, cfg = _yaml_source(y, follow, d)
        source.notes[:0] = [f"dataset yaml: {safe_text(y.name)}", *notes]
        return source, cfg

    jsons = find_coco_jsons(src)
    if jsons:
        names, splits, more = load_coco(src, jsons, follow)
        if cfg is not None:
            notes.append(f"{y.name} lists no splits; the COCO annotations were used")
        return Source("coco", src, names, splits, notes + more), None

    images = src / "images"
    if images.is_dir():
        source = _folder_source(src, images, follow, cfg)
        source.notes[:0] = notes
        return source, cfg

    raise SourceError(
        f"could not detect layout of {src}: expected a data.yaml, annotations/instances_<split>.json (COCO), "
        "images/<split>/ or images/ (YOLO)"
    )


def detect_source(src: str | Path, splits: Sequence[str] | None = None, *, follow_symlinks: bool = False) -> Source:
    """Detect the dataset layout under `src` and list every image of every split.

    `splits=None` keeps every split found; otherwise only those named (SourceError if one
    is missing). Candidates are sorted by `source` within each split. Raises SourceError
    (one readable line) when nothing usable is found. Symlinks resolving outside the
    dataset root are not read (candidates rejected as "symlink_outside_root") unless
    `follow_symlinks`; see packer.sources.walk.
    """
    path = Path(src).expanduser()
    source, cfg = _detect(path.resolve() if path.exists() else path, follow_symlinks)
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
        given = path.resolve().parent if path.is_file() else path.resolve()
        where = f" (the dataset root {safe_text(str(source.root))}, from data.yaml's 'path')" \
            if Path(source.root) != given else ""
        raise SourceError(f"no images found under {src}{where}")
    source.splits = found
    _finish_notes(source, src, cfg)
    if not source.names:
        raise SourceError(f"no class names for {src}: add a data.yaml or classes.txt")
    return source


def _finish_notes(source: Source, src: str | Path, cfg: DatasetYaml | None) -> None:
    """Sort candidates, apply kpt_shape, and add the summary notes (background images,
    symlinks left out); SourceError when every image is behind such a symlink."""
    cands = [c for v in source.splits.values() for c in v]
    if source.layout.startswith("yolo"):
        for k, v in source.splits.items():
            bg = sum(c.label_file is None and c.reject is None for c in v)
            if bg:
                source.notes.append(f"{k}: {bg} of {len(v)} images have no label file (kept as background)")
        if cfg is not None and cfg.kpt_shape is not None:
            for c in cands:
                c.kpt_shape = cfg.kpt_shape
            n, dim = cfg.kpt_shape
            source.notes.append(f"pose labels (kpt_shape [{n}, {dim}]): {5 + n * dim} columns a line; "
                                "boxes packed, keypoints not")
    for v in source.splits.values():
        v.sort(key=_by_source)
    linked = sum(c.reject == "symlink_outside_root" for c in cands)
    if linked and linked == len(cands):
        raise SourceError(f"every image under {safe_text(str(src))} is behind a symlink resolving outside it: "
                          "pass --follow-symlinks to pack them")
    _check_no_split_is_all_outside(source, src)
    if linked:
        source.notes.append(f"{linked} skipped as symlink_outside_root (the image, its label file or its folder "
                            f"is a symlink resolving outside the dataset root): {FOLLOW_HINT}")


def _check_no_split_is_all_outside(source: Source, src: Path) -> None:
    """A split whose every entry lies outside the root would pack as an empty split: stop instead."""
    for split, cands in source.splits.items():
        reasons = {c.reject for c in cands}
        if not cands or not reasons <= {"symlink_outside_root", "path_outside_root"}:
            continue
        hint = ("pass --follow-symlinks to pack what the links lead to" if "symlink_outside_root" in reasons
                else "paths in a data file must stay inside the dataset root (data.yaml: its 'path:')")
        raise SourceError(f"split {split}: every image resolves outside {safe_text(str(src))}; {hint}")


def _by_source(c: Candidate) -> str:
    return c.source
