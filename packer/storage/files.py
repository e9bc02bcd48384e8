"""One file at a time on any filesystem: streamed reads, checksummed downloads, whole-or-nothing uploads.

Downloads land atomically (the writers' hidden TempFile, renamed into place once the size
and sha256 match); uploads to object stores are atomic per object (S3 shows an object only
once its PUT / multipart upload completes), to file systems via a temp name + rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from packer.format import TEMP_MARK
from packer.storage.fs import (
    DEFAULT_ATTEMPTS,
    READ_ONLY,
    ChecksumError,
    OversizeError,
    RemoteError,
    display_url,
    get_fs,
    is_local_fs,
    is_transient,
    join,
    protocol_of,
    retry,
)

CHUNK = 8 << 20  # streaming block: few requests, bounded memory
_RENAMING = ("sftp", "ssh", "smb", "webdav")  # file systems without atomic object uploads


def open_read(fs, path: str) -> IO[bytes]:  # noqa: ANN001
    """Sequential streaming read: one GET for http(s), large uncached ranges elsewhere."""
    if protocol_of(fs) in READ_ONLY:
        return fs.open(path, "rb", block_size=0)  # HTTPStreamFile: needs no Range support
    if is_local_fs(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=CHUNK, cache_type="none")


def open_stream(url_of_file: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A binary file object streaming one remote (or local) file front to back.

    Made for tar shards read sequentially (WebDataset): http(s) uses one streaming GET,
    object stores read in CHUNK-sized ranges. The caller closes it.
    """
    fs, path = get_fs(url_of_file, storage_options)
    try:
        return retry(lambda: open_read(fs, path))
    except FileNotFoundError:
        raise RemoteError(f"{display_url(url_of_file)}: not found") from None


def read_bytes(fs, path: str, attempts: int = DEFAULT_ATTEMPTS, limit: int | None = None) -> bytes:  # noqa: ANN001
    """A whole (small) file, with retries; at most `limit + 1` bytes when `limit` is given (so a
    caller can refuse an oversized file without loading it). FileNotFoundError if absent."""

    def once() -> bytes:
        try:
            with open_read(fs, path) as f:
                return f.read() if limit is None else f.read(limit + 1)
        except FileNotFoundError as e:  # fsspec's http reports a refused connection as "not found": retry that
            cause = e.__cause__ or e.__context__
            if cause is not None and is_transient(cause):
                raise cause from None
            raise

    return retry(once, attempts=attempts)


def hash_remote(fs, path: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:  # noqa: ANN001
    """(sha256, size) of a file, streamed (nothing kept)."""
    h, n = hashlib.sha256(), 0
    with open_read(fs, path) as f:
        while b := f.read(CHUNK):
            h.update(b)
            n += len(b)
            if on_bytes:
                on_bytes(len(b))
    return h.hexdigest(), n


def download(
    fs,  # noqa: ANN001
    path: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """Stream `path` into `dest` via a hidden temp file + rename, hashing on the way.

    With `sha256`/`size` given, a mismatch raises ChecksumError and leaves `dest` untouched.
    Reading stops one chunk past `size` (or `max_bytes`): a server sending more than the
    manifest allows cannot fill the disk. Returns the sha256 of the bytes written.
    """
    from packer.writers.base import TempFile

    limit = size if size is not None else max_bytes
    tmp = TempFile(Path(dest))
    try:
        with open_read(fs, path) as f:
            while b := f.read(CHUNK if limit is None else min(CHUNK, limit + 1 - tmp.size)):
                tmp.write(b)
                if on_bytes:
                    on_bytes(len(b))
                if limit is not None and tmp.size > limit:
                    raise OversizeError(f"{path}: longer than the {limit} bytes the manifest allows; stopped reading")
        tmp.finish()
        digest = tmp.hexdigest()
        if size is not None and tmp.size != size:
            raise ChecksumError(f"{path}: {tmp.size} bytes where the manifest says {size}")
        if sha256 is not None and digest != sha256:
            raise ChecksumError(f"{path}: the sha256 of the downloaded bytes does not match the manifest")
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return digest


def _callback(on_bytes: Callable[[int], None]) -> Any:
    """An fsspec callback forwarding byte counts to `on_bytes`."""
    from fsspec.callbacks import Callback

    class _Forward(Callback):
        def relative_update(self, inc: int = 1) -> None:
            on_bytes(inc)

        def absolute_update(self, value: int) -> None:
            pass

    return _Forward()


def upload(fs, local: Path, path: str, on_bytes: Callable[[int], None] | None = None) -> None:  # noqa: ANN001
    """Upload one file so that it appears whole or not at all.

    Object stores (S3, GCS) publish an object only when its upload completes; on a file
    system the bytes go to a hidden temp name that is renamed into place.
    """
    kw = {"callback": _callback(on_bytes)} if on_bytes else {}
    if not (is_local_fs(fs) or protocol_of(fs) in _RENAMING):
        fs.put_file(str(local), path, **kw)
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    tmp = join(parent, f".{path.rsplit('/', 1)[-1]}.{TEMP_MARK}{os.getpid()}.tmp")
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.put_file(str(local), tmp, **kw)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise


def write_bytes(fs, path: str, data: bytes) -> None:  # noqa: ANN001
    """Small file (the manifest) written whole-or-nothing, as `upload`."""
    with tempfile.NamedTemporaryFile(prefix=".packer-", suffix=".tmp") as f:
        f.write(data)
        f.flush()
        upload(fs, Path(f.name), path)


def remote_sizes(fs, root: str, rels: list[str], attempts: int = DEFAULT_ATTEMPTS) -> dict[str, int]:  # noqa: ANN001
    """Sizes of the files `rels` under `root` that exist (one listing where the store can list)."""
    if protocol_of(fs) not in READ_ONLY:
        with contextlib.suppress(FileNotFoundError, NotImplementedError):
            listing = retry(lambda: fs.find(root, detail=True), attempts=attempts)
            prefix = root.rstrip("/") + "/"
            found = {k[len(prefix):] if k.startswith(prefix) else k: v.get("size") for k, v in listing.items()}
            return {r: int(found[r]) for r in rels if found.get(r) is not None}
        return {}
    out = {}
    for r in rels:
        with contextlib.suppress(FileNotFoundError):
            size = retry(lambda r=r: fs.info(join(root, r)).get("size"), attempts=attempts)
            if size is not None:
                out[r] = int(size)
    return out
