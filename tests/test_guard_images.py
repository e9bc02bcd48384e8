"""Resource bombs and odd image files: every one ends packed or under a named reason, and
nothing is decoded before its header size has been checked (real files built here)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from _bad_input import _images, _scene
from PIL import Image

from packer import images as I
from packer.sample import ProcessOptions, process_candidate
from packer.sources.base import Candidate

ROOT = Path(__file__).resolve().parents[1]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # RGB: the first frame is red


def _jpeg(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return cv2.imencode(".jpg", _scene(h, w, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _png(h: int, w: int) -> bytes:
    return cv2.imencode(".png", _scene(h, w, 1))[1].tobytes()


def jpeg_bomb(side: int = 30000) -> bytes:
    """A real, tiny, valid JPEG whose SOF0 header is patched to declare side x side pixels."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 50])[1])
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def png_bomb(side: int = 30000) -> bytes:
    """A small PNG whose IHDR (CRC fixed up) declares side x side pixels."""
    data = bytearray(_png(16, 16))
    ihdr = data.find(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def webp_bomb(side: int = 12000) -> bytes:
    """An animated (VP8X) WebP whose canvas is patched to side x side pixels."""
    frames = [Image.new("RGB", (32, 24), c) for c in COLORS]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:30] = (side - 1).to_bytes(3, "little") * 2
    return bytes(data)


def tiff_bomb(side: int = 30000) -> bytes:
    """A small uncompressed TIFF whose ImageWidth/ImageLength tags say side x side."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLORS[0]).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\0"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<H" if typ == 3 else "<I", data, at + 8, side)
    return bytes(data)


def gif_bomb(side: int = 30000) -> bytes:
    """A small GIF whose logical screen says side x side."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLORS[0]).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    struct.pack_into("<HH", data, 6, side, side)
    return bytes(data)


def _pil_multi(fmt: str, **kw) -> bytes:
    frames = [Image.new("RGB", (32, 24), c) for c in COLORS]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


_MEASURE = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from packer.images import ImageError, process_image
small, bomb = (open(p, "rb").read() for p in sys.argv[2:4])
process_image(small)  # imports and first-use allocations happen before the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    process_image(bomb)
    print("packed")
except ImageError as e:
    print(e.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("make", [jpeg_bomb, png_bomb, webp_bomb, tiff_bomb, gif_bomb])
def test_bomb_is_too_large_without_being_decoded(make, tmp_path):
    bomb = make()
    assert len(bomb) < 2048  # a 1-2 KB file declaring 144M-900M pixels
    assert I.read_header(bomb).width >= 12000
    (tmp_path / "small.jpg").write_bytes(_jpeg())
    (tmp_path / "bomb").write_bytes(bomb)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT), str(tmp_path / "small.jpg"), str(tmp_path / "bomb")],
                         capture_output=True, text=True, check=True)
    reason, peak_growth_mib = out.stdout.split()
    assert reason == "too_large"
    assert int(peak_growth_mib) < 16  # decoding would take GBs (5.4 GB for the JPEG through OpenCV)


def test_bomb_candidate_counts_its_boxes(tmp_path):
    img, lab = tmp_path / "bomb.jpg", tmp_path / "bomb.txt"
    img.write_bytes(jpeg_bomb())
    lab.write_text("0 0.5 0.5 0.1 0.1\n0 0.2 0.2 0.1 0.1\n")
    r = process_candidate(Candidate("train", "bomb.jpg", str(img), label_file=str(lab)), ProcessOptions(nc=1))
    assert r.record is None and r.boxes_found == 2
    assert [(p.kind, p.reason, p.count) for p in r.problems] == [("image", "too_large", 1), ("box", "image_skipped", 2)]
    detail = r.problems[0].detail
    assert "30000x30000" in detail and "89,478,485" in detail


def test_limit_is_ours_not_pils(monkeypatch):
    data = _jpeg(48, 64)  # 3072 pixels
    with pytest.raises(I.ImageError) as e:
        I.process_image(data, max_pixels=3071)
    assert e.value.reason == "too_large"
    assert I.process_image(data, max_pixels=3072).passthrough
    # PIL's own bomb check (warning above MAX_IMAGE_PIXELS, error above twice that) never decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for img in (data, _png(48, 64), _pil_multi("GIF"), _pil_multi("WEBP", lossless=True)):
            assert I.process_image(img).height > 0
    with pytest.raises(I.ImageError) as e:
        I.process_image(webp_bomb(), max_pixels=10**8)
    assert e.value.reason == "too_large" and "144,000,000" in e.value.detail


def test_header_size_without_decoding():
    assert I.read_header(jpeg_bomb()) == I.ImageHeader("JPEG", 30000, 30000, 1)
    assert I.read_header(png_bomb()) == I.ImageHeader("PNG", 30000, 30000, 1)
    assert I.read_header(_pil_multi("TIFF")) == I.ImageHeader("TIFF", 32, 24, 3)


@pytest.mark.parametrize("hw,ok", [((9, 40), False), ((40, 9), False), ((5, 5), False), ((10, 10), True), ((10, 300), True)])
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_sides_under_10_px_are_too_small(hw, ok, fmt):
    data = _jpeg(*hw) if fmt == "jpg" else _png(*hw)
    if ok:
        out = I.process_image(data)
        assert (out.orig_height, out.orig_width) == hw
    else:
        with pytest.raises(I.ImageError) as e:
            I.process_image(data)
        assert e.value.reason == "too_small" and f"{hw[1]}x{hw[0]}" in e.value.detail


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("GIF", {"duration": 100, "loop": 0}),
                                    ("WEBP", {"duration": 100, "lossless": True}), ("PNG", {"duration": 100})])
def test_multi_frame_packs_first_frame_with_warning(fmt, kw, tmp_path):
    data = _pil_multi(fmt, **kw)
    (tmp_path / "a.img").write_bytes(data)
    r = process_candidate(Candidate("train", "a.img", str(tmp_path / "a.img")), ProcessOptions(nc=1))
    assert r.record is not None
    assert [(p.kind, p.reason) for p in r.problems] == [("warning", "multi_frame")]
    assert f"{fmt} with 3 frames" in r.problems[0].detail
    img = cv2.imdecode(np.frombuffer(r.record.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (24, 32, 3)
    assert np.abs(img.astype(int) - (0, 0, 255)).max() < 8  # red: the first frame (BGR)


def test_single_frame_and_mpo_have_no_warning():
    one = io.BytesIO()
    Image.new("RGB", (32, 24), COLORS[0]).save(one, "GIF")
    assert I.process_image(one.getvalue()).warnings == ()
    mpo = _pil_multi("MPO")  # camera MPO: the photo plus previews; OpenCV reads the photo
    assert I.read_header(mpo).frames == 3 and I.process_image(mpo).warnings == ()


def _flipped_entropy_jpeg(capfd) -> bytes:
    """A pass-through-able JPEG with one bit flipped in its scan that libjpeg warns about."""
    data = _jpeg(48, 64, 3)
    capfd.readouterr()
    for off in range(len(data) - 3, len(data) // 2, -1):
        bad = bytearray(data)
        bad[off] ^= 0x08
        if 0xFF in (data[off - 1], data[off], bad[off]):
            continue
        img = cv2.imdecode(np.frombuffer(bytes(bad), np.uint8), cv2.IMREAD_COLOR)
        if img is not None and "Corrupt JPEG data" in capfd.readouterr().err:
            return bytes(bad)
    raise AssertionError("no flip made libjpeg warn")


def test_corrupt_jpeg_is_reencoded_with_warning_not_passed_through(capfd):
    bad = _flipped_entropy_jpeg(capfd)
    out = I.process_image(bad)
    assert not out.passthrough and [r for r, _ in out.warnings] == ["corrupt_data"]
    np.testing.assert_array_equal(I.decode_jpeg_strict(out.jpeg).shape, (48, 64, 3))  # the stored JPEG is clean
    assert I.process_image(_jpeg(48, 64, 3)).passthrough  # the intact original passes through


@pytest.mark.parametrize("name,data,reason", [
    ("empty.jpg", b"", "empty_file"),
    ("truncated.jpg", _images()["truncated.jpg"], "truncated"),
    ("cut.png", _images()["cut.png"], "truncated"),
    ("notes.jpg", b"password=hunter2\nuser=admin\n" * 4, "unreadable"),
    ("page.png", b"<!DOCTYPE html><html><body>404 not found</body></html>", "unreadable"),
    ("photo.jpg", b"\xff\xd8\xff\xe0 this is text after a JPEG signature \xff\xd9", "truncated"),  # segment overruns
])
def test_odd_files_end_in_a_named_reason_without_echoing_content(name, data, reason, tmp_path):
    (tmp_path / name).write_bytes(data)
    r = process_candidate(Candidate("train", name, str(tmp_path / name)), ProcessOptions(nc=1))
    assert r.record is None and [(p.kind, p.reason) for p in r.problems] == [("image", reason)]
    for word in ("hunter2", "admin", "html", "404", "text after"):
        assert word not in r.problems[0].detail


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PSD", "TGA", "PCX"])
def test_unsupported_formats_are_unreadable(fmt):
    buf = io.BytesIO()
    im = Image.new("RGB", (32, 24), COLORS[0])
    if fmt == "PSD":  # PIL cannot write PSD: a minimal header of one is enough to be recognised
        buf.write(b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 24, 32, 8, 3) + b"\0" * 16)
    else:
        im.save(buf, fmt)
    with pytest.raises(I.ImageError) as e:
        I.process_image(buf.getvalue())
    assert e.value.reason == "unreadable" and "not a JPEG, PNG" in e.value.detail


def test_other_supported_formats_pack():
    for fmt in ("BMP", "JPEG2000", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(_scene(24, 32, 2)[:, :, ::-1]).save(buf, fmt)
        out = I.process_image(buf.getvalue())
        assert (out.height, out.width, out.warnings) == (24, 32, ()), fmt


def test_reasons_are_in_the_report_vocabulary():
    from packer.sources.base import IMAGE_REASONS, WARNINGS

    assert {"too_large", "too_small", "unreadable", "truncated", "empty_file"} <= set(IMAGE_REASONS)
    assert "multi_frame" in WARNINGS
