"""`DatasetLocation`: a folder, its file:// URL and an http:// server read the same packed dataset.

Built from `samples/yolo` (16 images, real packer), served by a real local HTTP server; a corrupt
shard is a real flipped byte, a missing manifest a real folder without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _servers import http_files

from packer.build import build_dataset
from packer.format import LABEL_FIELDS, MANIFEST_NAME, FormatError
from packer.storage.fs import ChecksumError, OversizeError, RemoteError, is_transient
from packer.storage.location import DatasetLocation

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "yolo"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("storage") / "packed"
    build_dataset(SAMPLES, out, fmt="tfrecord", size=64, shard_size=4, workers=1, progress=False)
    return out


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_folder_file_url_and_http_give_the_same_dataset(packed: Path) -> None:
    here = DatasetLocation(packed)
    m = here.manifest()
    assert here.path == packed and not here.remote
    with http_files(packed) as base:
        for loc in (DatasetLocation(packed.as_uri()), DatasetLocation(base, attempts=1)):
            assert loc.remote and loc.path is None
            assert loc.manifest() == m
            assert loc.manifest_bytes() == (packed / MANIFEST_NAME).read_bytes()
            for split, info in m.splits.items():
                got, want = loc.labels(split), here.labels(split)
                assert len(got) == info.num_samples > 0
                for k in LABEL_FIELDS:
                    assert np.array_equal(getattr(got, k), getattr(want, k)), (loc.display, split, k)
            sh = m.splits["train"].shards[0]
            with loc.local_shard(sh, checked=True) as (path, idx):
                assert path.read_bytes() == (packed / sh.path).read_bytes()
                assert idx.read_bytes() == (packed / sh.index).read_bytes()
                assert idx.name == path.name + ".idx"  # next to its shard, where the readers look


@pytest.mark.parametrize("where", ["file", "http"])
def test_checked_download_refuses_a_corrupt_shard(packed: Path, tmp_path: Path, where: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    sh = DatasetLocation(bad).manifest().splits["train"].shards[1]
    _flip_byte(bad / sh.path, 40)  # same size, other bytes
    with http_files(bad) as base:
        loc = DatasetLocation(bad.as_uri() if where == "file" else base, attempts=1)
        with pytest.raises(ChecksumError, match=Path(sh.path).name), loc.local_shard(sh, checked=True):
            pass
        with loc.local_shard(sh) as (path, _):  # unchecked: the bytes as they are
            assert path.read_bytes() == (bad / sh.path).read_bytes()
    with DatasetLocation(bad).local_shard(sh, checked=True) as (path, _):  # a folder's shard is used in place
        assert path == bad / sh.path


@pytest.mark.parametrize("where", ["folder", "file", "http"])
def test_missing_manifest_is_one_format_error_naming_it(packed: Path, tmp_path: Path, where: str) -> None:
    half = tmp_path / "half"
    shutil.copytree(packed, half)
    (half / MANIFEST_NAME).unlink()  # an unfinished build or upload
    with http_files(half) as base:
        url = {"folder": str(half), "file": half.as_uri(), "http": base}[where]
        with pytest.raises(FormatError) as e:
            DatasetLocation(url, attempts=1).manifest()
    msg = str(e.value)
    assert not isinstance(e.value, RemoteError) and e.value.exit_code == 2
    assert f"{MANIFEST_NAME} not found" in msg and "not a packed dataset" in msg and "\n" not in msg
    assert (str(half) if where == "folder" else url.split("://", 1)[1]) in msg


def test_a_shard_longer_than_its_manifest_is_read_no_further(packed: Path, tmp_path: Path) -> None:
    """A zero-filled tail (a crash) or a hostile server: downloads stop one byte past the
    manifest's size, and verify neither downloads nor indexes the whole thing."""
    from packer.storage.files import CHUNK, download
    from packer.storage.fs import get_fs
    from packer.storage.pull import pull
    from packer.verify import verify_dataset

    big = tmp_path / "big"
    shutil.copytree(packed, big)
    sh = DatasetLocation(big).manifest().splits["train"].shards[0]
    with open(big / sh.path, "r+b") as f:
        f.truncate(4 * CHUNK)  # 32 MiB of zeros after a shard of a few kB
    got: list[int] = []
    with http_files(big) as base:
        fs, root = get_fs(base)
        with pytest.raises(ChecksumError, match=rf"longer than the {sh.bytes} bytes the manifest allows"):
            download(fs, f"{root}/{sh.path}", tmp_path / "one", size=sh.bytes, on_bytes=got.append)
        with pytest.raises(ChecksumError, match=rf"longer than the {sh.bytes} bytes the manifest allows"):
            pull(base, tmp_path / "got", attempts=1)
        remote = verify_dataset(base)
    assert sum(got) == sh.bytes + 1 and not (tmp_path / "one").exists()
    assert remote.errors == [f"{sh.path}: longer than the {sh.bytes} bytes the manifest allows"]
    local = verify_dataset(big)
    assert local.errors[0] == f"{sh.path}: {4 * CHUNK} bytes, manifest says {sh.bytes}"
    assert not any("does not match its shard" in e for e in local.errors)  # no index built from 32 MiB of zeros
    assert not is_transient(OversizeError("x")) and is_transient(ChecksumError("x"))  # the same bytes again: no retry


def test_verify_stops_a_record_walk_at_the_manifest_count(packed: Path, tmp_path: Path) -> None:
    """A shard holding more records than its manifest says is named once; the walk ends there."""
    import json

    from packer.verify import verify_dataset

    more = tmp_path / "more"
    shutil.copytree(packed, more)
    doc = json.loads((more / MANIFEST_NAME).read_text())
    split = doc["splits"]["train"]
    split["shards"][0]["num_samples"] -= 1
    split["num_samples"] -= 1
    (more / MANIFEST_NAME).write_text(json.dumps(doc))
    errors = verify_dataset(more).errors
    n = split["shards"][0]["num_samples"]
    assert f"{split['shards'][0]['path']}: more records than the {n} the manifest says" in errors
