"""Throw-away storage servers on 127.0.0.1 for the remote-storage tests.

Both run in daemon threads of the test process on free ports (bound before the thread
starts, so there is no port race), answer within a bounded start-up wait, are shut down by
their fixtures, and die with the process whatever happens.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0


def _wait_ready(url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"test server at {url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _serving(server) -> Iterator[None]:  # noqa: ANN001
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=10)


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    endpoint: str
    key: str = "testing-key-id"
    secret: str = "testing-secret-key"

    def env(self) -> dict[str, str]:
        """Credentials/endpoint the standard way (environment), for subprocesses too."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def options(self) -> dict:
        """The same as fsspec storage options."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def make_bucket(self, name: str) -> str:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.options())
        fs.mkdir(name)
        return f"s3://{name}"


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Server]:
    """A moto S3 server (its werkzeug app, threaded) on a free 127.0.0.1 port."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log_request(self, *a, **k) -> None:
            pass

        def log(self, *a, **k) -> None:  # werkzeug's logging hook
            pass

    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=True,
                         request_handler=Quiet)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    with _serving(server):
        _wait_ready(endpoint + "/")
        yield S3Server(endpoint)


# ------------------------------------------------------------------------ plain HTTP


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single `Range: bytes=a-b` support, as nginx or an object store serve them."""

    def log_message(self, *args) -> None:  # tests stay quiet
        pass

    def send_head(self):  # noqa: ANN201
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not rng.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        a, _, b = rng[6:].partition("-")
        start = int(a) if a else max(0, size - int(b))
        end = min(size - 1, int(b)) if a and b else size - 1
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(f, end - start + 1)


class _Limited:
    def __init__(self, f, n: int):  # noqa: ANN001
        self.f, self.n = f, n

    def read(self, k: int = -1) -> bytes:
        k = self.n if k < 0 else min(k, self.n)
        b = self.f.read(k)
        self.n -= len(b)
        return b

    def close(self) -> None:
        self.f.close()


@contextlib.contextmanager
def http_files(root: Path) -> Iterator[str]:
    """Serve folder `root` read-only at the returned http://127.0.0.1:PORT base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
    server.daemon_threads = True
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with _serving(server):
        _wait_ready(base + "/")
        yield base


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_s3() as s:
        yield s


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server's credentials in the environment (AWS_ENDPOINT_URL etc.), no config files."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server
