"""`packer push` / `packer pull` / `packer build -o URL`: copy packed datasets to and from storage.

Both directions copy the files the manifest names (label arrays, shards, index files, plus
report.json), then the manifest itself, last: a reader never sees a half-copied dataset as
complete. A stale manifest at the destination is removed before anything else is written.
Files already at the destination are skipped when their size and sha256 match (shards:
the manifest's sha256; other files: the source's, hashed streaming); everything copied is
checked against the manifest; transient network errors are retried with bounded backoff.
Interrupted and run again, a transfer sends only what is still missing or different.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packer.format import (
    MANIFEST_NAME,
    REPORT_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    atomic_write_bytes,
    check_split_name,
    dumps_json,
    sha256_file,
)
from packer.output import STATE_DIR, is_write_error, output_folder
from packer.remote import (
    DEFAULT_ATTEMPTS,
    ChecksumError,
    RemoteError,
    display_url,
    download,
    get_fs,
    hash_remote,
    join,
    read_manifest_bytes,
    redact,
    remote_sizes,
    require_writable,
    retry,
    unreachable,
    upload,
    write_bytes,
)

PULL_NAME = "pull.json"  # in the journal folder of an unfinished pull: {"url": where from}


@dataclass
class FileEntry:
    """One file of a dataset; `sha256`/`bytes` are known for shards (from the manifest)."""

    rel: str
    kind: str  # "shard", "index", "labels", "report"
    bytes: int | None = None
    sha256: str | None = None
    shard: str | None = None  # for an index: its shard's rel path


@dataclass
class TransferResult:
    src: str
    dst: str
    files: int = 0
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    bytes_total: int = 0
    retries: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["elapsed_s"] = round(self.elapsed_s, 3)
        d["mb_per_s"] = round(self.bytes_copied / 1e6 / self.elapsed_s, 2) if self.elapsed_s > 0 else None
        return d


def dataset_files(m: Manifest, with_report: bool = True) -> list[FileEntry]:
    """The files of a packed dataset in copy order (the manifest is not listed: it goes last)."""
    out: list[FileEntry] = []
    for s in m.splits.values():
        out.append(FileEntry(s.labels, "labels"))
        for sh in s.shards:
            out.append(FileEntry(sh.path, "shard", sh.bytes, sh.sha256))
            if sh.index:
                out.append(FileEntry(sh.index, "index", shard=sh.path))
    if with_report:
        out.append(FileEntry(REPORT_NAME, "report"))
    return out


def _bar(total: int, enabled: bool, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


def _retrying(res: TransferResult, attempts: int, fn: Callable[[], Any]) -> Any:
    def note(_e: BaseException, _k: int) -> None:
        res.retries += 1

    return retry(fn, attempts=attempts, on_retry=note)


def format_transfer_summary(s: dict[str, Any], verb: str) -> str:
    """The lines printed after push/pull."""
    rate = f", {s['mb_per_s']:.1f} MB/s" if s.get("mb_per_s") else ""
    return "\n".join([
        f"{verb} {s['src']} -> {s['dst']}",
        f"  files   {len(s['copied'])} copied, {len(s['skipped'])} already there (size+sha256 match), {s['files']} in all",
        f"  bytes   {s['bytes_copied'] / 1e6:.1f} MB copied of {s['bytes_total'] / 1e6:.1f} MB{rate}",
        f"  retries {s['retries']}, time {s['elapsed_s']:.1f} s",
    ])


def check_file(m: Manifest, root: Path, f: FileEntry, path: Path | None = None) -> None:
    """Raise ChecksumError unless the local file agrees with the manifest: shards by size and
    sha256, index files by the index recomputed from their shard (already at `root`), label
    arrays by their sample and box counts. report.json has no reference and passes."""
    from packer.writers import make_index

    path = path or root / f.rel
    if f.kind == "shard":
        if path.stat().st_size != f.bytes or sha256_file(path) != f.sha256:
            raise ChecksumError(f"{f.rel}: size or sha256 differs from the manifest")
    elif f.kind == "index":
        try:
            ok = path.read_bytes() == make_index(m.format, root / f.shard)
        except (OSError, FormatError):
            ok = False
        if not ok:
            raise ChecksumError(f"{f.rel}: does not match the index recomputed from {f.shard}")
    elif f.kind == "labels":
        split = next(s for s in m.splits.values() if s.labels == f.rel)
        try:
            la = LabelArrays.load(path)
        except FormatError as e:
            raise ChecksumError(f"{f.rel}: {e}") from None
        if len(la) != split.num_samples or len(la.cls) != split.num_boxes:
            raise ChecksumError(f"{f.rel}: sample/box counts differ from the manifest")


# ------------------------------------------------------------------------------- push


def push(
    local: str | os.PathLike,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    filesystem: Any = None,
) -> TransferResult:
    """Upload the packed dataset in folder `local` to `url`, manifest last.

    Local shards are checked against the manifest before they are sent (a corrupt local
    copy is never uploaded); remote files whose size and sha256 already match are kept.
    `filesystem` overrides the fsspec filesystem made from `url` (tests inject faults this way).
    """
    t0 = time.monotonic()
    local = Path(local)
    manifest_path = local / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FormatError(f"{local}: no {MANIFEST_NAME}: not a packed dataset, or its build did not finish")
    data = manifest_path.read_bytes()
    try:
        m = Manifest.from_dict(json.loads(data))
    except json.JSONDecodeError as e:
        raise FormatError(f"{manifest_path} is not valid JSON: {e}") from None
    fs, root = (filesystem, filesystem._strip_protocol(url).rstrip("/")) if filesystem is not None else get_fs(
        url, storage_options)
    require_writable(fs, url)
    files = [f for f in dataset_files(m) if f.kind != "report" or (local / REPORT_NAME).is_file()]
    res = TransferResult(str(local), display_url(url), files=len(files) + 1)
    try:
        _push(fs, root, local, m, data, files, res, progress, attempts)
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


def _push(fs, root: str, local: Path, m: Manifest, data: bytes, files: list[FileEntry],  # noqa: ANN001
          res: TransferResult, progress: bool, attempts: int) -> None:
    sizes = {f.rel: (local / f.rel).stat().st_size for f in files if (local / f.rel).is_file()}
    missing = [f.rel for f in files if f.rel not in sizes]
    if missing:
        raise FormatError(f"{local}: files named by the manifest are missing: {', '.join(missing[:5])}")
    res.bytes_total = sum(sizes.values()) + len(data)
    remote = remote_sizes(fs, root, [f.rel for f in files] + [MANIFEST_NAME], attempts)
    with _bar(res.bytes_total, progress, "push") as bar:
        # plan: cheap size check first, then sha256 where the sizes agree
        todo: list[FileEntry] = []
        for f in files:
            lpath = local / f.rel
            try:  # a local copy that disagrees with its manifest is never uploaded
                check_file(m, local, f)
            except ChecksumError as e:
                raise FormatError(f"{local}: {e}; run `packer verify {local}`") from None
            same = False
            if remote.get(f.rel) == sizes[f.rel]:
                want = f.sha256 if f.kind == "shard" else sha256_file(lpath)
                got, _ = _retrying(res, attempts, lambda f=f: hash_remote(fs, join(root, f.rel)))
                same = got == want
            if same:
                res.skipped.append(f.rel)
                bar.update(sizes[f.rel])
            else:
                todo.append(f)
        manifest_same = False
        if MANIFEST_NAME in remote and remote[MANIFEST_NAME] == len(data):
            got, _ = _retrying(res, attempts, lambda: hash_remote(fs, join(root, MANIFEST_NAME)))
            manifest_same = got == hashlib.sha256(data).hexdigest()
        if todo and MANIFEST_NAME in remote:
            # the old manifest must not vouch for files that are about to change
            _retrying(res, attempts, lambda: fs.rm_file(join(root, MANIFEST_NAME)))
            manifest_same = False
        for f in todo:
            _send(fs, root, local / f.rel, f.rel, sizes[f.rel], res, bar, attempts)
        if manifest_same:
            res.skipped.append(MANIFEST_NAME)
            bar.update(len(data))
        else:
            _retrying(res, attempts, lambda: write_bytes(fs, join(root, MANIFEST_NAME), data))
            res.copied.append(MANIFEST_NAME)
            res.bytes_copied += len(data)
            bar.update(len(data))


def _send(fs, root: str, lpath: Path, rel: str, size: int, res: TransferResult, bar, attempts: int) -> None:  # noqa: ANN001
    sent = [0]

    def on_bytes(n: int) -> None:
        sent[0] += n
        bar.update(n)

    def once() -> None:
        bar.update(-sent[0])
        sent[0] = 0
        upload(fs, lpath, join(root, rel), on_bytes)
        got = fs.info(join(root, rel)).get("size")
        if got != size:
            raise ChecksumError(f"{rel}: uploaded object has {got} bytes, expected {size}")

    _retrying(res, attempts, once)
    if sent[0] != size:  # stores that report no progress
        bar.update(size - sent[0])
    res.copied.append(rel)
    res.bytes_copied += size


# ------------------------------------------------------------------------------- pull


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
    if filesystem is not None:
        fs, root = filesystem, filesystem._strip_protocol(url).rstrip("/")
        data = retry(lambda: fs.cat_file(join(root, MANIFEST_NAME)), attempts=attempts)
        m = Manifest.from_dict(json.loads(data))
    else:
        m, data = read_manifest_bytes(url, storage_options)
        fs, root = get_fs(url, storage_options)
    for split in m.splits:
        check_split_name(split)
    files = dataset_files(m)
    res = TransferResult(display_url(url), str(local), files=len(files) + 1)
    marker = {"url": display_url(url)}
    with output_folder(local, hint="free some space, then pull again (files already copied are kept)") as folder:
        same = _same_pull(folder.root, data, marker)
        folder.prepare(overwrite=overwrite, same=same, keep=[f.rel for f in files], verb="replace")
        folder.start()
        atomic_write_bytes(folder.state_dir / PULL_NAME, dumps_json(marker))
        folder.claim(*(f.rel for f in files), MANIFEST_NAME)
        lman = folder.root / MANIFEST_NAME
        if lman.is_file() and lman.read_bytes() != data:
            lman.unlink()  # the folder stops claiming to be complete before anything changes
        with _pull_errors(url, storage_options, folder.root):
            _pull_files(fs, root, folder.root, m, files, res, progress, attempts, len(data))
        atomic_write_bytes(lman, data)
        res.copied.append(MANIFEST_NAME)
        res.bytes_copied += len(data)
        folder.finish()
    res.elapsed_s = time.monotonic() - t0
    return res


@contextlib.contextmanager
def _pull_errors(url: str, storage_options: dict[str, Any] | None, local: Path) -> Iterator[None]:
    """Storage errors -> one RemoteError line; local disk errors pass on to output_folder."""
    try:
        yield
    except FileNotFoundError as e:
        raise RemoteError(f"pull from {display_url(url)}: a file named by the manifest is missing "
                          f"({redact(str(e), storage_options)})") from None
    except ChecksumError:
        raise
    except OSError as e:
        if is_write_error(e, local):
            raise  # disk full / read-only: output_folder turns it into one line
        raise RemoteError(f"pull from {display_url(url)} failed: {redact(str(e), storage_options)}") from None


def _same_pull(root: Path, data: bytes, marker: dict[str, str]) -> bool:
    """`root` holds this very dataset, or an unfinished pull from the same URL (safe to continue:
    every file is checked against the manifest)."""
    with contextlib.suppress(OSError):
        if (root / MANIFEST_NAME).read_bytes() == data:
            return True
    with contextlib.suppress(OSError, ValueError):
        return json.loads((root / STATE_DIR / PULL_NAME).read_bytes()) == marker
    return False


def _pull_files(fs, root: str, local: Path, m: Manifest, files: list[FileEntry],  # noqa: ANN001
                res: TransferResult, progress: bool, attempts: int, manifest_bytes: int) -> None:
    remote = remote_sizes(fs, root, [f.rel for f in files], attempts)
    if REPORT_NAME not in remote:
        files = [f for f in files if f.kind != "report"]
        res.files -= 1
    res.bytes_total = sum(remote.get(f.rel, f.bytes or 0) for f in files) + manifest_bytes
    with _bar(res.bytes_total, progress, "pull") as bar:
        for f in files:
            path = local / f.rel
            size = remote.get(f.rel, f.bytes)
            if path.is_file() and path.stat().st_size == size and _local_same(fs, root, m, local, f, path, res, attempts):
                res.skipped.append(f.rel)
                bar.update(size or 0)
                continue
            got = [0]

            def on_bytes(n: int, got=got) -> None:
                got[0] += n
                bar.update(n)

            def once(f=f, path=path, got=got, on_bytes=on_bytes) -> None:
                bar.update(-got[0])
                got[0] = 0
                download(fs, join(root, f.rel), path, sha256=f.sha256, size=f.bytes, on_bytes=on_bytes)
                if f.kind != "shard":
                    try:
                        check_file(m, local, f, path)
                    except ChecksumError:
                        path.unlink(missing_ok=True)
                        raise

            _retrying(res, attempts, once)
            res.copied.append(f.rel)
            res.bytes_copied += got[0]
        bar.update(manifest_bytes)


def _local_same(fs, root: str, m: Manifest, local: Path, f: FileEntry, path: Path,  # noqa: ANN001
                res: TransferResult, attempts: int) -> bool:
    """A local file of the right size also matches the manifest (or, for report.json, the remote file)."""
    if f.kind == "report":
        return sha256_file(path) == _retrying(res, attempts, lambda: hash_remote(fs, join(root, f.rel)))[0]
    try:
        check_file(m, local, f, path)
        return True
    except ChecksumError:
        return False


# -------------------------------------------------------------------- build to a URL


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

    fs, root = get_fs(url, storage_options)
    require_writable(fs, url)
    try:  # before the build: an unreachable or occupied destination fails at once
        with contextlib.suppress(FileNotFoundError):
            if retry(lambda: fs.info(join(root, MANIFEST_NAME)), attempts=attempts) and not overwrite:
                raise RemoteError(f"{display_url(url)} already holds a packed dataset; pass --overwrite to replace it")
    except Exception as e:
        if (err := unreachable(e, url, storage_options, attempts)) is not None:
            raise err from None
        raise
    tmp = None
    if staging is None:
        tmp = tempfile.mkdtemp(prefix="packer-staging-")
        stage = Path(tmp) / "dataset"
    else:
        stage = Path(staging)
    try:
        res = build_dataset(src, stage, overwrite=overwrite, progress=progress,
                            **build_kwargs)
        tr = push(stage, url, storage_options=storage_options, progress=progress, attempts=attempts)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res.out = display_url(url)
    return res, tr
