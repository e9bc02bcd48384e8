"""Packed datasets on network storage, through fsspec (s3://, gs://, file://, http(s):// read-only).

The helpers here are the storage layer under `packer push/pull`, `build -o URL`, `verify URL`,
`info URL` and the trainer's remote data path:

- `get_fs(url, storage_options)`: the filesystem for a URL; credentials and endpoints come
  from the standard places (AWS_* environment variables including AWS_ENDPOINT_URL, AWS
  config files) or from `storage_options`. Secrets never appear in messages: see `redact`.
- `download` / `upload`: one file, streamed and sha256-hashed; downloads land atomically
  (temp file + rename); uploads to object stores are atomic per object (S3 shows an object
  only once its PUT / multipart upload completes), to file systems via temp name + rename.
- `retry`: bounded exponential backoff on transient network errors only.
- `open_manifest`, `fetch_labels`, `cache_shards`, `open_stream`: what a training job needs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from packer.format import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    ShardInfo,
    sha256_file,
)

CHUNK = 8 << 20  # streaming block: few requests, bounded memory
DEFAULT_ATTEMPTS = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_READ_ONLY = ("http", "https")
_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|session|auth|sig", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
T = TypeVar("T")


class RemoteError(ValueError):
    """A remote location cannot be used: bad URL or options, read-only, unreachable, corrupt."""


class ChecksumError(RemoteError):
    """A transferred file does not match the size/sha256 the manifest records."""


class CacheFullError(RemoteError):
    """`cache_shards` cannot fit the requested shards under `max_bytes`."""


# ----------------------------------------------------------------------------- URLs


def is_url(target: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3, gs, http(s), file, ...); False for plain local paths."""
    return bool(_URL.match(str(target)))


def display_url(url: str) -> str:
    """The URL without user:password@ and without a query string (signed URLs carry secrets there)."""
    url = str(url)
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options`: a JSON object, or `@path` to a JSON file (keeps secrets out of `ps`)."""
    if not text:
        return {}
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        value = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        # the message names neither the text nor the parse position's context: it may hold secrets
        raise RemoteError(f"--storage-options must be a JSON object or @file.json ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise RemoteError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _secrets(storage_options: dict[str, Any] | None) -> list[str]:
    out: list[str] = []

    def walk(obj: Any, sensitive: bool) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, sensitive or bool(_SECRET_KEY.search(str(k))))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, sensitive)
        elif sensitive and isinstance(obj, str) and len(obj) >= 4:
            out.append(obj)

    walk(storage_options or {}, False)
    out += [v for k in _SECRET_ENV if len(v := os.environ.get(k, "")) >= 4]
    return sorted(set(out), key=len, reverse=True)


def redact(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """`text` with credentials (secret storage options, AWS env secrets, URL passwords) masked."""
    for s in _secrets(storage_options):
        text = text.replace(s, "***")
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\1***@", text)


def get_fs(url: str | os.PathLike, storage_options: dict[str, Any] | None = None):  # noqa: ANN201 - fsspec type
    """(filesystem, path without protocol and trailing slash) for a URL or a local path.

    A fresh filesystem each call (no fsspec instance cache), so listings are never stale.
    """
    import fsspec

    url = str(url)
    so = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **so)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        raise RemoteError(f"no filesystem installed for {scheme}:// ({redact(str(e), so)})") from None
    except (TypeError, ValueError) as e:
        raise RemoteError(f"cannot open {display_url(url)}: {redact(str(e), so)}") from None
    return fs, path.rstrip("/") if path not in ("/", "") else path


def protocol_of(fs) -> str:  # noqa: ANN001
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def is_local_fs(fs) -> bool:  # noqa: ANN001
    return protocol_of(fs) in ("file", "local")


def require_writable(fs, url: str) -> None:  # noqa: ANN001
    """http(s) is read-only: fail before any work is done."""
    if protocol_of(fs) in _READ_ONLY:
        raise RemoteError(f"{display_url(url)}: http(s) URLs are read-only; push/build to s3://, gs:// or file:// instead")


def endpoint_of(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The storage endpoint a URL talks to, for messages (credentials and query stripped)."""
    so = storage_options or {}
    ck = so.get("client_kwargs")
    ep = (ck.get("endpoint_url") if isinstance(ck, dict) else None) or so.get("endpoint_url")
    if not ep and str(url).startswith("s3://"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if ep:
        return display_url(str(ep))
    scheme = str(url).split("://", 1)[0] if is_url(url) else "file"
    if scheme in _READ_ONLY:
        return display_url(str(url)).split("/", 3)[2] if str(url).count("/") >= 2 else scheme
    return f"the default {scheme}:// endpoint"


def unreachable(e: BaseException, url: str, storage_options: dict[str, Any] | None, attempts: int) -> RemoteError | None:
    """A one-line RemoteError naming the endpoint when `e` is a network failure left after the
    retries (None otherwise). Only the exception's type is shown: its text may carry signed URLs."""
    if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
        return RemoteError(f"--storage-options not accepted for {display_url(url)}: {redact(str(e), storage_options)}")
    if isinstance(e, RemoteError) or not is_transient(e):
        return None
    return RemoteError(
        f"{display_url(url)}: storage endpoint {endpoint_of(url, storage_options)} is unreachable after "
        f"{attempts} attempt(s) ({type(e).__name__}); check the endpoint address and the network, then rerun"
    )


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if root else rel


# ---------------------------------------------------------------------------- retries


_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ClientPayloadError", "ServerDisconnectedError",
    "ClientConnectorError", "ClientOSError", "ServerTimeoutError", "ClientConnectionError",
}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
                    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}


def is_transient(exc: BaseException) -> bool:
    """Network hiccups worth another try; missing files, permissions and bad input are not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, ChecksumError)):
        return True  # a checksum mismatch right after a transfer: bytes damaged in transit
    if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
        return True
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and not isinstance(exc, RemoteError) and is_transient(cause)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Call `fn` until it succeeds; transient errors are retried `attempts - 1` times with
    exponential backoff (base_delay * 2**k, capped at max_delay); others propagate at once."""
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:
            if k == attempts - 1 or not is_transient(e):
                raise
            if on_retry is not None:
                on_retry(e, k + 1)
            time.sleep(min(max_delay, base_delay * 2**k))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------ file transfer


def _open_read(fs, path: str) -> IO[bytes]:  # noqa: ANN001
    """Sequential streaming read: one GET for http(s), large uncached ranges elsewhere."""
    if protocol_of(fs) in _READ_ONLY:
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
        return retry(lambda: _open_read(fs, path))
    except FileNotFoundError:
        raise RemoteError(f"{display_url(url_of_file)}: not found") from None


def read_bytes(fs, path: str, attempts: int = DEFAULT_ATTEMPTS) -> bytes:  # noqa: ANN001
    """A whole (small) remote file, with retries; FileNotFoundError if absent."""

    def once() -> bytes:
        with _open_read(fs, path) as f:
            return f.read()

    return retry(once, attempts=attempts)


def hash_remote(fs, path: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:  # noqa: ANN001
    """(sha256, size) of a remote file, streamed (nothing kept)."""
    h, n = hashlib.sha256(), 0
    with _open_read(fs, path) as f:
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
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """Stream `path` into `dest` via a hidden temp file + rename, hashing on the way.

    With `sha256`/`size` given, a mismatch raises ChecksumError and leaves `dest` untouched.
    Returns the sha256 of the bytes written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    h, n = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, _open_read(fs, path) as f:
            while b := f.read(CHUNK):
                out.write(b)
                h.update(b)
                n += len(b)
                if on_bytes:
                    on_bytes(len(b))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if (size is not None and n != size) or (sha256 is not None and digest != sha256):
            raise ChecksumError(f"{path}: downloaded {n} bytes with a sha256 that does not match the manifest")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


class _Progress:
    """fsspec callback adapter: forwards byte counts to `on_bytes`."""

    def __new__(cls, on_bytes: Callable[[int], None]):  # noqa: ANN204
        from fsspec.callbacks import Callback

        class _CB(Callback):
            def relative_update(self, inc: int = 1) -> None:
                on_bytes(inc)

            def absolute_update(self, value: int) -> None:
                pass

        return _CB()


def upload(fs, local: Path, path: str, on_bytes: Callable[[int], None] | None = None) -> None:  # noqa: ANN001
    """Upload one file so that it appears whole or not at all.

    Object stores (S3, GCS) publish an object only when its upload completes; on a file
    system the bytes go to a hidden temp name that is renamed into place.
    """
    cb = _Progress(on_bytes) if on_bytes else None
    kw = {"callback": cb} if cb is not None else {}
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if is_local_fs(fs) or protocol_of(fs) in ("sftp", "ssh", "smb", "webdav"):
        tmp = join(parent, f".{path.rsplit('/', 1)[-1]}.{os.getpid()}.tmp")
        if parent:
            fs.makedirs(parent, exist_ok=True)
        try:
            fs.put_file(str(local), tmp, **kw)
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm_file(tmp)
            raise
    else:
        fs.put_file(str(local), path, **kw)


def write_bytes(fs, path: str, data: bytes) -> None:  # noqa: ANN001
    """Small file (the manifest) written whole-or-nothing, as `upload`."""
    with tempfile.NamedTemporaryFile(prefix=".packer-", suffix=".tmp") as f:
        f.write(data)
        f.flush()
        upload(fs, Path(f.name), path)


def remote_sizes(fs, root: str, rels: list[str], attempts: int = DEFAULT_ATTEMPTS) -> dict[str, int]:  # noqa: ANN001
    """Sizes of the files `rels` under `root` that exist (one listing where the store can list)."""
    if protocol_of(fs) not in _READ_ONLY:
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


# ------------------------------------------------------------------- reading datasets


def open_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate `<url>/manifest.json` (FormatError if absent: not a complete dataset)."""
    m, _ = read_manifest_bytes(url, storage_options)
    return m


def read_manifest_bytes(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Manifest, bytes]:
    """The manifest and its exact bytes (push/pull copy them unchanged)."""
    fs, root = get_fs(url, storage_options)
    try:
        data = read_bytes(fs, join(root, MANIFEST_NAME))
    except FileNotFoundError:
        raise FormatError(
            f"{display_url(url)}/{MANIFEST_NAME} not found: not a packed dataset, or its build/upload did not finish"
        ) from None
    except Exception as e:
        raise RemoteError(f"cannot read {display_url(url)}/{MANIFEST_NAME}: {redact(str(e), storage_options)}") from None
    try:
        return Manifest.from_dict(json.loads(data)), data
    except json.JSONDecodeError as e:
        raise FormatError(f"{display_url(url)}/{MANIFEST_NAME} is not valid JSON: {e}") from None


def fetch_labels(
    url: str, split: str, storage_options: dict[str, Any] | None = None, manifest: Manifest | None = None
) -> LabelArrays:
    """The label arrays of `split` read straight from `<url>/<split>/labels.npz` (no local copy)."""
    m = manifest or open_manifest(url, storage_options)
    if split not in m.splits:
        raise RemoteError(f"{display_url(url)} has no split {split!r} (it has {', '.join(m.splits)})")
    info = m.splits[split]
    fs, root = get_fs(url, storage_options)
    try:
        data = read_bytes(fs, join(root, info.labels))
    except FileNotFoundError:
        raise FormatError(f"{display_url(url)}/{info.labels} not found") from None
    la = LabelArrays.load(io.BytesIO(data))
    if len(la) != info.num_samples:
        raise FormatError(f"{display_url(url)}/{info.labels}: {len(la)} samples, manifest says {info.num_samples}")
    return la


@contextlib.contextmanager
def fetched(fs, root: str, rel: str | None) -> Iterator[Path | None]:  # noqa: ANN001
    """A temporary local copy of `root/rel` for the duration of the block (None if absent)."""
    if rel is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="packer-fetch-") as d:
        dest = Path(d) / rel.rsplit("/", 1)[-1]
        try:
            retry(lambda: download(fs, join(root, rel), dest))
        except FileNotFoundError:
            yield None
            return
        yield dest


def dataset_info_url(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`packer.info.dataset_info` of a remote dataset (reads the manifest and label arrays only)."""
    from packer.info import dataset_info

    m, data = read_manifest_bytes(url, storage_options)
    fs, root = get_fs(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="packer-info-") as d:
        (Path(d) / MANIFEST_NAME).write_bytes(data)
        for s in m.splits.values():
            try:
                retry(lambda s=s: download(fs, join(root, s.labels), Path(d) / s.labels))
            except FileNotFoundError:
                raise FormatError(f"{display_url(url)}/{s.labels} not found") from None
        info = dataset_info(d)
    info["root"] = display_url(url)
    return info


# ------------------------------------------------------------------------ shard cache


def url_key(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Cache folder name for a dataset URL: hash of the URL (no credentials) and its endpoint."""
    so = storage_options or {}
    endpoint = (so.get("client_kwargs") or {}).get("endpoint_url") or so.get("endpoint_url") or ""
    if str(url).startswith("s3://") and not endpoint:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    ident = display_url(str(url)).rstrip("/") + "|" + display_url(endpoint)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock between processes (ranks) on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached_ok(fmt: str, local: Path, sh: ShardInfo) -> bool:
    from packer.writers import make_index

    try:
        if local.stat().st_size != sh.bytes or sha256_file(local) != sh.sha256:
            return False
        if sh.index:
            idx = local.with_name(local.name + INDEX_SUFFIX)
            return idx.is_file() and idx.read_bytes() == make_index(fmt, local)
    except (OSError, FormatError):
        return False
    return True


def _cache_files(cache_dir: Path) -> list[tuple[Path, int, float]]:
    """Every cached data file (not locks, not temp files): (path, size, last use)."""
    out = []
    for p in cache_dir.rglob("*"):
        if p.name.startswith(".") or ".locks" in p.parts or not p.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            out.append((p, st.st_size, st.st_mtime))
    return out


def _make_room(cache_dir: Path, need: int, max_bytes: int, keep: set[Path], strict: bool = True) -> None:
    """Evict least recently used files outside `keep` until `need` more bytes fit."""
    files = _cache_files(cache_dir)
    total = sum(s for _, s, _ in files)
    for p, s, _ in sorted(files, key=lambda t: t[2]):
        if total + need <= max_bytes:
            return
        if p in keep:
            continue
        p.unlink(missing_ok=True)
        total -= s
    if total + need > max_bytes and strict:
        raise CacheFullError(
            f"shard cache {cache_dir} cannot hold {need} more bytes under --cache-max {max_bytes} "
            f"({total} bytes are in use by this request); raise the limit"
        )


def cache_shards(
    url: str,
    shard_paths: list[str],
    cache_dir: str | os.PathLike,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    *,
    manifest: Manifest | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, Path]:
    """Make local, checksum-verified copies of some shards of the dataset at `url`.

    `shard_paths` are manifest-relative shard paths (e.g. "train/train-00003.tfrecord"); each
    shard and its index file land in `cache_dir/<url_key(url)>/<shard path>` (the index
    next to it, as `packer.writers.index_path` names it). A cached copy is reused when its
    size and sha256 equal the manifest's (and its index equals the index recomputed from
    it); otherwise it is downloaded again. With `max_bytes`, least recently used files that
    are not part of this request are evicted to stay under the limit (the whole
    `cache_dir` counts). Several processes may call this at once: each file is downloaded
    under a per-file lock into a temp file and renamed into place. Returns {shard path: local path}.
    """
    from packer.writers import make_index

    m = manifest or open_manifest(url, storage_options)
    by_path = {sh.path: sh for s in m.splits.values() for sh in s.shards}
    unknown = [p for p in shard_paths if p not in by_path]
    if unknown:
        raise RemoteError(f"{display_url(url)}: not shards of this dataset: {', '.join(unknown[:5])}")
    cache_dir = Path(cache_dir)
    root = cache_dir / url_key(url, storage_options)
    wanted = list(dict.fromkeys(shard_paths))
    locals_ = {p: root / p for p in wanted}
    keep = set(locals_.values()) | {q.with_name(q.name + INDEX_SUFFIX) for q in locals_.values()}
    if max_bytes is not None:
        need_all = sum(by_path[p].bytes for p in wanted)
        if need_all > max_bytes:
            raise CacheFullError(f"the requested shards need {need_all} bytes, more than the cache limit {max_bytes}")
    fs, rroot = get_fs(url, storage_options)
    out: dict[str, Path] = {}
    for p in wanted:
        sh, local = by_path[p], locals_[p]
        with _flock(root / ".locks" / (hashlib.sha1(p.encode()).hexdigest()[:16] + ".lock")):
            if not _cached_ok(m.format, local, sh):
                if max_bytes is not None:
                    with _flock(cache_dir / ".locks" / "evict.lock"):
                        present = local.stat().st_size if local.is_file() else 0
                        _make_room(cache_dir, max(0, sh.bytes - present), max_bytes, keep)
                retry(lambda sh=sh, local=local: download(fs, join(rroot, sh.path), local, sha256=sh.sha256,
                                                           size=sh.bytes, on_bytes=on_bytes))
                if sh.index:
                    idx = local.with_name(local.name + INDEX_SUFFIX)
                    retry(lambda sh=sh, idx=idx: download(fs, join(rroot, sh.index), idx))
                    if idx.read_bytes() != make_index(m.format, local):
                        idx.unlink(missing_ok=True)
                        raise ChecksumError(f"{display_url(url)}/{sh.index} does not match its shard")
            # last use = mtime: the LRU order for eviction
            os.utime(local)
            if sh.index:
                os.utime(local.with_name(local.name + INDEX_SUFFIX))
        out[p] = local
    if max_bytes is not None:  # index files were not known in advance: trim again
        with _flock(cache_dir / ".locks" / "evict.lock"):
            _make_room(cache_dir, 0, max_bytes, keep, strict=False)
    return out
