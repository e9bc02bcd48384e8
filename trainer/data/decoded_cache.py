"""A node-shared decoded cache: a split's JPEGs decoded once into one memory-mapped uint8 store.

``make_loader(..., cache="ram")`` keeps the store in ``/dev/shm`` (RAM, shared by every worker of
every rank on the node through the page cache: one copy per node, not one per rank as
ultralytics' ``cache='ram'``), ``cache="disk"`` in ``<cache_dir>/decoded`` (local disk). Layout of
a store folder (named after the dataset's location and split):

- ``store.u8``: every sample's RGB pixels, HWC, at the packed size, back to back in label order
  (sample i starts at ``3 * sum(h*w of samples < i)``; sizes from the label arrays' ``hw``);
- ``meta.json``: format version, the manifest's shard sha256s, sample count, byte size, and the
  samples that did not decode (they are substituted and counted by the loader, as without cache).
  Written last and atomically: a store without a matching ``meta.json`` is never used.
- ``lock``: ``flock``-ed while a process checks or builds the store. The first rank to take it
  builds (in parallel, one process per CPU of the node); the others wait on the lock, then find a
  valid store and map it. A store whose meta does not match the manifest (stale) or whose file
  has the wrong size (cut short) is rebuilt.

Before building, the size is estimated from the label arrays and the request refused with one
line (`CacheError`) if it would not fit in the free RAM (``ram``: ``/dev/shm`` and available
memory) or free disk, keeping a margin.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from packer.errors import PackerError
from packer.format import atomic_write_bytes
from trainer.data.common import SplitData, default_cache_dir

log = logging.getLogger("trainer.data")

VERSION = 1
KINDS = ("ram", "disk")
SHM = Path("/dev/shm")
MARGIN = 0.10  # of the free space kept free, on top of RESERVE
RESERVE = 1 << 30  # bytes always left free (RAM for the training processes; disk for everything else)


class CacheError(PackerError, ValueError):
    """The decoded cache cannot be used as asked (does not fit, unknown kind, ...)."""


def store_base(kind: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of every store of `kind`: /dev/shm/packer-trainer-<uid> (one per user: /dev/shm is
    shared by the node's users) or <cache_dir>/decoded."""
    if kind not in KINDS:
        raise CacheError(f"unknown cache {kind!r}: choose one of {', '.join(KINDS)} (or none)")
    return SHM / f"packer-trainer-{os.getuid()}" if kind == "ram" else Path(cache_dir or default_cache_dir()) / "decoded"


def store_dir(data: SplitData, kind: str, cache_dir: str | Path | None = None) -> Path:
    """Where the store of this split lives: `store_base(kind, cache_dir)`/<split>-<hash of the location>."""
    where = data.url or str(data.root.resolve())
    tag = hashlib.sha256(f"{where}\0{data.name}".encode()).hexdigest()[:16]
    return store_base(kind, cache_dir) / f"{data.name}-{tag}"


def needed_bytes(data: SplitData) -> int:
    """The store's size from the label arrays: 3 bytes per stored pixel."""
    hw = data.labels.hw.astype(np.int64)
    return int((hw[:, 0] * hw[:, 1]).sum() * 3)


def free_bytes(where: Path, kind: str) -> int:
    """Free space for a store under `where`: free disk, and for RAM also the available memory."""
    free = shutil.disk_usage(where).free
    if kind == "ram":
        free = min(free, _mem_available())
    return int(free)


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: /dev/shm's own free space decides


def check_fits(need: int, free: int, kind: str, where: Path, base: Path | None = None) -> None:
    """Refuse (one line) a store of `need` bytes when it would leave less than the margin free;
    the line names what earlier stores under `base` hold (the trainer never deletes one)."""
    room = int(free * (1 - MARGIN)) - RESERVE
    if need > room:
        instead = "the disk cache or no cache" if kind == "ram" else "no cache"
        held = _stores_size(base) if base is not None else 0
        old = f"; earlier stores in {base} hold {held / 2**30:.1f} GiB (rm -r the ones no run needs)" if held else ""
        raise CacheError(
            f"the decoded {kind} cache needs {need / 2**30:.1f} GiB but {where} has {free / 2**30:.1f} GiB free "
            f"({max(room, 0) / 2**30:.1f} GiB usable after a {MARGIN:.0%} + 1 GiB margin): use {instead}{old}"
        )


def _stores_size(base: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(p.stat().st_size for p in base.glob("*/store.u8*") if p.is_file())
    return 0


class DecodedCache:
    """A built store, mapped read-only (lazily, once per process)."""

    def __init__(self, root: Path, hw: np.ndarray, bad: set[int], built: bool):
        self.root, self.built = root, built
        self.hw = hw.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.hw[:, 0] * self.hw[:, 1] * 3)])
        self.bad = bad
        self._map: tuple[int, np.ndarray] | None = None

    @property
    def path(self) -> Path:
        return self.root / "store.u8"

    def image(self, idx: int) -> np.ndarray:
        """Sample idx's RGB HWC pixels (a read-only view of the store)."""
        if idx in self.bad:
            from trainer.data.decode import CorruptImage

            raise CorruptImage(f"sample {idx} did not decode when the cache was built")
        if self._map is None or self._map[0] != os.getpid():
            self._map = (os.getpid(), np.memmap(self.path, dtype=np.uint8, mode="r"))
        h, w = self.hw[idx]
        return self._map[1][self.offsets[idx] : self.offsets[idx + 1]].reshape(h, w, 3)

    def __getstate__(self) -> dict:  # workers map the file themselves
        return {**self.__dict__, "_map": None}


def open_cache(data: SplitData, kind: str, cache_dir: str | Path | None = None,
               processes: int | None = None) -> DecodedCache:
    """The split's decoded store, built now if missing, stale or cut short (see the module doc)."""
    root = store_dir(data, kind, cache_dir)
    base = root.parent
    need = needed_bytes(data)
    if not (root / "meta.json").is_file():  # refuse before writing anything
        where = next(p for p in (root, *root.parents) if p.exists())
        check_fits(need, free_bytes(where, kind) + _own_size(root), kind, where, base)
    root.mkdir(parents=True, exist_ok=True)
    with _interruptible(), open(root / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait here, then reuse
        try:
            meta = _valid_meta(root, data, need)
            built = meta is None
            if meta is None:
                check_fits(need, free_bytes(root, kind) + _own_size(root), kind, root, base)
                meta = _build(root, data, need, processes)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return DecodedCache(root, data.labels.hw, set(meta["bad"]), built)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM end a wait for, or a build of, the store at once. The trainer's own
    handler only sets a stop flag read at its first step, so a build ran on to the end (minutes,
    and a GB-sized temp store in /dev/shm if the scheduler's SIGKILL came first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _own_size(root: Path) -> int:
    """Bytes of a store we are about to replace (removed before the build), and of builds that
    died (removed too): they count as free."""
    return sum(p.stat().st_size for p in (root / "store.u8", *_dead_builds(root)) if p.is_file())


def _dead_builds(root: Path) -> list[Path]:
    """Temp stores of builds killed before their cleanup ran (SIGKILL, the OOM killer): only the lock
    holder builds, so under the lock every one of them is dead."""
    return sorted(root.glob("store.u8.tmp-*")) if root.is_dir() else []


def _expected_meta(data: SplitData, need: int) -> dict:
    return {"version": VERSION, "split": data.name, "num_samples": int(data.info.num_samples), "bytes": need,
            "shards": [s.sha256 for s in data.info.shards]}


def _valid_meta(root: Path, data: SplitData, need: int) -> dict | None:
    """The store's meta if it matches this split and the store file is whole, else None."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        want = _expected_meta(data, need)
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in want.items()):
            log.info("decoded cache %s is stale (the packed data changed): rebuilding it", root)
            return None
        if (root / "store.u8").stat().st_size != need:
            log.warning("decoded cache %s is cut short or damaged: rebuilding it", root)
            return None
        if not isinstance(meta.get("bad"), list):
            return None
        return meta
    except (OSError, ValueError):
        return None


_BUILD: tuple[SplitData, np.ndarray, str] | None = None


def _size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _reserve(tmp: Path, need: int) -> None:
    """Create the temp store with all its blocks allocated. A sparse file let a build that ran out
    of room kill its workers with SIGBUS at the first page that had none, and the pool waited for
    them forever; now a full disk or /dev/shm is one CacheError before any decoding."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, need)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: sparse, as before
            os.ftruncate(fd, need)
        else:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise CacheError(f"the decoded cache could not reserve {_size_text(need)} in {tmp.parent} "
                             f"({os.strerror(e.errno or 0)}): free some space, or use no cache") from None
    os.close(fd)


def _build(root: Path, data: SplitData, need: int, processes: int | None) -> dict:
    """Decode every sample into a new store (in parallel), then publish it and its meta."""
    (root / "meta.json").unlink(missing_ok=True)  # never a valid meta beside a store being rewritten
    # the stale store goes first, so the rebuild needs room for one store, not two (a process still
    # mapping it keeps its pages until it unmaps)
    for old in (root / "store.u8", *_dead_builds(root)):
        old.unlink(missing_ok=True)
    data.fetch(range(len(data.info.shards)))  # network storage: the builder reads every shard once
    tmp = root / f"store.u8.tmp-{os.getpid()}"
    _reserve(tmp, need)
    offsets = np.concatenate([[0], np.cumsum(data.labels.hw.astype(np.int64).prod(1) * 3)])
    n = len(data.labels)
    procs = max(1, min(processes or len(os.sched_getaffinity(0)), 32, n))
    log.info("building the decoded cache %s (%s, %d images, %d processes)", root, _size_text(need), n, procs)
    global _BUILD
    _BUILD = (data, offsets, str(tmp))
    chunks = [(i * n // procs, (i + 1) * n // procs) for i in range(procs)]
    try:
        if procs == 1:
            bad = _decode_chunk(chunks[0])
        else:
            # fork: the workers inherit _BUILD; close + join, not the context manager's terminate(),
            # which SIGTERMs workers that inherited the trainer's SIGTERM handler and then waits forever
            pool = mp.get_context("fork").Pool(procs, initializer=_worker_signals)
            try:
                bad = [i for part in pool.map(_decode_chunk, chunks) for i in part]
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        os.replace(tmp, root / "store.u8")
    finally:
        _BUILD = None
        tmp.unlink(missing_ok=True)
    meta = {**_expected_meta(data, need), "bad": sorted(bad)}
    atomic_write_bytes(root / "meta.json", json.dumps(meta).encode())
    if bad:
        log.warning("decoded cache: %d sample(s) did not decode; they are substituted and counted", len(bad))
    return meta


def _worker_signals() -> None:
    """Default signal handling in the build workers (the trainer's stop-flag handler is the parent's)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _decode_chunk(span: tuple[int, int]) -> list[int]:
    """Decode samples [a, b) into the store being built; the indices that failed."""
    from trainer.data.decode import decode_rgb
    from trainer.data.records import RecordSource

    assert _BUILD is not None
    data, offsets, path = _BUILD
    src = RecordSource(data)
    store = np.memmap(path, dtype=np.uint8, mode="r+")
    bad = []
    la = data.labels
    for i in range(*span):
        h, w = (int(v) for v in la.hw[i])
        dst = store[offsets[i] : offsets[i + 1]].reshape(h, w, 3)
        try:
            img = decode_rgb(src.jpeg_at(int(la.shard[i]), int(la.pos[i])))
            if img.shape != (h, w, 3):
                raise ValueError(f"decoded {img.shape[:2]}, labels say {(h, w)}")
            dst[...] = img
        except Exception as e:  # noqa: BLE001 - one bad record is that record's problem
            log.warning("decoded cache: sample %d does not decode (%s)", i, e)
            bad.append(i)
    store.flush()
    src.forget_files()
    return bad
