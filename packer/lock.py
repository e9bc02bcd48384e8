"""The writer lock of an output folder: `<folder>/.packer.lock`, one packer run at a time.

flock(2) on a file holding {"pid", "host", "since"} (shown to a second run that finds it
busy). Where the file system has no flock the holder's pid decides; a lock file left by a
dead run on this host is taken over with a note; one from another host is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from packer.errors import PackerError

LOCK_NAME = ".packer.lock"
log = logging.getLogger("packer")


class LockError(PackerError, ValueError):
    """The folder is being written by another run, or its lock cannot be taken (one line)."""


class WriterLock:
    """`<folder>/.packer.lock`: flock(2) on a file holding {"pid", "host", "since"}. Unlinked
    (still locked) on release; a taker re-checks that the path still names the file it locked."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> None:
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._try_lock(fd)
                if self._still_linked(fd):
                    self._take(fd, flocked)
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise LockError(f"cannot take the lock {self.path}: it keeps changing; retry")

    def _try_lock(self, fd: int) -> bool:
        """True once flock(2) is held; False where the file system has no flock; LockError if busy."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise LockError(f"{self.path.parent} is being written by another packer run ({_holder(fd)}); "
                            "wait for it to finish, or choose another -o") from None
        except OSError as e:  # a file system without flock: the pid check in _take decides
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int, flocked: bool) -> None:
        """Write our details; a lock file left by a dead run on this host is taken over with a note
        (with flock held its holder is gone, whatever its pid now names; without flock the pid decides)."""
        old = _read_holder(fd)
        if old:
            host, pid = old.get("host"), old.get("pid")
            if host != socket.gethostname():
                raise LockError(f"{self.path} was left by pid {pid} on host {host}; if no packer runs there, "
                                "delete that file and rerun")
            if not flocked and isinstance(pid, int) and _alive(pid) and pid != os.getpid():
                raise LockError(f"{self.path.parent} is being written by another packer run "
                                f"(pid {pid} on host {host}); wait for it to finish, or choose another -o")
            self.note = f"took over the lock of an interrupted run (pid {pid} on this host, no longer running)"
            log.warning(self.note)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._still_linked(self.fd):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int, tries: int = 1) -> dict:
    for _ in range(tries):  # a holder writes its details right after locking
        with contextlib.suppress(OSError, ValueError):
            if isinstance(d := json.loads(os.pread(fd, 4096, 0) or b"{}"), dict) and d:
                return d
        time.sleep(0.01 if tries > 1 else 0)
    return {}


def _holder(fd: int) -> str:
    d = _read_holder(fd, tries=20)
    return f"pid {d.get('pid')} on host {d.get('host')}, since {d.get('since')}" if d else "starting up"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
