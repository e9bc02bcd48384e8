"""The output folder of every command that writes a dataset (build, convert, merge, pull).

- Ours only if its `manifest.json` parses as ours, or it holds `.packer-state/` (an
  unfinished run); any other non-empty folder is the user's and is refused.
- Every file is recorded in `.packer-state/written.txt` (fsynced) before it is created, and
  no existing path is written unless packer wrote it (`OutputFolder.claim`). `--overwrite`
  removes exactly what the old manifest (shards, indexes, labels, report; a merged
  dataset's parts too) and `written.txt` list, the journal and packer's hidden temp files;
  a directory only when that leaves it empty.
- One writer at a time: `.packer.lock` (flock(2), the holder's pid and host); see packer.lock.
- An OSError while writing (disk full, file too large, read-only) becomes one line
  (`WriteFailed`, exit 1) and leaves no temp files and no manifest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from packer.errors import DATA, PackerError
from packer.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    TEMP_MARK,
    FormatError,
    Manifest,
    check_relpath,
    read_manifest,
)
from packer.lock import LOCK_NAME, LockError, WriterLock
from packer.sources.base import safe_text

if TYPE_CHECKING:
    from packer.format import LabelArrays

STATE_DIR = ".packer-state"  # journal of an unfinished run; its presence marks the folder as ours
PULL_NAME = "pull.json"  # in the journal folder of an unfinished pull: {"url": where from}
WRITTEN_NAME = "written.txt"  # every file a run may create, one relative path per line
PARTS_OPTION = "parts"  # manifest options key of a merged dataset: {"num_parts", "folders"}
# hidden temp files of ours: atomic_write_bytes / writers (.<name>.packer-<8 random>[.build].tmp),
# uploads (.<name>.packer-<pid>.tmp); the marker keeps a user's own ".draft.1.tmp" out of it
_TEMP = re.compile(r"^\..+\." + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+(\.build)?\.tmp$")
# journal files of ours inside STATE_DIR
_JOURNAL = re.compile(r"^(state\.json|fingerprint\.json|written\.txt|pull\.json|[A-Za-z0-9_-]{1,64}-\d{5}\.(npz|json))$")
# names a run of ours may claim in a split folder; a user's file under one is refused before --overwrite removes anything
_SPLIT_OUTPUT = re.compile(r"^(?P<s>[^/]+)/((?P=s)-\d{5}\.(tfrecord|tar)(\.idx)?|data\.lmdb|labels\.npz)$")
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class BuildError(PackerError):
    """A run that cannot start or must not finish (one user-facing line; exit 2)."""


class OutputError(BuildError, ValueError):
    """The output folder cannot be used as asked: not ours, busy, read-only, would clobber a file."""


class WriteFailed(BuildError, OSError):
    """Writing the output failed (disk full, file too large, I/O error): exit 1, nothing published."""

    exit_code = DATA


def is_temp_name(name: str) -> bool:
    """True for packer's own hidden temp files (never user content)."""
    return bool(_TEMP.match(name))


def check_not_inside(out: Path, src: Path) -> None:
    """Refuse an output folder that is, or contains, the source."""
    out, src = Path(out).resolve(), Path(src).resolve()
    if out == src or src.is_relative_to(out):
        raise OutputError(f"output folder {out} contains the source {src}; choose another -o")


def check_not_holding(out: Path, src: Path) -> None:
    """Refuse an output folder that holds files of the source dataset (e.g. one part folder of a
    merged dataset): replacing what is there would delete the shards about to be read."""
    check_not_inside(out, src)
    out = Path(out).resolve()
    for rel in sorted(owned_files(Path(src))):
        if (Path(src) / rel).resolve().is_relative_to(out):
            raise OutputError(f"output folder {out} holds {rel} of the source dataset; choose another -o")


# ----------------------------------------------------------------- what packer wrote


def manifest_files(m: Manifest) -> list[str]:
    """Files a manifest lists (labels, shards, index files), relative to its folder."""
    return [p for s in m.splits.values() for p in (s.labels, *(x for sh in s.shards for x in (sh.path, sh.index) if x))]


def read_written(folder: Path) -> list[str]:
    """The paths listed in `folder/.packer-state/written.txt` (unsafe or torn lines ignored)."""
    try:
        lines = (folder / STATE_DIR / WRITTEN_NAME).read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln and ln not in (MANIFEST_NAME, LOCK_NAME) and not ln.startswith(STATE_DIR)
            and is_safe_rel(ln)]


def is_safe_rel(rel: str) -> bool:
    """True for a relative path that stays inside its folder (format.check_relpath's rule)."""
    try:
        check_relpath(rel)
    except FormatError:
        return False
    return True


def our_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest if it is ours, None if there is none; OutputError if it is not ours."""
    if not (folder / MANIFEST_NAME).exists():
        return None
    try:
        return read_manifest(folder)
    except (FormatError, OSError, ValueError, RecursionError) as e:
        raise OutputError(f"{folder} holds a {MANIFEST_NAME} that is not a packer manifest ({e}); "
                          "choose another -o") from None


def owned_files(folder: Path) -> set[str]:
    """Every file in `folder` that packer wrote, as far as its manifest and journal tell."""
    rels = set(read_written(folder))
    try:
        m = our_manifest(folder)
    except OutputError:
        m = None
    if m is not None:
        rels.update(manifest_files(m))
        rels.update((MANIFEST_NAME, REPORT_NAME))
        parts = m.options.get(PARTS_OPTION)
        folders = parts.get("folders") if isinstance(parts, dict) else None
        for sub in folders if isinstance(folders, list) else []:
            with contextlib.suppress(FormatError, TypeError):
                check_relpath(sub)
                rels.update(f"{sub}/{r}" for r in owned_files(folder / sub))
                rels.update(f"{sub}/{STATE_DIR}/{p.name}" for p in _journal_files(folder / sub))
    return rels


def _journal_files(folder: Path) -> list[Path]:
    d = folder / STATE_DIR
    return [p for p in d.iterdir() if _JOURNAL.match(p.name) or is_temp_name(p.name)] if d.is_dir() else []


def remove_temp_files(folder: Path, dirs: Iterable[Path] = ()) -> None:
    """Packer's hidden temp files in `folder`, its journal folder and `dirs` (never elsewhere)."""
    for d in {folder, folder / STATE_DIR, *dirs}:
        with contextlib.suppress(OSError):
            for p in d.iterdir():
                if is_temp_name(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


def remove_owned(folder: Path, keep: Iterable[str] = ()) -> None:
    """Remove what packer wrote in `folder` (see module doc), the manifest first; keep `keep`."""
    folder = Path(folder)
    rels = owned_files(folder) - set(keep)
    if rels:  # the list survives a crash half-way: the folder stays recognisably ours
        record_written(folder, sorted(rels))
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    dirs = set()
    for rel in sorted(rels, key=lambda r: -r.count("/")):
        p = folder / rel
        if not in_folder(folder, p):
            continue  # a folder on the way is a symlink leading out of -o: never delete through it
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
        dirs.update(q for q in p.parents if q != folder and q.is_relative_to(folder))
    remove_temp_files(folder, dirs)
    for p in _journal_files(folder):
        p.unlink(missing_ok=True)
    for d in sorted(dirs | {folder / STATE_DIR}, key=lambda q: -len(q.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty: the user's files keep their folders


def in_folder(folder: Path, p: Path) -> bool:
    """`p`'s parent folder, symlinks resolved, is `folder` or below it (`p` itself may be a link)."""
    return p.parent.resolve().is_relative_to(Path(folder).resolve())


def record_written(folder: Path, rels: list[str]) -> None:
    """Append `rels` to the folder's list of files packer wrote (fsynced before they are created)."""
    path = folder / STATE_DIR / WRITTEN_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write("".join(f"{r}\n" for r in rels).encode())
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------- the folder


class OutputFolder:
    """An output folder held by this process: its lock, what it holds, what this run claims."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = WriterLock(root)
        self.manifest: Manifest | None = None  # the old manifest, when ours
        self.unfinished = False  # holds the journal of an unfinished run
        self._owned: set[str] = set()
        self.notes: list[str] = []

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    def load_owned(self) -> None:
        """Read what packer wrote here (old manifest, journal list); nothing is removed yet."""
        self.manifest = our_manifest(self.root)
        self.unfinished = self.state_dir.is_dir()
        self._owned = owned_files(self.root)

    def drop_stale_temps(self) -> None:
        """Remove temp files a killed run of ours left, once this run may use the folder."""
        if self.manifest is not None or self.unfinished:
            remove_temp_files(self.root, {(self.root / r).parent for r in self._owned})

    def inspect(self) -> str:
        """"empty", "complete" or "unfinished"; OutputError if the folder is not ours."""
        entries = [p for p in self.root.iterdir() if p.name != LOCK_NAME and not is_temp_name(p.name)]
        if not entries:
            return "empty"
        self.load_owned()
        if self.manifest is None and not self.unfinished:
            raise OutputError(f"output folder {self.root} is not empty and is not a packed dataset; choose another -o")
        return "complete" if self.manifest is not None else "unfinished"

    def prepare(self, *, overwrite: bool, resume: bool = False, same: bool = False, keep: Iterable[str] = (),
                verb: str = "rebuild", splits: Iterable[str] = ()) -> str:
        """Apply the refuse/resume/overwrite rules; returns what the folder held ("empty"...).
        `keep`: files the run will write again; `splits`: the splits it will write."""
        kind = self.inspect()
        what = "a packed dataset" if kind == "complete" else f"an unfinished {self._unfinished_kind()}"
        if resume and kind == "empty":
            raise OutputError(f"{self.root} holds no unfinished build to resume")
        if resume and kind == "complete":
            raise OutputError(f"{self.root} already holds a complete packed dataset; nothing to resume "
                              "(--overwrite to rebuild)")
        if kind == "empty" or resume or same:
            self.drop_stale_temps()
            return kind
        if not overwrite:
            extra = " or --resume to continue" if verb == "rebuild" and kind == "unfinished" else ""
            raise OutputError(f"{self.root} already holds {what}; pass --overwrite to replace it{extra}")
        keep = set(keep)
        self.refuse_clashes(keep, splits)
        keep = self._owned & keep
        remove_owned(self.root, keep)
        self.manifest, self.unfinished = None, False
        self._owned = keep
        return kind

    def refuse_clashes(self, rels: Iterable[str] = (), splits: Iterable[str] = ()) -> None:
        """OutputError naming a file of the user's at a path this run may write (`rels`, report.json,
        or one of packer's names in a folder of `splits`), raised before --overwrite removes anything."""
        wanted = {*rels, REPORT_NAME}
        folders = [self.root, *(self.root / s for s in splits if is_safe_rel(s) and (self.root / s).is_dir())]
        for folder in folders:
            for p in sorted(folder.iterdir()):
                rel = p.relative_to(self.root).as_posix()
                if rel not in self._owned and (rel in wanted or (folder != self.root and _SPLIT_OUTPUT.match(rel))):
                    raise OutputError(f"{p} exists and packer did not write it; move it away or choose another "
                                      "-o (nothing was removed)")

    def _unfinished_kind(self) -> str:
        """What left the folder unfinished, as far as its state folder tells (a pull records its URL)."""
        try:
            url = json.loads((self.state_dir / PULL_NAME).read_text()).get("url")
        except (OSError, ValueError, AttributeError):
            return "build or conversion"
        return f"pull of {safe_text(str(url))[:200]}"

    def start(self) -> None:
        """Mark the folder as holding an unfinished run of ours (before the first file)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / WRITTEN_NAME).touch()

    def claim(self, *rels: str) -> None:
        """Record `rels` as written by this run; OutputError if one exists and packer did not write it."""
        new = [r for r in rels if r not in self._owned]
        for parent in {(self.root / r).parent for r in rels}:  # once per folder: a pull claims every file
            if not in_folder(self.root, parent / "x"):
                raise OutputError(f"{parent} is reached through a symlink leading out of {self.root}; remove the link")
        for r in new:
            p = self.root / r
            if p.exists() or p.is_symlink():
                raise OutputError(f"{p} exists and packer did not write it; move it away or choose another -o")
        if new:
            record_written(self.root, new)
            self._owned.update(new)

    def save_labels(self, split: str, labels: LabelArrays) -> None:
        """Write `<split>/labels.npz` atomically, claimed first (OutputError if a file of the user's is there)."""
        rel = f"{split}/{LABELS_NAME}"
        self.claim(rel)
        labels.save(self.root / rel)

    def finish(self) -> None:
        """After the manifest: the journal folder goes (the manifest now lists what packer wrote)."""
        for p in _journal_files(self.root):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, *, source: Path | None = None, hint: str = "rerun") -> Iterator[OutputFolder]:
    """Create (if needed) and lock `out` for one run; OSErrors while writing become WriteFailed.

    On any failure packer's temp files are removed, and a folder this call created is
    removed again if nothing else is in it. `hint` ends the disk-full message."""
    root = Path(out).resolve()
    if source is not None:
        check_not_holding(root, source)
    if root.exists() and not root.is_dir():
        raise OutputError(f"output path {root} exists and is not a folder")
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = OutputFolder(root)
        folder.lock.acquire()
    except LockError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"cannot write to output folder {root}: {e.strerror or e}") from None
    if folder.lock.note:
        folder.notes.append(folder.lock.note)
    try:
        with write_errors(root, hint):
            yield folder
    except BaseException:
        if folder.manifest is not None or folder.state_dir.is_dir():  # ours: no temp file of ours stays
            with contextlib.suppress(OSError):
                remove_temp_files(root, {(root / r).parent for r in folder._owned})
        raise
    finally:
        folder.lock.release()
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()


@contextlib.contextmanager
def write_errors(root: Path, hint: str = "rerun") -> Iterator[None]:
    """OSError (and LMDB's own I/O errors) while writing under `root` -> WriteFailed, one line."""
    try:
        yield
    except BuildError:
        raise
    except OSError as e:
        if is_write_error(e, root):
            raise WriteFailed(_io_message(root, e.errno, e.strerror or str(e), hint)) from None
        raise
    except Exception as e:
        if type(e).__module__ == "lmdb" and _errno_of(e) is not None:
            raise WriteFailed(_io_message(root, _errno_of(e), str(e), hint)) from None
        raise


def is_write_error(e: OSError, root: Path) -> bool:
    """Disk full, file too large or read-only anywhere; I/O error or no permission under `root`."""
    return e.errno in _SPACE or e.errno == errno.EROFS or (
        e.errno in (errno.EACCES, errno.EPERM, errno.EIO) and _under(e.filename, root))


def _under(name: object, root: Path) -> bool:
    return isinstance(name, (str, os.PathLike)) and Path(os.path.abspath(name)).is_relative_to(root)


def _errno_of(e: Exception) -> int | None:
    """LMDB reports errno text only ("mdb_txn_commit: Input/output error")."""
    return next((c for c in (*_SPACE, errno.EROFS, errno.EIO) if os.strerror(c) in str(e)), None)


_WHAT = {errno.EFBIG: "a file grew past the file size limit", errno.ENOSPC: "the disk is full",
         errno.EDQUOT: "the disk quota is full", errno.EROFS: "the output folder is read-only",
         errno.EIO: "an I/O error (disk full or failing?)"}


def _io_message(root: Path, code: int | None, text: str, hint: str) -> str:
    name, what = errno.errorcode.get(code or 0, "EIO"), _WHAT.get(code or 0, "the output cannot be written")
    return f"writing to {root} failed: {what} ({name}: {text}); no manifest was written; {hint}"
