"""What `packer push` and `packer pull` share: the file list of a dataset, the result, the checks.

Both directions copy the files the manifest names (label arrays, shards, index files, plus
report.json), then the manifest itself, last: a reader never sees a half-copied dataset as
complete. Files already at the destination are skipped when their size and sha256 match
(shards: the manifest's sha256; other files: the source's, hashed streaming); everything
copied is checked against the manifest; transient network errors are retried with bounded
backoff. Interrupted and run again, a transfer sends only what is still missing or different.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packer.format import KEY_MAX_LEN, REPORT_NAME, FormatError, LabelArrays, Manifest, sha256_file
from packer.storage.fs import ChecksumError, retry


@dataclass
class FileEntry:
    """One file of a dataset; `sha256`/`bytes` are known for shards (from the manifest)."""

    rel: str
    kind: str  # "shard", "index", "labels", "report"
    bytes: int | None = None
    sha256: str | None = None
    shard: str | None = None  # for an index: its shard's rel path
    max_bytes: int | None = None  # the most it may hold by the manifest (`download` stops past it)


@dataclass
class TransferResult:
    src: str
    dst: str
    files: int = 0
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # push --overwrite: the replaced dataset's files it had no more
    bytes_copied: int = 0
    bytes_total: int = 0
    retries: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["elapsed_s"] = round(self.elapsed_s, 3)
        d["mb_per_s"] = round(self.bytes_copied / 1e6 / self.elapsed_s, 2) if self.elapsed_s > 0 else None
        return d

    def retrying(self, attempts: int, fn: Callable[[], Any]) -> Any:
        """`fs.retry(fn)`, counting the retries in this result."""

        def note(_e: BaseException, _k: int) -> None:
            self.retries += 1

        return retry(fn, attempts=attempts, on_retry=note)


def labels_max_bytes(samples: int, boxes: int) -> int:
    """The most an honest labels.npz can weigh: an uncompressed npz of fixed-width strings, so a
    key of at most KEY_MAX_LEN and a source path of at most 4096 characters (4 bytes each) per
    sample, a few numbers per sample and per box."""
    return (1 << 20) + samples * (4 * (KEY_MAX_LEN + 4096) + 64) + boxes * 64


def report_max_bytes(m: Manifest) -> int:
    """A generous bound on report.json (problems are listed per image and box, paths included)."""
    return (256 << 20) + sum(s.num_samples + s.num_boxes for s in m.splits.values()) * (8 << 10)


def dataset_files(m: Manifest, with_report: bool = True) -> list[FileEntry]:
    """The files of a packed dataset in copy order (the manifest is not listed: it goes last), each
    with the most bytes the manifest allows: a shard exactly its size, an index at most its shard's
    (far smaller), label arrays and report.json the bounds above."""
    out: list[FileEntry] = []
    for s in m.splits.values():
        out.append(FileEntry(s.labels, "labels", max_bytes=labels_max_bytes(s.num_samples, s.num_boxes)))
        for sh in s.shards:
            out.append(FileEntry(sh.path, "shard", sh.bytes, sh.sha256, max_bytes=sh.bytes))
            if sh.index:
                out.append(FileEntry(sh.index, "index", shard=sh.path, max_bytes=sh.bytes))
    if with_report:
        out.append(FileEntry(REPORT_NAME, "report", max_bytes=report_max_bytes(m)))
    return out


def format_transfer_summary(s: dict[str, Any], verb: str) -> str:
    """The lines printed after push/pull."""
    rate = f", {s['mb_per_s']:.1f} MB/s" if s.get("mb_per_s") else ""
    return "\n".join([
        f"{verb} {s['src']} -> {s['dst']}",
        f"  files   {len(s['copied'])} copied, {len(s['skipped'])} already there (size+sha256 match), {s['files']} in all",
        f"  bytes   {s['bytes_copied'] / 1e6:.1f} MB copied of {s['bytes_total'] / 1e6:.1f} MB{rate}",
        *([f"  removed {len(s['removed'])} files of the replaced dataset"] if s.get("removed") else []),
        f"  retries {s['retries']}, time {s['elapsed_s']:.1f} s",
    ])


def check_file(m: Manifest, root: Path, f: FileEntry, path: Path | None = None) -> None:
    """Raise ChecksumError unless the local file agrees with the manifest: shards by size and
    sha256, index files by the index recomputed from their shard (already at `root`), label
    arrays by the contract and their sample and box counts. report.json has no reference and passes."""
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
            la = LabelArrays.load(path, num_classes=len(m.names), num_shards=len(split.shards))
        except FormatError as e:
            raise ChecksumError(f"{f.rel}: {e}") from None
        if len(la) != split.num_samples or len(la.cls) != split.num_boxes:
            raise ChecksumError(f"{f.rel}: sample/box counts differ from the manifest")


class TryBytes:
    """Bytes moved by the current try of a retried transfer, mirrored on a progress bar: each new
    try (`restart`) takes the previous try's bytes back off the bar."""

    def __init__(self, bar) -> None:  # noqa: ANN001 - a tqdm bar
        self.bar, self.n = bar, 0

    def __call__(self, n: int) -> None:
        self.n += n
        self.bar.update(n)

    def restart(self) -> None:
        self.bar.update(-self.n)
        self.n = 0
