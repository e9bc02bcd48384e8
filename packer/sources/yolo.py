"""YOLO datasets: an ultralytics data.yaml, `images/<split>/` + `labels/<split>/`, or flat
`images/` + `labels/`. Label files are found with ultralytics' `img2label_paths` rule."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from packer.sources.base import Candidate, SourceError, dedupe_sorted, inside_root, rel_posix, safe_text
from packer.sources.dataset_yaml import YAML_SPLITS, DatasetYaml, check_dataset_yaml, read_yaml
from packer.sources.walk import Scope, is_image, walk_images

__all__ = ["YAML_SPLITS", "img2label_path", "is_image", "find_yaml", "load_yaml", "load_folders", "names_from_files"]


def img2label_path(img: str) -> str:
    """ultralytics' rule: last `/images/` -> `/labels/`, extension -> `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(img.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def candidate(scope: Scope, split: str, path: str) -> Candidate:
    """Candidate for an image path already known to be lexically inside the root."""
    src = rel_posix(scope.root, path)
    lbl = img2label_path(path)
    label = lbl if os.path.isfile(lbl) else None
    if label is not None and scope.escapes(label):  # never read: it could be any file on the machine
        return Candidate(split, src, None, reject="symlink_outside_root",
                         detail="its label file is a symlink resolving outside the dataset root "
                                "(--follow-symlinks reads it)")
    # a rejected image's label file (if any) still counts the boxes lost with it
    if not os.path.lexists(path):
        return Candidate(split, src, None, label_file=label, reject="missing_image", detail="listed but not found")
    if scope.escapes(path):
        return Candidate(split, src, None, label_file=label, reject="symlink_outside_root",
                         detail="the image is a symlink resolving outside the dataset root (--follow-symlinks packs it)")
    if not os.path.isfile(path):
        return Candidate(split, src, None, label_file=label, reject="missing_image",
                         detail="a broken symlink or not a regular file")
    return Candidate(split, src, path, label_file=label)


def rejected(split: str, entry: str, what: str) -> Candidate:
    return Candidate(split, safe_text(entry.replace("\\", "/")), None, reject="path_outside_root",
                     detail=f"{what} resolves outside the dataset root")


def folder_candidates(scope: Scope, split: str, folder: str) -> list[Candidate]:
    """Candidates for every image under `folder`; a folder behind a symlink leading out of the
    root is one rejected candidate (not entered) unless symlinks are followed."""
    if scope.escapes(folder):
        return [scope.rejected(split, folder, "the folder")]
    images, outside = walk_images(scope, folder)
    return [candidate(scope, split, p) for p in images] + [scope.rejected(split, p, "the folder") for p in outside]


def read_list(scope: Scope, split: str, txt: str) -> tuple[list[Candidate], int]:
    """Candidates from a .txt image list: "./x" is relative to the list's folder (as in
    ultralytics), other relative entries to the dataset root. Returns (candidates, number of
    non-image lines ignored)."""
    name = os.path.basename(txt)
    try:
        with open(txt, encoding="utf-8-sig") as f:
            lines = [x.strip() for x in f.read().strip().splitlines()]
    except OSError as e:
        raise SourceError(f"cannot read image list {safe_text(name)}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SourceError(f"image list {safe_text(name)} is not UTF-8 text") from None
    cands, ignored = [], 0
    parent = os.path.dirname(txt)
    for n, x in enumerate(lines, 1):
        if not x:
            continue
        if not is_image(x):
            ignored += 1
            continue
        p = os.path.join(parent, x[2:]) if x.startswith("./") else x
        full = inside_root(scope.root, p)
        cands.append(candidate(scope, split, full) if full else rejected(split, x, f"{safe_text(name)} line {n}"))
    return cands, ignored


def split_candidates(scope: Scope, split: str, entries: Iterable[str], notes: list[str]) -> list[Candidate] | None:
    """Candidates for a yaml split entry (a folder, image file or .txt list, or a list of
    those). None if none of the entries exists."""
    cands: list[Candidate] = []
    exists = False
    for e in entries:
        full = inside_root(scope.root, e)
        if full is not None and not os.path.exists(full) and e.startswith("../"):
            full = inside_root(scope.root, e[3:])  # ultralytics' fallback for "../" entries
        if full is None:
            exists = True
            cands.append(rejected(split, e, f"'{split}' entry"))
        elif os.path.isdir(full):
            exists = True
            cands += folder_candidates(scope, split, full)
        elif os.path.isfile(full):
            exists = True
            if is_image(full):
                cands.append(candidate(scope, split, full))
            elif scope.escapes(full):
                cands.append(scope.rejected(split, full, "the image list"))
            else:
                more, ignored = read_list(scope, split, full)
                cands += more
                if ignored:
                    notes.append(f"{split}: {ignored} non-image lines in {safe_text(os.path.basename(full))} ignored")
        else:
            notes.append(f"{split}: {safe_text(e)} does not exist")
    return cands if exists else None


def find_yaml(root: Path, notes: list[str]) -> tuple[Path | None, dict[str, Any] | None]:
    """The dataset yaml at `root` and its parsed mapping: data.yaml, else the only yaml with
    split keys. A data.y(a)ml that cannot be read raises SourceError (it was meant to be
    read); other yamls that cannot be read are noted and ignored. A data.yaml without split
    keys is returned too (its names and kpt_shape apply to the folder layouts)."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for p in sorted(root.glob("*.y*ml")):
        if p.suffix not in (".yaml", ".yml") or not p.is_file():
            continue
        is_data = p.stem == "data"
        try:
            d = read_yaml(p)
        except SourceError:
            if is_data:
                raise
            notes.append(f"{safe_text(p.name)} is not valid YAML; ignored")
            continue
        if is_data and not isinstance(d, dict):
            raise SourceError(f"{p.name} is not a dataset yaml (expected a mapping)")
        if isinstance(d, dict) and (is_data or any(k in d for k in YAML_SPLITS)):
            found.append((p, d))
    if not found:
        return None, None
    with_splits = [(p, d) for p, d in found if any(k in d for k in YAML_SPLITS)]
    data = [(p, d) for p, d in (with_splits or found) if p.stem == "data"]
    if data:
        return data[0]
    if len(with_splits) > 1:
        raise SourceError(
            f"several dataset yamls in {root} ({', '.join(p.name for p, _ in with_splits)}): pass one as SRC")
    return with_splits[0] if with_splits else (None, None)


def _yaml_root(yaml_path: Path, d: dict[str, Any]) -> Path:
    """`path` relative to the yaml's folder (ultralytics uses the working directory; relative
    to the yaml is what a portable dataset means), falling back to the working directory."""
    base = yaml_path.parent
    if d.get("path"):
        p = Path(d["path"]).expanduser()
        if not p.is_absolute():
            p = base / p if (base / p).exists() or not p.exists() else p
        root = p.resolve()
    else:
        root = base.resolve()
    if not root.is_dir():
        raise SourceError(f"{yaml_path.name}: dataset path {d.get('path') or '.'} does not exist")
    return root


def load_yaml(
    yaml_path: Path, follow_symlinks: bool = False, d: dict[str, Any] | None = None
) -> tuple[Path, DatasetYaml, dict[str, list[Candidate]], list[str]]:
    """(root, checked yaml fields, split -> candidates, notes) from an ultralytics data.yaml
    (`d`: its content if already parsed)."""
    if d is None:
        d = read_yaml(yaml_path)
    cfg = check_dataset_yaml(d, yaml_path.name)
    notes: list[str] = ["names from 'nc' (no 'names' in the yaml)"] if cfg.names_from_nc else []
    root = _yaml_root(yaml_path, d)
    scope = Scope(root, follow_symlinks)
    splits: dict[str, list[Candidate]] = {}
    for k in YAML_SPLITS:
        v = d.get(k)
        if not v:
            continue
        cands = split_candidates(scope, k, v if isinstance(v, list) else [v], notes)
        if cands is not None:
            splits[k], dup = dedupe_sorted(cands)
            if dup:
                notes.append(f"{k}: {dup} duplicate image entries counted as 'duplicate_image' (packed once)")
    return root, cfg, splits, notes + scope.notes


def load_folders(scope: Scope, folders: dict[str, str]) -> dict[str, list[Candidate]]:
    """split -> candidates for split -> image folder."""
    return {s: dedupe_sorted(folder_candidates(scope, s, f))[0] for s, f in folders.items()}


def _max_class_id(label_file: str) -> int:
    top = -1
    try:
        with open(label_file, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                first = line.split(maxsplit=1)[:1]
                try:
                    v = float(first[0]) if first else -1.0
                except ValueError:
                    continue
                if v == v and 0 <= v < 1e6 and v == int(v):
                    top = max(top, int(v))
    except OSError:
        pass
    return top


def names_from_files(scope: Scope, splits: dict[str, list[Candidate]], notes: list[str]) -> list[str]:
    """Class names without a yaml: `classes.txt` (root or labels/), else `class_<i>` up to
    the largest class id found in the label files."""
    root = scope.root
    for p in (root / "classes.txt", root / "labels" / "classes.txt"):
        if p.is_file():
            where = rel_posix(root, str(p))
            if scope.escapes(str(p)):
                notes.append(f"{where} is a symlink resolving outside the dataset root; not read")
                continue
            try:
                text = p.read_bytes().decode("utf-8-sig")
            except (OSError, UnicodeDecodeError):
                raise SourceError(f"{where} is not readable UTF-8 text") from None
            names = [safe_text(x.strip()) for x in text.splitlines() if x.strip()]
            if names:
                notes.append(f"names from {where}")
                return names
    top = max((_max_class_id(c.label_file) for cands in splits.values() for c in cands if c.label_file), default=-1)
    notes.append(f"names inferred from the max class id ({top}) in the labels (no data.yaml or classes.txt)")
    return [f"class_{i}" for i in range(top + 1)]
