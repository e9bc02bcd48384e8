"""Filesystems for URLs and local paths (fsspec), secrets kept out of messages, and retries.

- `get_fs(url, storage_options)`: the filesystem for a URL; credentials and endpoints come
  from the standard places (AWS_* environment variables including AWS_ENDPOINT_URL, AWS
  config files) or from `storage_options`. Secrets never appear in messages: see `redact`.
- `retry`: bounded exponential backoff (tenacity) on transient network errors only; after the
  last try `unreachable` turns the error into one line naming the endpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from packer.errors import DATA, PackerError

DEFAULT_ATTEMPTS = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_ONLY = ("http", "https")
_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|session|auth|sig", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
T = TypeVar("T")


class RemoteError(PackerError, ValueError):
    """A remote location cannot be used: bad URL or options, read-only, unreachable, corrupt."""


class ChecksumError(RemoteError):
    """A transferred file does not match the size/sha256 the manifest records: the data failed (exit 1)."""

    exit_code = DATA


class OversizeError(ChecksumError):
    """A file longer than its manifest allows: the bytes are there, not damaged in transit, so
    another try reads the same (not retried)."""


# ----------------------------------------------------------------------------- URLs


def is_url(target: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3, gs, http(s), file, ...); False for plain local paths."""
    return bool(_URL.match(str(target)))


def display_url(url: str) -> str:
    """The URL without user:password@ and without a query string (signed URLs carry secrets there)."""
    url = str(url)
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


def join(root: str, rel: str) -> str:
    """`root/rel` for fsspec paths (no protocol, "/" separators)."""
    return f"{root.rstrip('/')}/{rel}" if root else rel


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


# -------------------------------------------------------------------------- secrets


def _secrets(storage_options: dict[str, Any] | None) -> list[str]:
    """Every secret-looking string in the options (under a key like "secret", "token"...) and the env."""
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


# ----------------------------------------------------------------------- filesystems


def get_fs(url: str | os.PathLike, storage_options: dict[str, Any] | None = None):  # noqa: ANN201 - fsspec type
    """(filesystem, path without protocol and trailing slash) for a URL or a local path.

    A fresh filesystem each call (no fsspec instance cache), so listings are never stale. A
    local path is taken as it is (never parsed as a URL chain: "a::b" is a folder name).
    """
    import fsspec

    url = str(url)
    if not is_url(url):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), Path(os.path.abspath(url)).as_posix()
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
    """The filesystem's main protocol name ("s3", "file", "http"...)."""
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def is_local_fs(fs) -> bool:  # noqa: ANN001
    return protocol_of(fs) in ("file", "local")


def require_writable(fs, url: str) -> None:  # noqa: ANN001
    """http(s) is read-only: fail before any work is done."""
    if protocol_of(fs) in READ_ONLY:
        raise RemoteError(f"{display_url(url)}: http(s) URLs are read-only; push/build to s3://, gs:// or file:// instead")


def endpoint_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The endpoint configured for `url` (storage options, then AWS_ENDPOINT_URL* for s3://); "" if none."""
    so = storage_options or {}
    ck = so.get("client_kwargs")
    ep = (ck.get("endpoint_url") if isinstance(ck, dict) else None) or so.get("endpoint_url")
    if not ep and str(url).startswith("s3://"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(ep or "")


def endpoint_of(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The storage endpoint a URL talks to, for messages (credentials and query stripped)."""
    if ep := endpoint_url(url, storage_options):
        return display_url(ep)
    scheme = str(url).split("://", 1)[0] if is_url(url) else "file"
    if scheme in READ_ONLY:
        return display_url(str(url)).split("/", 3)[2] if str(url).count("/") >= 2 else scheme
    return f"the default {scheme}:// endpoint"


def unreachable(e: BaseException, url: str, storage_options: dict[str, Any] | None, attempts: int) -> RemoteError | None:
    """A one-line RemoteError for a storage failure the user must fix at the endpoint: a network failure
    left after the retries (naming the endpoint), missing credentials or region, an endpoint_url that is
    not a URL, options the filesystem rejects; None otherwise. Only the exception's type is shown for
    network failures: their text may carry signed URLs."""
    if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
        return RemoteError(f"--storage-options not accepted for {display_url(url)}: {redact(str(e), storage_options)}")
    if "Credential" in type(e).__name__ or type(e).__name__ in ("NoAuthTokenError", "NoRegionError"):
        return RemoteError(f"{display_url(url)}: no usable credentials or region for {endpoint_of(url, storage_options)} "
                           f"({type(e).__name__}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and "
                           "AWS_DEFAULT_REGION), or pass them in --storage-options")
    if isinstance(e, ValueError) and str(e).startswith("Invalid endpoint"):
        return RemoteError(f"{display_url(url)}: the endpoint_url in --storage-options (or AWS_ENDPOINT_URL) is not a "
                           "valid URL, e.g. http://minio:9000")
    if isinstance(e, RemoteError) or not is_transient(e):
        return None
    return RemoteError(
        f"{display_url(url)}: storage endpoint {endpoint_of(url, storage_options)} is unreachable after "
        f"{attempts} attempt(s) ({type(e).__name__}); check the endpoint address and the network, then rerun"
    )


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
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                        OversizeError)):
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
    """Call `fn` until it succeeds; transient errors (`is_transient`) are retried `attempts - 1`
    times with exponential backoff (base_delay * 2**k, capped at max_delay); any other error,
    and the last transient one, propagates as raised. `on_retry(error, attempt)` runs before each wait."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            on_retry(state.outcome.exception(), state.attempt_number)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, attempts)),
        wait=tenacity.wait_exponential(multiplier=base_delay, max=max_delay),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
