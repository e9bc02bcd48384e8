"""Where `push` (and `build -o URL`) may write: the output-folder rules of packer.output, for a URL.

A destination is packer's only if it holds a packer manifest or the journal of an unfinished
push (`.packer-state/push.json`: the sha256 of the manifest being pushed and every file that
push may write or remove, uploaded before the first change). Any other non-empty destination
is refused with or without `overwrite`; another dataset (or another dataset's unfinished push)
is replaced only with `overwrite`, and then only the files its manifest or journal list are
removed. A file at a path push is about to write that packer did not write is refused unless it
already holds exactly the bytes push would send.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from packer.format import MANIFEST_NAME, REPORT_NAME, FormatError, Manifest, dumps_json, parse_manifest
from packer.output import STATE_DIR, in_folder, is_safe_rel, is_temp_name, manifest_files
from packer.schema import MANIFEST_MAX_BYTES
from packer.storage.files import read_bytes, write_bytes
from packer.storage.fs import RemoteError, display_url, is_local_fs, join, retry
from packer.storage.location import DatasetLocation

JOURNAL_REL = f"{STATE_DIR}/push.json"


def require_folder(url: str) -> None:
    """A URL that names no folder (`file://`, `file:///`, `s3://`) would write into the current
    folder, the file-system root or nowhere: refuse it before anything is read or written."""
    rest = str(url).split("://", 1)[1] if "://" in str(url) else str(url)
    if rest.split("?", 1)[0].strip("/") in ("", ".", ".."):
        raise RemoteError(f"{display_url(url)} names no folder; give one, e.g. s3://bucket/datasets/coco or "
                          "file:///data/coco")


@dataclass
class RemoteTarget:
    """What a push destination holds: every file (relative path -> size), the old manifest, the journal."""

    dst: DatasetLocation
    listing: dict[str, int] = field(default_factory=dict)
    old_bytes: bytes | None = None
    old: Manifest | None = None
    journal: dict | None = None
    report_ours: bool = False

    @classmethod
    def inspect(cls, dst: DatasetLocation) -> RemoteTarget:
        t = cls(dst)
        with contextlib.suppress(FileNotFoundError, NotImplementedError):
            found = retry(lambda: dst.fs.find(dst.root, detail=True), attempts=dst.attempts)
            prefix = dst.root.rstrip("/") + "/"
            rels = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in found.items()}
            # object stores list the zero-byte "folder" markers their consoles create: not files
            t.listing = {r: int(v.get("size") or 0) for r, v in rels.items()
                         if r and not r.endswith("/") and v.get("type") != "directory"}
        if MANIFEST_NAME in t.listing:
            t.old_bytes = t._read(MANIFEST_NAME, MANIFEST_MAX_BYTES)
            try:
                t.old = parse_manifest(t.old_bytes, dst.where_of(MANIFEST_NAME))
            except FormatError as e:
                raise RemoteError(f"{dst.display} holds a {MANIFEST_NAME} this packer cannot read ({e}); push "
                                  "somewhere else, or delete that dataset with the packer version that wrote it") from None
        t.report_ours = REPORT_NAME in t.listing and t.old is not None and t._is_packer_report()
        if JOURNAL_REL in t.listing:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                j = json.loads(t._read(JOURNAL_REL, 64 << 20))
                t.journal = j if isinstance(j, dict) else None
        return t

    def _is_packer_report(self) -> bool:
        """A report.json beside the manifest is packer's only if it reads as one (a dataset may have none)."""
        try:
            d = json.loads(self._read(REPORT_NAME, 64 << 20))
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(d, dict) and {"source", "totals", "splits", "problems"} <= set(d)

    def _read(self, rel: str, limit: int) -> bytes:
        return read_bytes(self.dst.fs, join(self.dst.root, rel), self.dst.attempts, limit=limit)

    def owned(self) -> set[str]:
        """The files packer wrote here, as far as the old manifest and the journal tell."""
        rels: set[str] = set()
        if self.old is not None:
            rels.update(manifest_files(self.old))
            rels.add(MANIFEST_NAME)
        if self.report_ours:
            rels.add(REPORT_NAME)
        if self.journal is not None:
            files = self.journal.get("files")
            rels.update(r for r in (files if isinstance(files, list) else []) if isinstance(r, str) and is_safe_rel(r))
            rels.add(JOURNAL_REL)
        return rels

    def check(self, data: bytes, targets: list[str], overwrite: bool) -> str:
        """Apply the rules for pushing manifest `data` with files `targets`: "empty", "same" (this
        very dataset), "continue" (this push's unfinished run) or "replace"; RemoteError otherwise."""
        ours, files = _sha(data), self._files()
        if not files:
            return "empty"
        if self.old is None and self.journal is None:
            self._refuse_foreign(files - set(targets))
            return "continue"  # only files at our paths: each is kept only if it is identical
        if self.old_bytes == data:
            return "same"
        if self.old is None and self.journal is not None and self.journal.get("manifest_sha256") == ours:
            return "continue"
        if not overwrite:
            what = "a packed dataset" if self.old is not None else "an unfinished push of another dataset"
            raise RemoteError(f"{self.dst.display} already holds {what}; pass --overwrite to replace it")
        return "replace"

    def precheck(self, overwrite: bool) -> None:
        """Before a build whose manifest is not known yet: a foreign destination is refused, a packed
        dataset (or an unfinished push) is replaced only with `overwrite`."""
        files = self._files()
        if self.old is None and self.journal is None:
            self._refuse_foreign(files)
        if files and not overwrite:
            what = "a packed dataset" if self.old is not None else "an unfinished push"
            raise RemoteError(f"{self.dst.display} already holds {what}; pass --overwrite to replace it")

    def _files(self) -> set[str]:
        """Every file here but packer's own hidden temp files."""
        return {r for r in self.listing if not is_temp_name(r.rsplit("/", 1)[-1])}

    def _refuse_foreign(self, foreign: set[str]) -> None:
        if foreign:
            raise RemoteError(f"{self.dst.display} is not empty and is not a packed dataset "
                              f"(it holds {sorted(foreign)[0]}); use an empty folder")

    def outside(self, rel: str) -> bool:
        """A file:// destination: `rel` is reached through a symlinked folder leading out of it."""
        return is_local_fs(self.dst.fs) and not in_folder(Path(self.dst.root), Path(self.dst.root) / rel)

    def check_inside(self, rels: list[str]) -> None:
        """Never write through a symlinked folder leading out of a file:// destination (as for -o)."""
        if bad := next((r for r in rels if self.outside(r)), None):
            raise RemoteError(f"{self.dst.where_of(bad)} is reached through a symlink leading out of "
                              f"{self.dst.display}; remove the link")

    def foreign_at(self, rels: list[str]) -> list[str]:
        """Those of `rels` that exist here and that packer did not write."""
        owned = self.owned()
        return [r for r in rels if r in self.listing and r not in owned]

    def start(self, data: bytes, targets: list[str]) -> None:
        """Before the first change: the journal names this push and every file it may write or remove,
        then the old manifest goes (it must not vouch for files that are about to change)."""
        files = sorted(self.owned() - {JOURNAL_REL, MANIFEST_NAME} | set(targets) - {MANIFEST_NAME})
        body = dumps_json({"manifest_sha256": _sha(data), "files": files})
        retry(lambda: write_bytes(self.dst.fs, join(self.dst.root, JOURNAL_REL), body), attempts=self.dst.attempts)
        if MANIFEST_NAME in self.listing:
            retry(lambda: self.dst.fs.rm_file(join(self.dst.root, MANIFEST_NAME)), attempts=self.dst.attempts)

    def remove_stale(self, targets: list[str]) -> list[str]:
        """Remove the files of the replaced dataset that the new one does not have; returns them."""
        stale = sorted(r for r in self.owned() - set(targets) - {JOURNAL_REL, MANIFEST_NAME}
                       if r in self.listing and not self.outside(r))
        for r in stale:
            with contextlib.suppress(FileNotFoundError):
                retry(lambda r=r: self.dst.fs.rm_file(join(self.dst.root, r)), attempts=self.dst.attempts)
        return stale

    def finish(self) -> None:
        """After the manifest: the journal goes (the manifest now lists what packer wrote)."""
        with contextlib.suppress(FileNotFoundError):
            retry(lambda: self.dst.fs.rm_file(join(self.dst.root, JOURNAL_REL)), attempts=self.dst.attempts)
        if is_local_fs(self.dst.fs):  # object stores have no folders to leave behind
            with contextlib.suppress(OSError):
                self.dst.fs.rmdir(join(self.dst.root, STATE_DIR))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
