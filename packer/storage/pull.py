"""`packer pull`: download a packed dataset from storage into a folder, manifest last.

The folder follows the output-folder rules of `packer build` (packer.output). Every file is
written through a temp file + rename and checked against the manifest; local files that
already match are kept. See `transfer` for what push and pull share.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packer.format import (
    MANIFEST_NAME,
    REPORT_NAME,
    atomic_write_bytes,
    check_split_name,
    dumps_json,
    sha256_file,
)
from packer.output import PULL_NAME, STATE_DIR, OutputFolder, is_write_error, output_folder
from packer.progress import progress_bar
from packer.schema import DamagedDataset
from packer.storage.files import download, hash_remote, remote_sizes
from packer.storage.fs import DEFAULT_ATTEMPTS, ChecksumError, RemoteError, join, redact
from packer.storage.location import DatasetLocation
from packer.storage.transfer import FileEntry, TransferResult, TryBytes, check_file, dataset_files


def pull(
    url: str,
    local: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    filesystem: Any = None,
    overwrite: bool = False,
) -> TransferResult:
    """Download the packed dataset at `url` into folder `local`, manifest last.

    Every file is written through a temp file + rename; shards are checked against the
    manifest's size and sha256, index files against the index recomputed from their shard,
    label arrays against the manifest's counts. Local files that already match are kept.
    `local` follows the output-folder rules of `packer build` (packer.output): it must be
    new, empty, the same dataset (identical manifest) or an unfinished pull of the same
    URL; anything packer wrote there is replaced only with `overwrite`.
    """
    t0 = time.monotonic()
    local = Path(local)
    if local.exists() and not local.is_dir():
        raise RemoteError(f"{local} exists and is not a folder")
    src = DatasetLocation(url, storage_options, attempts=attempts, filesystem=filesystem)
    data, m = src.manifest_bytes(), src.manifest()
    for split in m.splits:
        check_split_name(split)
    files = dataset_files(m)
    res = TransferResult(src.display, str(local), files=len(files) + 1)
    with output_folder(local, hint="free some space, then pull again (files already copied are kept)") as folder:
        _claim(folder, src, data, files, overwrite)
        with _pull_errors(src, folder.root):
            _pull_files(src, folder.root, files, res, progress, len(data))
        atomic_write_bytes(folder.root / MANIFEST_NAME, data)
        res.copied.append(MANIFEST_NAME)
        res.bytes_copied += len(data)
        folder.finish()
    res.elapsed_s = time.monotonic() - t0
    return res


def _claim(folder: OutputFolder, src: DatasetLocation, data: bytes, files: list[FileEntry], overwrite: bool) -> None:
    """Apply the output-folder rules, mark the pull as unfinished (from where), claim its files."""
    marker = {"url": src.display}
    same = _same_pull(folder.root, data, marker)
    folder.prepare(overwrite=overwrite, same=same, keep=[f.rel for f in files], verb="replace")
    folder.start()
    atomic_write_bytes(folder.state_dir / PULL_NAME, dumps_json(marker))
    folder.claim(*(f.rel for f in files), MANIFEST_NAME)
    lman = folder.root / MANIFEST_NAME
    if lman.is_file() and lman.read_bytes() != data:
        lman.unlink()  # the folder stops claiming to be complete before anything changes


@contextlib.contextmanager
def _pull_errors(src: DatasetLocation, local: Path) -> Iterator[None]:
    """Storage errors -> one RemoteError line; local disk errors pass on to output_folder."""
    try:
        yield
    except FileNotFoundError as e:
        raise DamagedDataset(f"pull from {src.display}: a file named by the manifest is missing "
                          f"({redact(str(e), src.storage_options)})") from None
    except ChecksumError:
        raise
    except OSError as e:
        if is_write_error(e, local):
            raise  # disk full / read-only: output_folder turns it into one line
        raise RemoteError(f"pull from {src.display} failed: {redact(str(e), src.storage_options)}") from None


def _same_pull(root: Path, data: bytes, marker: dict[str, str]) -> bool:
    """`root` holds this very dataset, or an unfinished pull from the same URL (safe to continue:
    every file is checked against the manifest)."""
    with contextlib.suppress(OSError):
        if (root / MANIFEST_NAME).read_bytes() == data:
            return True
    with contextlib.suppress(OSError, ValueError):
        return json.loads((root / STATE_DIR / PULL_NAME).read_bytes()) == marker
    return False


def _pull_files(src: DatasetLocation, local: Path, files: list[FileEntry], res: TransferResult, progress: bool,
                manifest_bytes: int) -> None:
    remote = remote_sizes(src.fs, src.root, [f.rel for f in files], src.attempts)
    if REPORT_NAME not in remote:
        files = [f for f in files if f.kind != "report"]
        res.files -= 1
    res.bytes_total = sum(remote.get(f.rel, f.bytes or 0) for f in files) + manifest_bytes
    with progress_bar(res.bytes_total, "pull", "B", enabled=progress) as bar:
        for f in files:
            path = local / f.rel
            size = remote.get(f.rel, f.bytes)
            if path.is_file() and path.stat().st_size == size and _local_same(src, local, f, res):
                res.skipped.append(f.rel)
                bar.update(size or 0)
                continue
            res.bytes_copied += _fetch(src, local, f, res, bar)
            res.copied.append(f.rel)
        bar.update(manifest_bytes)


def _fetch(src: DatasetLocation, local: Path, f: FileEntry, res: TransferResult, bar) -> int:  # noqa: ANN001
    """Download one file, checked against the manifest (retried; the bar goes back on each new
    try); returns its size."""
    m, path, got = src.manifest(), local / f.rel, TryBytes(bar)

    def once() -> None:
        got.restart()
        download(src.fs, join(src.root, f.rel), path, sha256=f.sha256, size=f.bytes, max_bytes=f.max_bytes,
                 on_bytes=got)
        if f.kind != "shard":
            try:
                check_file(m, local, f, path)
            except ChecksumError:
                path.unlink(missing_ok=True)
                raise

    res.retrying(src.attempts, once)
    return got.n


def _local_same(src: DatasetLocation, local: Path, f: FileEntry, res: TransferResult) -> bool:
    """A local file of the right size also matches the manifest (or, for report.json, the remote file)."""
    path = local / f.rel
    if f.kind == "report":
        remote, _ = res.retrying(src.attempts, lambda: hash_remote(src.fs, join(src.root, f.rel)))
        return sha256_file(path) == remote
    try:
        check_file(src.manifest(), local, f, path)
        return True
    except ChecksumError:
        return False


