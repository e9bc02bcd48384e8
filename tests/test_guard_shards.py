"""Hostile shards whose manifest checksums were recomputed, so only the contents are wrong: readers
refuse them in one line (exit 1: a finished dataset that was damaged), never crash the process.

Real files: a packed samples/coco, changed byte by byte or member by member, resealed (size, sha256,
index) as an attacker would; every command runs as a subprocess, so a SIGBUS shows as such."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from packer.build import build_dataset
from packer.format import MANIFEST_NAME, FormatError, Record, sha256_file
from packer.writers import make_index

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _reseal(ds: Path) -> None:
    """Make the manifest agree with the files again: sizes, sha256s and index files."""
    doc = json.loads((ds / MANIFEST_NAME).read_text())
    for split in doc["splits"].values():
        for sh in split["shards"]:
            if sh["index"]:
                (ds / sh["index"]).write_bytes(make_index(doc["format"], ds / sh["path"]))
            sh["bytes"], sh["sha256"] = (ds / sh["path"]).stat().st_size, sha256_file(ds / sh["path"])
    (ds / MANIFEST_NAME).write_text(json.dumps(doc))


def _packed(tmp_path: Path, fmt: str) -> Path:
    out = tmp_path / fmt
    build_dataset(ROOT / "samples" / "coco", out, fmt=fmt, size=64, workers=1)
    return out


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "packer"), *map(str, args)], capture_output=True, text=True, timeout=120)


def _refused(r: subprocess.CompletedProcess, words: str) -> None:
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])  # -7 was SIGBUS
    assert "Traceback" not in r.stderr and any(words in ln for ln in lines), lines


def test_an_lmdb_node_pointing_past_the_file_is_refused_not_a_sigbus(tmp_path):
    ds = _packed(tmp_path, "lmdb")
    path = next(ds.rglob("data.lmdb"))
    data = bytearray(path.read_bytes())
    psize = int.from_bytes(data[40:44], "little")  # the meta page's page size: the OS's when written
    last = len(data) // psize - 1  # the last leaf page: a node pointer past it reads past the map
    while not data[last * psize + 10] & 0x02:
        last -= 1
    data[last * psize + 16 : last * psize + 18] = (0xFFF0).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    _reseal(ds)
    for cmd in (("verify", ds), ("info", ds), ("convert", ds, "-o", tmp_path / "c", "--format", "wds")):
        r = _run(*cmd)
        if cmd[0] == "info":  # info reads the manifest and labels only: the data is not opened
            assert r.returncode == 0, r.stderr
            continue
        _refused(r, "damaged LMDB file (a node outside page")


def test_records_with_wrong_types_or_huge_paths_are_refused(tmp_path):
    """A wds .json with a string for a number, or a 70,000-character path: convert's LMDB writer crashed
    with struct.error, and convert to tfrecord laundered what verify rejects."""
    for change, words in (({"height": "64"}, "image sizes must be integers"),
                          ({"source": "a" * 70_000}, "source is not a path of at most 4096 bytes")):
        ds = _packed(tmp_path / str(len(words)), "wds")
        tar_path = next(ds.rglob("*.tar"))
        out = io.BytesIO()
        with tarfile.open(tar_path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for i, m in enumerate(src.getmembers()):
                body = src.extractfile(m).read()
                if i == 3 and m.name.endswith(".json"):  # the first sample's metadata
                    body = json.dumps({**json.loads(body), **change}).encode()
                    m.size = len(body)
                dst.addfile(m, io.BytesIO(body))
        tar_path.write_bytes(out.getvalue())
        _reseal(ds)
        for fmt in ("lmdb", "tfrecord"):
            _refused(_run("convert", ds, "-o", tmp_path / f"{fmt}-{len(words)}", "--format", fmt), words)
        _refused(_run("verify", ds), words)


def test_a_record_checks_its_own_fields():
    good = dict(key="k", source="a/b.jpg", jpeg=b"\xff\xd8", height=2, width=2, orig_height=4, orig_width=4,
                cls=[], boxes=[])
    Record(**good)
    for bad in ({"height": "2"}, {"width": True}, {"orig_height": 0}, {"source": "x" * 5000},
                {"source": "a\x00b"}, {"jpeg": "text"}, {"key": 5}):
        with pytest.raises(FormatError):
            Record(**{**good, **bad})


def test_verify_names_tar_members_packer_never_writes(tmp_path):
    """Links and `../` or absolute names after the samples: the readers and the index skip them, so the
    records verify, but `tar x` on the shard would create them; verify names the first one."""
    ds = _packed(tmp_path, "wds")
    tar_path = next(ds.rglob("*.tar"))
    out = io.BytesIO()
    with tarfile.open(tar_path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        link = tarfile.TarInfo("../../escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(link)
        folder = tarfile.TarInfo("/tmp/abs")
        folder.type = tarfile.DIRTYPE
        dst.addfile(folder)
    tar_path.write_bytes(out.getvalue())
    _reseal(ds)
    r = _run("verify", ds)
    _refused(r, "2 tar member(s) packer never writes, first '../../escape'")
    problems = [ln for ln in r.stderr.splitlines() if ln.startswith("  ")]
    assert len(problems) == 1, r.stderr  # the only problem: the records themselves are fine
