"""YOLO datasets: an ultralytics data.yaml, `images/<split>/` + `labels/<split>/`, or flat
`images/` + `labels/`. Label files are found with ultralytics' `img2label_paths` rule."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from packer.images import IMG_FORMATS
from packer.sources.base import Candidate, SourceError, dedupe_sorted, inside_root, rel_posix

YAML_SPLITS = ("train", "val", "test")


def is_image(name: str) -> bool:
    """Extension in ultralytics' IMG_FORMATS (case-insensitive)."""
    return name.rpartition(".")[-1].lower() in IMG_FORMATS and "." in name


def img2label_path(img: str) -> str:
    """ultralytics' rule: last `/images/` -> `/labels/`, extension -> `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(img.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def list_images(folder: str) -> list[str]:
    """Every image file under `folder`, recursively, sorted."""
    out = []
    for d, subdirs, files in os.walk(folder, followlinks=True):
        # hidden files and folders are left out, as ultralytics' glob("**/*.*") does
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        out += [os.path.join(d, f) for f in files if is_image(f) and not f.startswith(".")]
    return sorted(out)


def candidate(root: Path, split: str, path: str) -> Candidate:
    """Candidate for an image path already known to be inside `root`."""
    src = rel_posix(root, path)
    lbl = img2label_path(path)
    lbl_or_none = lbl if os.path.isfile(lbl) else None
    if not os.path.isfile(path):  # its label file (if any) still counts the boxes lost with it
        return Candidate(split, src, None, label_file=lbl_or_none, reject="missing_image", detail="listed but not found")
    return Candidate(split, src, path, label_file=lbl_or_none)


def rejected(split: str, entry: str, what: str) -> Candidate:
    return Candidate(split, entry.replace("\\", "/"), None, reject="path_outside_root",
                     detail=f"{what} {entry!r} resolves outside the dataset root")


def read_list(root: Path, split: str, txt: str) -> tuple[list[Candidate], int]:
    """Candidates from a .txt image list: "./x" is relative to the list's folder (as in
    ultralytics), other relative entries to the dataset root. Returns (candidates, number of
    non-image lines ignored)."""
    try:
        with open(txt, encoding="utf-8-sig") as f:
            lines = [x.strip() for x in f.read().strip().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read image list {txt}: {e}") from None
    cands, ignored = [], 0
    parent = os.path.dirname(txt)
    for x in lines:
        if not x:
            continue
        if not is_image(x):
            ignored += 1
            continue
        p = os.path.join(parent, x[2:]) if x.startswith("./") else x
        full = inside_root(root, p)
        cands.append(candidate(root, split, full) if full else rejected(split, x, "list entry"))
    return cands, ignored


def split_candidates(root: Path, split: str, entries: Iterable[str], notes: list[str]) -> list[Candidate] | None:
    """Candidates for a yaml split entry (a folder, image file or .txt list, or a list of
    those). None if none of the entries exists."""
    cands: list[Candidate] = []
    exists = False
    for e in entries:
        e = str(e)
        full = inside_root(root, e)
        if full is not None and not os.path.exists(full) and e.startswith("../"):
            full = inside_root(root, e[3:])  # ultralytics' fallback for "../" entries
        if full is None:
            exists = True
            cands.append(rejected(split, e, f"'{split}' entry"))
        elif os.path.isdir(full):
            exists = True
            cands += [candidate(root, split, p) for p in list_images(full)]
        elif os.path.isfile(full):
            exists = True
            if is_image(full):
                cands.append(candidate(root, split, full))
            else:
                more, ignored = read_list(root, split, full)
                cands += more
                if ignored:
                    notes.append(f"{split}: {ignored} non-image lines in {os.path.basename(full)} ignored")
        else:
            notes.append(f"{split}: {e} does not exist")
    return cands if exists else None


def parse_names(names: Any, where: str) -> list[str]:
    """data.yaml `names` as a list, or a dict {id: name} with ids 0..n-1."""
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            d = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise SourceError(f"{where}: 'names' keys must be class ids (integers)") from None
        if sorted(d) != list(range(len(d))):
            raise SourceError(f"{where}: 'names' ids must be 0..{len(d) - 1}, got {sorted(d)}")
        return [d[i] for i in range(len(d))]
    raise SourceError(f"{where}: 'names' must be a list or a dict, not {type(names).__name__}")


def find_yaml(root: Path) -> Path | None:
    """The dataset yaml at `root`: data.yaml, else the only yaml with split keys."""
    found = []
    for p in sorted(root.glob("*.y*ml")):
        if p.suffix not in (".yaml", ".yml") or not p.is_file():
            continue
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(d, dict) and any(k in d for k in YAML_SPLITS):
            found.append(p)
    if not found:
        return None
    for p in found:
        if p.stem == "data":
            return p
    if len(found) > 1:
        raise SourceError(f"several dataset yamls in {root} ({', '.join(p.name for p in found)}): pass one as SRC")
    return found[0]


def load_yaml(yaml_path: Path) -> tuple[Path, list[str] | None, dict[str, list[Candidate]], list[str]]:
    """(root, names or None, split -> candidates, notes) from an ultralytics data.yaml.

    `path` is taken relative to the yaml's folder (ultralytics uses the working directory;
    relative to the yaml is what a portable dataset means), falling back to the working
    directory if that does not exist."""
    try:
        d = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SourceError(f"cannot read {yaml_path}: {e}") from None
    if not isinstance(d, dict):
        raise SourceError(f"{yaml_path} is not a dataset yaml (expected a mapping)")
    notes: list[str] = []
    base = yaml_path.parent
    if d.get("path"):
        p = Path(str(d["path"])).expanduser()
        if not p.is_absolute():
            p = base / p if (base / p).exists() or not p.exists() else p
        root = p.resolve()
    else:
        root = base.resolve()
    if not root.is_dir():
        raise SourceError(f"{yaml_path}: dataset path {root} does not exist")
    names = None
    if d.get("names") is not None:
        names = parse_names(d["names"], yaml_path.name)
    elif d.get("nc") is not None:
        names = [f"class_{i}" for i in range(int(d["nc"]))]
        notes.append("names from 'nc' (no 'names' in the yaml)")
    if names is not None and d.get("nc") is not None and int(d["nc"]) != len(names):
        raise SourceError(f"{yaml_path.name}: 'nc: {d['nc']}' but {len(names)} names")
    splits: dict[str, list[Candidate]] = {}
    for k in YAML_SPLITS:
        v = d.get(k)
        if not v:
            continue
        entries = v if isinstance(v, list) else [v]
        cands = split_candidates(root, k, entries, notes)
        if cands is not None:
            splits[k], dup = dedupe_sorted(cands)
            if dup:
                notes.append(f"{k}: {dup} duplicate image entries ignored")
    return root, names, splits, notes


def load_folders(root: Path, folders: dict[str, str]) -> dict[str, list[Candidate]]:
    """split -> candidates for split -> image folder."""
    return {s: dedupe_sorted([candidate(root, s, p) for p in list_images(f)])[0] for s, f in folders.items()}


def names_from_files(root: Path, splits: dict[str, list[Candidate]], notes: list[str]) -> list[str]:
    """Class names without a yaml: `classes.txt` (root or labels/), else `class_<i>` up to
    the largest class id found in the label files."""
    for p in (root / "classes.txt", root / "labels" / "classes.txt"):
        if p.is_file():
            names = [x.strip() for x in p.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
            if names:
                notes.append(f"names from {rel_posix(root, str(p))}")
                return names
    top = -1
    for cands in splits.values():
        for c in cands:
            if c.label_file is None:
                continue
            try:
                with open(c.label_file, encoding="utf-8-sig", errors="replace") as f:
                    for line in f:
                        first = line.split(maxsplit=1)[:1]
                        if first:
                            try:
                                v = float(first[0])
                            except ValueError:
                                continue
                            if v == v and 0 <= v < 1e6 and v == int(v):
                                top = max(top, int(v))
            except OSError:
                continue
    notes.append(f"names inferred from the max class id ({top}) in the labels (no data.yaml or classes.txt)")
    return [f"class_{i}" for i in range(top + 1)]
