"""Packed JPEG bytes -> RGB pixels, as fast as libjpeg-turbo allows, with corrupt data refused.

The packer stores baseline 8-bit YCbCr JPEGs without EXIF rotation (`packer.markers.can_pass_through`),
which every libjpeg-turbo front end decodes alike. We decode them with simplejpeg (libjpeg-turbo):

- exact (the default, training included): the same pixels as ``cv2.imdecode`` (measured:
  identical, and about 1.07x its speed on coco128 at 640);
- ``fast`` (opt-in, ``fast_decode=True``): libjpeg-turbo's fast integer DCT. It does not pay:
  measured same-run on 640-px packed JPEGs it saves 0.8 % (q95 re-encodes) to 4.8 % (coco128's
  own JPEGs) of decode time, and costs 1.1-1.9 dB of PSNR against the pixels the packer encoded
  (synthetic shapes at 256, q95); pixels differ from OpenCV's by 1.2 grey levels on average
  (worst coco128 image 2.05), by up to ~20 at sharp edges -- where small objects are;
- DCT-domain scaling: a stored image at least twice the wanted size is decoded at 1/2, 1/4 or 1/8
  (the largest reduction that still covers the target), then resized to exactly the letterbox size.

Strict: libjpeg warnings (corrupt entropy data, premature end of data) raise `CorruptImage`, so a
damaged record is counted and substituted instead of training on grey blocks. Bytes that are not
a JPEG (no SOI marker) fall back to OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

from trainer.data.transforms import FILL, letterbox_geometry

FAST_MEAN_TOL = 1.5  # tested mean |fast - cv2| in grey levels over a set of photos (measured 1.2)
FAST_IMAGE_TOL = 2.5  # ... and on any one photo (worst of coco128 measured 2.05)
_SOI = b"\xff\xd8"


class CorruptImage(ValueError):
    """The image bytes do not decode cleanly."""


def decode_rgb(data: bytes | memoryview, *, fast: bool = False, min_hw: tuple[int, int] | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 HWC of the image bytes.

    min_hw: (h, w) the result may be reduced to in the DCT domain (never below it); None: full size.
    out: a contiguous (h, w, 3) buffer to decode into (full-size decodes only).
    """
    if bytes(data[:2]) != _SOI:
        return _decode_cv2(data)
    kw: dict = {"fastdct": fast, "strict": True}
    if min_hw is not None:
        kw.update(min_height=int(min_hw[0]), min_width=int(min_hw[1]))
    elif out is not None:
        kw["buffer"] = out
    try:
        return simplejpeg.decode_jpeg(data, "RGB", **kw)
    except ValueError as e:  # strict: libjpeg warnings and errors alike
        raise CorruptImage(f"JPEG does not decode cleanly ({str(e).strip()[:120]})") from None


def _decode_cv2(data: bytes | memoryview) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if img is None:
        raise CorruptImage("image does not decode")
    return img


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(h, w) from the JPEG header, None when the bytes are not a readable JPEG."""
    if bytes(data[:2]) != _SOI:
        return None
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return int(h), int(w)


def reduce_target(h: int, w: int, imgsz: int) -> tuple[int, int] | None:
    """The (nh, nw) letterbox size when a DCT-domain reduced decode pays (stored >= 2x it), else None."""
    _, _, _, _, nw, nh = letterbox_geometry(h, w, imgsz)
    return (nh, nw) if h >= 2 * nh and w >= 2 * nw else None


def letterbox_slot(data: bytes | memoryview, slot: np.ndarray, h: int, w: int, imgsz: int, *,
                   fast: bool) -> None:
    """Decode + letterbox one stored h x w image straight into `slot` (S, S, 3) HWC.

    Geometry is that of the stored size (`letterbox_geometry(h, w)`), whatever the decoder's
    scale; an image as wide as S (the usual packed landscape image) is decoded in place.
    """
    _, _, px, py, nw, nh = letterbox_geometry(h, w, imgsz)
    _fill_border(slot, px, py, nw, nh, imgsz)
    if (nw, nh) == (w, h) and nw == imgsz and slot.flags.c_contiguous and jpeg_size(data) == (h, w):
        decode_rgb(data, fast=fast, out=slot[py : py + nh])  # whole rows of the slot: contiguous
        return
    img = decode_rgb(data, fast=fast, min_hw=reduce_target(h, w, imgsz))
    _paste_resized(img, slot, px, py, nw, nh)


def paste_letterbox(img: np.ndarray, slot: np.ndarray, h: int, w: int, imgsz: int) -> None:
    """Letterbox decoded pixels of an image stored at h x w (img may be DCT-reduced) into `slot`."""
    _, _, px, py, nw, nh = letterbox_geometry(h, w, imgsz)
    _fill_border(slot, px, py, nw, nh, imgsz)
    _paste_resized(img, slot, px, py, nw, nh)


def _paste_resized(img: np.ndarray, slot: np.ndarray, px: int, py: int, nw: int, nh: int) -> None:
    """Resize `img` to nw x nh (INTER_LINEAR, as ultralytics) into slot[py:py+nh, px:px+nw]."""
    if img.shape[:2] != (nh, nw):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    slot[py : py + nh, px : px + nw] = img


def _fill_border(slot: np.ndarray, px: int, py: int, nw: int, nh: int, imgsz: int) -> None:
    if (nw, nh) == (imgsz, imgsz):
        return
    if px:  # side strips are row-strided: one contiguous fill of the slot is cheaper
        slot.fill(FILL)
        return
    slot[:py] = FILL
    slot[py + nh :] = FILL


def letterbox_image(img: np.ndarray, h: int, w: int, imgsz: int) -> np.ndarray:
    """An (S, S, 3) letterboxed tile of a decoded image stored at h x w (img may be DCT-reduced)."""
    if img.shape[:2] == (imgsz, imgsz) and (h, w) == (imgsz, imgsz):
        return img
    out = np.empty((imgsz, imgsz, 3), dtype=np.uint8)
    paste_letterbox(img, out, h, w, imgsz)
    return out
