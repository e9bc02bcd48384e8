"""packer.images: structure checks, OpenCV decoding as ultralytics reads images, resize, pass-through."""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from _bad_input import _images, exif_rotated_jpeg
from PIL import Image

from packer import images as I

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imgs() -> dict[str, bytes]:
    return _images()


def test_parse_jpeg_markers(imgs):
    base = I.parse_jpeg(imgs["good.jpg"])
    assert (base.sof, base.precision, base.components, base.orientation, base.complete) == (0xC0, 8, 3, None, True)
    assert (base.height, base.width) == (48, 64)
    assert I.parse_jpeg(imgs["progressive.jpg"]).sof == 0xC2
    assert I.parse_jpeg(imgs["gray.jpg"]).components == 1
    assert I.parse_jpeg(imgs["cmyk.jpg"]).components == 4
    ex = I.parse_jpeg(exif_rotated_jpeg()[0])
    assert (ex.orientation, ex.height, ex.width) == (6, 64, 96)  # stored sideways
    assert not I.parse_jpeg(imgs["truncated.jpg"]).complete
    # bytes after EOI (camera trailers) do not make a JPEG incomplete
    assert I.parse_jpeg(imgs["good.jpg"] + b"trailer\x00\xff").complete
    with pytest.raises(ValueError):
        I.parse_jpeg(b"\x89PNG")


def test_marker_walk_sees_what_pil_header_read_does_not(imgs):
    """Why parse_jpeg is kept over PIL's header read (the comment above images._SOF_MARKERS): PIL reports
    an extended-sequential (SOF1) JPEG and one cut in its scan data exactly as a good baseline JPEG."""
    sof1 = imgs["good.jpg"].replace(b"\xff\xc0", b"\xff\xc1", 1)
    for data in (imgs["good.jpg"], sof1, imgs["truncated.jpg"]):
        im = Image.open(io.BytesIO(data))
        assert (im.format, im.mode, im.bits, im.info.get("progressive")) == ("JPEG", "RGB", 8, None)
    info = I.parse_jpeg(sof1)
    assert (info.sof, info.complete, I.can_pass_through(info)) == (0xC1, True, False)
    out = I.process_image(sof1)  # libjpeg reads SOF1; stored re-encoded as baseline, not byte for byte
    assert not out.passthrough and I.parse_jpeg(out.jpeg).sof == 0xC0
    with pytest.raises(I.ImageError, match="truncated"):
        I.process_image(imgs["truncated.jpg"])


@pytest.mark.parametrize(
    "name,reason", [("empty.jpg", "empty_file"), ("truncated.jpg", "truncated"), ("cut.png", "truncated"),
                    ("corrupt.jpg", "unreadable")],
)
def test_bad_bytes_raise_named_reason(imgs, name, reason):
    with pytest.raises(I.ImageError) as e:
        I.process_image(imgs[name])
    assert e.value.reason == reason


def test_unreadable_non_image():
    with pytest.raises(I.ImageError) as e:
        I.process_image(b"this is not an image at all")
    assert e.value.reason == "unreadable"


@pytest.mark.parametrize("name", ["gray.jpg", "alpha.png", "deep16.png", "cmyk.jpg", "progressive.jpg", "good.jpg"])
def test_decode_matches_ultralytics_imread(imgs, name, tmp_path):
    from trainer.offline import setup_offline

    setup_offline()
    from ultralytics.utils.patches import imread

    p = tmp_path / name
    p.write_bytes(imgs[name])
    ours = I.decode(imgs[name])
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    np.testing.assert_array_equal(ours, imread(str(p)))
    np.testing.assert_array_equal(ours, cv2.imread(str(p)))


def test_exif_orientation_applied_like_imread(tmp_path):
    data, upright, _ = exif_rotated_jpeg()
    p = tmp_path / "r.jpg"
    p.write_bytes(data)
    ours = I.decode(data)
    assert ours.shape == (96, 64, 3)
    np.testing.assert_array_equal(ours, cv2.imread(str(p)))
    assert np.abs(ours.astype(int) - upright).mean() < 3  # upright, up to JPEG noise
    out = I.process_image(data)
    assert not out.passthrough and (out.height, out.width, out.orig_height, out.orig_width) == (96, 64, 96, 64)
    assert I.parse_jpeg(out.jpeg).orientation is None  # re-encoded upright, no EXIF left to re-apply


@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (333, 500), (1000, 1000), (7, 3000), (704, 100)])
@pytest.mark.parametrize("size", [704, 320, 257])
def test_target_size_matches_ultralytics_load_image(hw, size):
    h0, w0 = hw
    r = size / max(h0, w0)
    want = (min(math.ceil(h0 * r), size), min(math.ceil(w0 * r), size)) if r < 1 else (h0, w0)
    assert I.target_size(h0, w0, size) == want
    assert max(I.target_size(h0, w0, size, upscale=True)) == size


def test_resize_area_and_no_upscale():
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    small = I.resize(img, 320)
    np.testing.assert_array_equal(small, cv2.resize(img, (320, 240), interpolation=cv2.INTER_AREA))
    assert I.resize(img, 1024) is img
    assert I.resize(img, 1024, upscale=True).shape == (768, 1024, 3)


def test_passthrough_keeps_baseline_bytes(imgs):
    out = I.process_image(imgs["good.jpg"], size=704)
    assert out.passthrough and out.jpeg == imgs["good.jpg"]
    # the same JPEG needing a resize, or unusual JPEGs, are re-encoded as baseline 3-channel
    assert not I.process_image(imgs["good.jpg"], size=32).passthrough
    for name in ("progressive.jpg", "gray.jpg", "cmyk.jpg"):
        out = I.process_image(imgs[name])
        info = I.parse_jpeg(out.jpeg)
        assert not out.passthrough and (info.sof, info.components) == (0xC0, 3), name
        assert I.can_pass_through(info)


def _sampling(jpeg: bytes) -> list[tuple[int, int]]:
    """(h, v) sampling factors of each component, as PIL reads them from the frame header."""
    return [(h, v) for _, h, v, _ in Image.open(io.BytesIO(jpeg)).layer]


def test_chroma_444_keeps_colour_at_full_resolution(imgs):
    """--chroma 444 re-encodes with full-resolution colour (smaller colour error, larger file);
    420 stays libjpeg's default; a pass-through JPEG keeps its own bytes either way."""
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_NEAREST)
    data = cv2.imencode(".png", img)[1].tobytes()
    ref = cv2.cvtColor(cv2.resize(img, (320, 240), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2YCrCb).astype(float)
    out = {c: I.process_image(data, size=320, quality=95, chroma=c).jpeg for c in ("420", "444")}
    assert _sampling(out["420"]) == [(2, 2), (1, 1), (1, 1)] and _sampling(out["444"]) == [(1, 1)] * 3
    err = {c: np.abs(cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2YCrCb)
                     - ref)[..., 1:].mean() for c, j in out.items()}
    assert err["444"] < 0.7 * err["420"] and len(out["444"]) > len(out["420"])
    assert I.process_image(imgs["good.jpg"], size=704, chroma="444").jpeg == imgs["good.jpg"]
    with pytest.raises(KeyError):
        I.encode_jpeg(img, chroma="422")


def test_auto_chroma_is_444_where_most_boxes_are_small():
    """--chroma auto: 4:4:4 when the median box of the image is under COCO's small-object area
    (32x32 px) in the stored image, 4:2:0 otherwise and for an image without boxes."""
    small, large = [0.5, 0.5, 0.05, 0.05], [0.5, 0.5, 0.2, 0.2]  # 32x24 vs 128x96 px at 640x480
    boxes = lambda *b: np.array(b, np.float32).reshape(-1, 4)  # noqa: E731
    assert I.pick_chroma("auto", boxes(small, small, large), 480, 640) == "444"
    assert I.pick_chroma("auto", boxes(small, large, large), 480, 640) == "420"
    mid = [0.5, 0.5, 0.08, 0.08]  # 51x38 px at 640x480, 26x19 px stored at half that size
    assert I.pick_chroma("auto", boxes(mid), 480, 640) == "420" and I.pick_chroma("auto", boxes(mid), 240, 320) == "444"
    assert I.pick_chroma("auto", boxes(), 480, 640) == "420"
    assert I.pick_chroma("420", boxes(small), 480, 640) == "420" and I.pick_chroma("444", boxes(large), 480, 640) == "444"


def test_coco128_resize_and_passthrough(coco128):
    files = sorted((coco128 / "train2017").glob("*.jpg"))[:6]
    for f in files:
        data = f.read_bytes()
        h0, w0 = cv2.imread(str(f)).shape[:2]
        out = I.process_image(data, size=320, quality=90)
        assert (out.orig_height, out.orig_width) == (h0, w0)
        assert (out.height, out.width) == I.target_size(h0, w0, 320)
        assert cv2.imdecode(np.frombuffer(out.jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (out.height, out.width)
        full = I.process_image(data, size=704)
        assert full.passthrough == (full.jpeg == data)


_DETERMINISM = """
import hashlib, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from _bad_input import _images
from packer.images import process_image
for name, data in sorted(_images().items()):
    try:
        print(name, hashlib.sha256(process_image(data, size=40, quality=80).jpeg).hexdigest())
    except Exception as e:
        print(name, type(e).__name__)
"""


def test_output_deterministic_across_processes(imgs):
    here = []
    for name, data in sorted(imgs.items()):
        try:
            here.append(f"{name} {hashlib.sha256(I.process_image(data, size=40, quality=80).jpeg).hexdigest()}")
        except Exception as e:
            here.append(f"{name} {type(e).__name__}")
    other = subprocess.run([sys.executable, "-c", _DETERMINISM, str(ROOT)], capture_output=True, text=True, check=True)
    assert other.stdout.splitlines() == here
