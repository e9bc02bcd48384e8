"""Where discovery may look: the dataset root, symlinks that lead out of it, and loops.

By default a file or folder reached through a symlink that resolves outside the dataset
root is not read: it becomes a candidate rejected as "symlink_outside_root" (counted in the
report), and the summary note names `--follow-symlinks`, which lifts the rule. Either way
each real folder is walked once, so a symlink loop ends and yields no duplicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from packer.images import IMG_FORMATS
from packer.sources.base import Candidate, rel_posix

FOLLOW_HINT = "pass --follow-symlinks to pack what they lead to"


def is_image(name: str) -> bool:
    """Extension in ultralytics' IMG_FORMATS (case-insensitive)."""
    return name.rpartition(".")[-1].lower() in IMG_FORMATS and "." in name


@dataclass
class Scope:
    """The dataset root discovery stays in, and whether symlinks may lead out of it."""

    root: Path
    follow_symlinks: bool = False
    notes: list[str] = field(default_factory=list)  # folders that could not be read
    _real_root: str = ""
    _real_dirs: dict[str, str] = field(default_factory=dict)  # lexical folder -> realpath

    def __post_init__(self) -> None:
        self._real_root = os.path.realpath(self.root)

    def escapes(self, path: str) -> bool:
        """True if `path` resolves outside the root (through a symlink, its own or a
        folder's on the way) and symlinks are not followed."""
        if self.follow_symlinks:
            return False
        d, name = os.path.split(path)
        try:
            real_dir = self._real_dirs.get(d)
            if real_dir is None:
                real_dir = self._real_dirs[d] = os.path.realpath(d)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dir, name)
        except (OSError, ValueError):  # a name the OS cannot take (NUL byte, lone surrogate)
            return True
        r = self._real_root.rstrip(os.sep) + os.sep
        return not (real == self._real_root or real.startswith(r))

    def rejected(self, split: str, path: str, what: str) -> Candidate:
        """A candidate for `path` skipped because `what` (e.g. "folder") leads outside the root."""
        return Candidate(split, rel_posix(self.root, path), None, reject="symlink_outside_root",
                         detail=f"{what} is a symlink resolving outside the dataset root (--follow-symlinks packs it)")


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()  # follows symlinks
    except OSError:  # a symlink loop or a vanished entry: not a folder
        return False


def walk_images(scope: Scope, folder: str) -> tuple[list[str], list[str]]:
    """(image paths, linked folders leading outside the root) under `folder`, recursively.

    Hidden files and folders are left out, as ultralytics' glob("**/*.*") does. Each real
    folder (device, inode) is entered once, so symlink loops end; folders reached by real
    paths are walked before any reached through a symlink, so an image keeps its real path.
    Folders that are symlinks out of the root are returned apart and not entered unless
    `scope.follow_symlinks`."""
    images: list[str] = []
    outside: list[str] = []
    gifs = 0
    seen: set[tuple[int, int]] = set()
    stack, linked = [folder], []
    while stack or linked:
        d = stack.pop() if stack else linked.pop(0)
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            scope.notes.append(f"folder {rel_posix(scope.root, d)} could not be read ({e.strerror or 'error'}); skipped")
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if not _is_dir(e):
                if is_image(e.name):
                    images.append(e.path)
                gifs += e.name.lower().endswith(".gif")
            elif not e.is_symlink():
                subdirs.append(e.path)
            else:
                (outside if scope.escapes(e.path) else linked).append(e.path)
        stack.extend(reversed(subdirs))
    if gifs:  # ultralytics' IMG_FORMATS has no gif: said, not silently passed over
        scope.notes.append(f"{rel_posix(scope.root, folder) or '.'}: {gifs} .gif files left out (not an image "
                           "format ultralytics reads; convert them to PNG to pack them)")
    return sorted(images), outside
