"""`verify --deep` decodes strictly: a record whose JPEG entropy data has a flipped bit that
OpenCV decodes with only a libjpeg warning is reported by shard, position and key, in every
format; `images.decode_jpeg_strict` (the trainer's decoder) decodes like cv2.imdecode and
raises on exactly those JPEGs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from _bad_input import _images, _scene, exif_rotated_jpeg
from click.testing import CliRunner

from packer.build import build_dataset
from packer.cli import cli
from packer.format import read_manifest, write_manifest
from packer.images import ImageError, decode_jpeg_strict
from packer.verify import verify_dataset
from packer.writers import get_writer, open_reader


def _jpeg(seed: int) -> bytes:
    return cv2.imencode(".jpg", _scene(48, 64, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _flip_that_opencv_only_warns_about(data: bytes, capfd) -> bytes:
    """`data` with one bit of its entropy-coded data flipped such that cv2.imdecode still returns
    an image of the right size and libjpeg prints a "Corrupt JPEG data" warning (found by trying)."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    capfd.readouterr()
    for off in range(len(data) - 3, start, -1):  # flips near the end of the scan make libjpeg warn
        if 0xFF in data[off - 1 : off + 1]:
            continue
        for bit in (0x01, 0x08, 0x40):
            bad = bytearray(data)
            bad[off] ^= bit
            if bad[off] == 0xFF:
                continue
            img = cv2.imdecode(np.frombuffer(bytes(bad), np.uint8), cv2.IMREAD_COLOR)
            if "Corrupt JPEG data" in capfd.readouterr().err and img is not None and img.shape == (48, 64, 3):
                return bytes(bad)
    raise AssertionError("no single-bit flip made libjpeg warn")


def _dataset(root: Path) -> Path:
    for d in ("images/train", "labels/train"):
        (root / d).mkdir(parents=True)
    for i in range(4):
        (root / "images/train" / f"a{i}.jpg").write_bytes(_jpeg(i))
        (root / "labels/train" / f"a{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.25\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [cat, dog]\n")
    return root


def _corrupt_one_record(out: Path, capfd) -> tuple[str, int, str]:
    """Rewrite the first shard with its second record's JPEG corrupted, keeping framing, index,
    labels and manifest checksums consistent, so only the image data is wrong."""
    m = read_manifest(out)
    split = next(iter(m.splits))
    sh = m.splits[split].shards[0]
    with open_reader(m.format, out / sh.path) as r:
        recs = list(r)
    assert len(recs) >= 2
    pos = 1
    recs[pos] = dataclasses.replace(recs[pos], jpeg=_flip_that_opencv_only_warns_about(recs[pos].jpeg, capfd))
    with get_writer(m.format, out / sh.path) as w:
        for rec in recs:
            w.add(rec)
    written = w.close()
    sh.bytes, sh.sha256 = written.bytes, written.sha256
    write_manifest(out, m)
    return sh.path, pos, recs[pos].key


@pytest.mark.parametrize("fmt", ["tfrecord", "wds", "lmdb"])
def test_deep_verify_reports_record_with_flipped_entropy_byte(fmt, tmp_path, capfd):
    out = tmp_path / "out"
    build_dataset(_dataset(tmp_path / "src"), out, fmt=fmt, workers=1, min_shards=1)
    assert verify_dataset(out, deep=True).ok
    shard, pos, key = _corrupt_one_record(out, capfd)

    shallow = verify_dataset(out)
    assert shallow.ok, shallow.errors  # framing, checksums and labels are all consistent
    res = verify_dataset(out, deep=True)
    assert not res.ok and res.decoded_images == 4
    (err,) = res.errors
    assert err.startswith(f"{shard}#{pos}: image {key} ") and "corrupt_data" in err and "libjpeg" in err

    run = CliRunner().invoke(cli, ["verify", "--deep", "--json", str(out)])
    assert run.exit_code == 1
    assert json.loads(run.stdout)["errors"] == [err]


def test_strict_decoder_matches_imdecode_and_rejects_warnings(capfd):
    imgs = _images()
    for name in ("good.jpg", "gray.jpg", "progressive.jpg", "cmyk.jpg", "exif_rotated.jpg"):
        want = cv2.imdecode(np.frombuffer(imgs[name], np.uint8), cv2.IMREAD_COLOR)
        got = decode_jpeg_strict(imgs[name])
        assert got.dtype == np.uint8 and got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert decode_jpeg_strict(exif_rotated_jpeg()[0]).shape == (96, 64, 3)  # EXIF orientation applied

    bad = _flip_that_opencv_only_warns_about(_jpeg(5), capfd)
    with pytest.raises(ImageError) as e:
        decode_jpeg_strict(bad)
    assert e.value.reason == "corrupt_data" and "libjpeg" in e.value.detail


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "empty.jpg", "alpha.png"])
def test_strict_decoder_names_a_reason_for_non_jpegs_and_broken_files(name):
    with pytest.raises(ImageError) as e:
        decode_jpeg_strict(_images()[name])
    assert e.value.reason in ("corrupt_data", "unreadable", "empty_file")


def test_strict_decoder_detail_never_echoes_file_bytes():
    secret = b"password=hunter2\n"
    with pytest.raises(ImageError) as e:
        decode_jpeg_strict(secret)
    assert e.value.reason == "unreadable"
    text = str(e.value)
    assert "hunter2" not in text and "0x70" not in text.lower()
