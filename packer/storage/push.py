"""`packer push` and `packer build -o URL`: upload a packed folder to storage, manifest last.

The destination follows the output-folder rules (`remote_target`): empty, this dataset, an
unfinished push of it, or (with `overwrite`) another packed dataset, whose files alone are
replaced. A stale manifest at the destination is removed before anything else is written, so
the old manifest never vouches for files that are changing. See `transfer` for what is shared.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from packer.format import MANIFEST_NAME, REPORT_NAME, FormatError, Manifest, sha256_file
from packer.progress import progress_bar
from packer.storage.files import hash_remote, upload, write_bytes
from packer.storage.fs import (
    DEFAULT_ATTEMPTS,
    ChecksumError,
    RemoteError,
    display_url,
    join,
    redact,
    require_writable,
    unreachable,
)
from packer.storage.location import DatasetLocation
from packer.storage.remote_target import RemoteTarget, require_folder
from packer.storage.transfer import FileEntry, TransferResult, TryBytes, check_file, dataset_files


def push(
    local: str | os.PathLike,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    filesystem: Any = None,
    overwrite: bool = False,
) -> TransferResult:
    """Upload the packed dataset in folder `local` to `url`, manifest last.

    Local shards are checked against the manifest before they are sent (a corrupt local
    copy is never uploaded); remote files whose size and sha256 already match are kept.
    Another dataset at `url` is replaced only with `overwrite` (see `remote_target`).
    `filesystem` overrides the fsspec filesystem made from `url` (tests inject faults this way).
    """
    t0 = time.monotonic()
    require_folder(url)
    local = Path(local)
    src = DatasetLocation(local)
    data, m = src.manifest_bytes(), src.manifest()
    dst = DatasetLocation(url, storage_options, attempts=attempts, filesystem=filesystem)
    require_writable(dst.fs, url)
    files = [f for f in dataset_files(m) if f.kind != "report" or (local / REPORT_NAME).is_file()]
    res = TransferResult(str(local), display_url(url), files=len(files) + 1)
    try:
        _push(dst, local, m, data, files, res, progress, overwrite)
    except (RemoteError, FormatError):
        raise
    except Exception as e:
        if (err := unreachable(e, url, storage_options, attempts)) is not None:
            raise err from None
        if isinstance(e, FileNotFoundError):
            raise RemoteError(f"push to {display_url(url)}: {redact(str(e), storage_options)}") from None
        if isinstance(e, OSError):
            raise RemoteError(f"push to {display_url(url)} failed: {redact(str(e), storage_options)}") from None
        raise
    res.elapsed_s = time.monotonic() - t0
    return res


def _push(dst: DatasetLocation, local: Path, m: Manifest, data: bytes, files: list[FileEntry],
          res: TransferResult, progress: bool, overwrite: bool) -> None:
    sizes = {f.rel: (local / f.rel).stat().st_size for f in files if (local / f.rel).is_file()}
    missing = [f.rel for f in files if f.rel not in sizes]
    if missing:
        raise FormatError(f"{local}: files named by the manifest are missing: {', '.join(missing[:5])}")
    res.bytes_total = sum(sizes.values()) + len(data)
    target = RemoteTarget.inspect(dst)
    targets = [f.rel for f in files] + [MANIFEST_NAME]
    kind = target.check(data, targets, overwrite)
    remote = {r: target.listing[r] for r in targets if r in target.listing}
    with progress_bar(res.bytes_total, "push", "B", enabled=progress) as bar:
        todo = _changed(dst, local, m, files, sizes, remote, res, bar)
        target.check_inside([f.rel for f in todo])
        if foreign := target.foreign_at([f.rel for f in todo]):
            raise RemoteError(f"{dst.where_of(foreign[0])} exists and packer did not write it; "
                              "move it away or push somewhere else")
        if kind == "same" and not todo:
            res.skipped.append(MANIFEST_NAME)
            if target.journal is not None:  # a push that died between its manifest and its cleanup
                target.finish()
        else:
            target.start(data, targets)
            for f in todo:
                _send(dst, local / f.rel, f.rel, sizes[f.rel], res, bar)
            res.removed = target.remove_stale(targets)
            res.retrying(dst.attempts, lambda: write_bytes(dst.fs, join(dst.root, MANIFEST_NAME), data))
            res.copied.append(MANIFEST_NAME)
            res.bytes_copied += len(data)
            target.finish()
        bar.update(len(data))


def _changed(dst: DatasetLocation, local: Path, m: Manifest, files: list[FileEntry], sizes: dict[str, int],
             remote: dict[str, int], res: TransferResult, bar) -> list[FileEntry]:  # noqa: ANN001 - tqdm
    """The files to send: a cheap size check first, then sha256 where the sizes agree."""
    todo: list[FileEntry] = []
    for f in files:
        try:  # a local copy that disagrees with its manifest is never uploaded
            check_file(m, local, f)
        except ChecksumError as e:
            raise ChecksumError(f"{local}: {e}; run `packer verify {local}`") from None
        same = False
        if remote.get(f.rel) == sizes[f.rel]:
            want = f.sha256 if f.kind == "shard" else sha256_file(local / f.rel)
            got, _ = res.retrying(dst.attempts, lambda f=f: hash_remote(dst.fs, join(dst.root, f.rel)))
            same = got == want
        if same:
            res.skipped.append(f.rel)
            bar.update(sizes[f.rel])
        else:
            todo.append(f)
    return todo


def _send(dst: DatasetLocation, lpath: Path, rel: str, size: int, res: TransferResult, bar) -> None:  # noqa: ANN001
    """Upload one file (retried; the bar goes back on each new try) and check its size there."""
    sent = TryBytes(bar)

    def once() -> None:
        sent.restart()
        upload(dst.fs, lpath, join(dst.root, rel), sent)
        got = dst.fs.info(join(dst.root, rel)).get("size")
        if got != size:
            raise ChecksumError(f"{rel}: uploaded object has {got} bytes, expected {size}")

    res.retrying(dst.attempts, once)
    if sent.n != size:  # stores that report no progress
        bar.update(size - sent.n)
    res.copied.append(rel)
    res.bytes_copied += size


def build_to_url(
    src: str | os.PathLike,
    url: str,
    *,
    staging: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    **build_kwargs: Any,
):  # noqa: ANN201 - (BuildResult, TransferResult)
    """Pack `src` into a local staging folder, then `push` it to `url` (manifest last).

    `staging` keeps the local copy (and lets `resume=True` continue an interrupted build);
    without it a temp folder is used and removed afterwards. A dataset already at `url`
    is only replaced with `overwrite`.
    """
    from packer.build import build_dataset

    _check_destination(url, storage_options, overwrite, attempts)
    tmp = tempfile.mkdtemp(prefix="packer-staging-") if staging is None else None
    stage = Path(tmp) / "dataset" if tmp is not None else Path(staging)
    try:
        res = build_dataset(src, stage, overwrite=overwrite, progress=progress, **build_kwargs)
        tr = push(stage, url, storage_options=storage_options, progress=progress, attempts=attempts,
                  overwrite=overwrite)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res.out = display_url(url)
    return res, tr


def _check_destination(url: str, storage_options: dict[str, Any] | None, overwrite: bool, attempts: int) -> None:
    """Before a build: an unreachable, read-only, occupied or foreign destination fails at once."""
    require_folder(url)
    dst = DatasetLocation(url, storage_options, attempts=attempts)
    require_writable(dst.fs, url)
    try:
        RemoteTarget.inspect(dst).precheck(overwrite)
    except Exception as e:
        if (err := unreachable(e, url, storage_options, attempts)) is not None:
            raise err from None
        raise
