"""Image bytes in, stored JPEG bytes out: validate, decode, orient, resize, encode.

Pure functions on bytes (no file I/O) so they run the same in the main process and in
worker processes. Decoding uses OpenCV's `imdecode(IMREAD_COLOR)`, which is what
ultralytics' `imread` does: EXIF orientation applied, grayscale / palette / 16-bit / CMYK /
alpha images become 8-bit 3-channel BGR, so the pixels we store are the pixels ultralytics
would train on.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np

# ultralytics.data.utils.IMG_FORMATS (8.4.190): the extensions an image folder may hold.
IMG_FORMATS = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"})

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# In entropy-coded data 0xFF is followed by 0x00 (stuffing), RSTn or fill 0xFF; anything else is a marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"

_configured = False


class ImageError(Exception):
    """An image that cannot be packed; `reason` is one of sources.base.IMAGE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class JpegInfo:
    """What the JPEG markers say (no pixel decoding)."""

    sof: int | None  # SOFn marker byte: 0xC0 baseline, 0xC2 progressive, ...
    precision: int  # bits per sample
    height: int
    width: int
    components: int
    orientation: int | None  # EXIF orientation tag of the first Exif APP1, None if absent
    adobe_transform: int | None  # APP14 "Adobe" colour transform (0: RGB/CMYK, 1: YCbCr, 2: YCCK)
    complete: bool  # an EOI marker was reached after the scan data


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    height: int  # stored size
    width: int
    orig_height: int  # decoded size (after EXIF orientation)
    orig_width: int
    passthrough: bool  # the source bytes were kept unchanged


def configure_worker() -> None:
    """One OpenCV thread per process: packing parallelises over processes, and nested
    thread pools only add contention. Idempotent; process_image calls it lazily."""
    global _configured
    if not _configured:
        cv2.setNumThreads(0)
        cv2.ocl.setUseOpenCL(False)
        _configured = True


def _exif_orientation(seg: bytes) -> int | None:
    """Orientation tag (0x0112) from IFD0 of an APP1 Exif payload (after 'Exif\\0\\0')."""
    if len(seg) < 8 or seg[:2] not in (b"II", b"MM"):
        return None
    e = "<" if seg[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(e + "I", seg, 4)
        (n,) = struct.unpack_from(e + "H", seg, ifd)
        for i in range(n):
            tag, typ, _count = struct.unpack_from(e + "HHI", seg, ifd + 2 + 12 * i)
            if tag == 0x0112:
                if typ == 3:  # SHORT
                    return struct.unpack_from(e + "H", seg, ifd + 2 + 12 * i + 8)[0]
                if typ == 4:  # LONG (non-standard but seen)
                    return struct.unpack_from(e + "I", seg, ifd + 2 + 12 * i + 8)[0]
                return None
    except struct.error:
        return None
    return None


def parse_jpeg(data: bytes) -> JpegInfo:
    """Walk a JPEG's marker segments (and skip over scan data) without decoding pixels.

    Tolerates trailing bytes after EOI and stray bytes between segments, as libjpeg does.
    Raises ValueError if `data` does not start with SOI.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    n = len(data)
    pos = 2
    sof = None
    precision = height = width = components = 0
    orientation = adobe = None
    seen_exif = False
    while pos < n:
        if data[pos] != 0xFF:  # garbage between segments: resync on the next 0xFF
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                break
            pos = nxt
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        m = data[pos]
        pos += 1
        if m == 0xD9:
            return JpegInfo(sof, precision, height, width, components, orientation, adobe, True)
        if 0xD0 <= m <= 0xD7 or m in (0x01, 0x00):
            continue
        if pos + 2 > n:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > n:
            break
        seg = data[pos + 2 : pos + length]
        pos += length
        if m in _SOF_MARKERS and sof is None and len(seg) >= 6:
            sof = m
            precision, height, width, components = seg[0], *struct.unpack_from(">HH", seg, 1), seg[5]
        elif m == 0xE1 and not seen_exif and seg[:6] == b"Exif\x00\x00":
            seen_exif = True
            orientation = _exif_orientation(seg[6:])
        elif m == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif m == 0xDA:  # start of scan: skip entropy-coded data up to the next real marker
            hit = _NEXT_MARKER.search(data, pos)
            if hit is None:
                break
            pos = hit.start()
    return JpegInfo(sof, precision, height, width, components, orientation, adobe, False)


def png_complete(data: bytes) -> bool:
    """True if the PNG chunk chain reaches IEND within the data."""
    pos, n = len(_PNG_SIG), len(data)
    while pos + 8 <= n:
        length, ctype = struct.unpack_from(">I4s", data, pos)
        pos += 12 + length
        if pos > n:
            return False
        if ctype == b"IEND":
            return True
    return False


def check_bytes(data: bytes) -> JpegInfo | None:
    """Cheap structural checks before decoding: ImageError("empty_file"/"truncated").

    Returns the JpegInfo for JPEG input (None for other formats)."""
    if not data:
        raise ImageError("empty_file", "0 bytes")
    if data[:2] == b"\xff\xd8":
        info = parse_jpeg(data)
        if not info.complete:
            raise ImageError("truncated", "JPEG has no EOI marker after its scan data")
        return info
    if data[:8] == _PNG_SIG and not png_complete(data):
        raise ImageError("truncated", "PNG chunk chain ends before IEND")
    return None


def decode(data: bytes) -> np.ndarray:
    """Decode like ultralytics' `imread` (cv2.IMREAD_COLOR): 8-bit 3-channel BGR, EXIF-oriented.

    Raises ImageError("unreadable") when OpenCV cannot decode the bytes."""
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:  # some codecs raise instead of returning None
        raise ImageError("unreadable", f"OpenCV: {str(e).strip().splitlines()[-1]}") from None
    if img is None or img.size == 0:
        raise ImageError("unreadable", "OpenCV could not decode the image")
    if img.dtype == np.uint16:  # IMREAD_COLOR already gives 8-bit; keep ultralytics' rule just in case
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img)


def target_size(height: int, width: int, size: int, upscale: bool = False) -> tuple[int, int]:
    """(height, width) after resizing the long side to `size`, as ultralytics' `load_image`
    computes it (`min(ceil(w0 * r), size)`); unchanged when no resize is wanted."""
    r = size / max(height, width)
    if r == 1 or (r > 1 and not upscale):
        return height, width
    return max(1, min(math.ceil(height * r), size)), max(1, min(math.ceil(width * r), size))


def resize(img: np.ndarray, size: int, upscale: bool = False) -> np.ndarray:
    """Resize the long side to `size` keeping the aspect ratio: INTER_AREA when shrinking
    (no aliasing), INTER_LINEAR when upscaling (only if asked)."""
    h0, w0 = img.shape[:2]
    h, w = target_size(h0, w0, size, upscale)
    if (h, w) == (h0, w0):
        return img
    interp = cv2.INTER_AREA if h < h0 or w < w0 else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Baseline (non-progressive) JPEG, deterministic for the same pixels and quality."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_PROGRESSIVE, 0])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def can_pass_through(info: JpegInfo | None) -> bool:
    """A JPEG every decoder (OpenCV, DALI CPU and nvJPEG) reads identically, upright as is:
    baseline SOF0, 8-bit, 3 components in YCbCr, no EXIF rotation."""
    return (
        info is not None
        and info.complete
        and info.sof == 0xC0
        and info.precision == 8
        and info.components == 3
        and info.orientation in (None, 1)
        and info.adobe_transform in (None, 1)
    )


def process_image(data: bytes, size: int = 704, quality: int = 95, upscale: bool = False) -> ProcessedImage:
    """Validate, decode, orient, resize and encode one image (see module doc).

    The bytes are always decoded (to validate them and learn the true size). A baseline
    3-channel JPEG that needs no resize and no re-orientation is kept byte for byte.
    Raises ImageError with reason "empty_file", "truncated" or "unreadable".
    """
    configure_worker()
    info = check_bytes(data)
    img = decode(data)
    h0, w0 = img.shape[:2]
    h, w = target_size(h0, w0, size, upscale)
    if (h, w) == (h0, w0) and can_pass_through(info) and (info.height, info.width) == (h0, w0):
        return ProcessedImage(bytes(data), h0, w0, h0, w0, True)
    out = resize(img, size, upscale)
    return ProcessedImage(encode_jpeg(out, quality), out.shape[0], out.shape[1], h0, w0, False)
