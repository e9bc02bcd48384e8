"""Image bytes in, stored JPEG bytes out: validate, decode, orient, resize, encode.

Pure functions on bytes (no file I/O): they run the same in the main process and in
workers. Decoding gives what OpenCV's `imdecode(IMREAD_COLOR)` (ultralytics' `imread`)
gives: EXIF-oriented 8-bit 3-channel BGR, the pixels ultralytics would train on. Nothing is decoded before PIL has read the header and its size is checked: over
`max_pixels` is `too_large` (1 KB can declare 30000x30000), a side under 10 px `too_small`
(as ultralytics' verify_image_label). Multi-page / animated files: the first frame (what
cv2.imdecode reads), with a `multi_frame` warning. JPEGs are decoded strictly (simplejpeg):
one libjpeg only warns about is packed as OpenCV decodes it, re-encoded, with a
`corrupt_data` warning, so no packed record fails `verify --deep`.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from packer.markers import PNG_SIG, JpegInfo, can_pass_through, parse_jpeg, png_complete

# ultralytics.data.utils.IMG_FORMATS (8.4.190): the extensions an image folder may hold.
IMG_FORMATS = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"})

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS (warning level), which ultralytics users live with
MIN_SIDE = 10  # ultralytics' verify_image_label: assert (shape[0] > 9) & (shape[1] > 9)
# PIL plugins whose headers we read (in this order); an image none of them identifies is skipped
# as ultralytics skips it (verify_image_label opens every image with PIL). JPEG covers MPO.
_PIL_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF", "JPEG2000", "AVIF")
_PIL_OPEN_ERRORS = (SyntaxError, ValueError, IndexError, TypeError, OSError, EOFError, struct.error, MemoryError)
_TJ_PREFIX = re.compile(r"^tj\w*\(\):\s*")
_STARTS_WITH = re.compile(r":?\s*starts with.*$", re.IGNORECASE)  # libjpeg quotes a non-JPEG's first bytes

_configured = False


class ImageError(Exception):
    """An image that cannot be packed; `reason` is one of sources.base.IMAGE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    height: int  # stored size
    width: int
    orig_height: int  # decoded size (after EXIF orientation)
    orig_width: int
    passthrough: bool  # the source bytes were kept unchanged
    warnings: tuple[tuple[str, str], ...] = ()  # (sources.base.WARNINGS reason, detail)


@dataclass(frozen=True)
class LoadedImage:
    """An image decoded and resized, before its stored bytes are chosen (`encode`): the labels,
    which the chroma choice of `--chroma auto` needs, are known only after the decode."""

    source: bytes | None  # the source bytes when they are stored unchanged
    pixels: np.ndarray | None  # the resized pixels to encode otherwise
    height: int  # stored size
    width: int
    orig_height: int
    orig_width: int
    warnings: tuple[tuple[str, str], ...] = ()

    def encode(self, quality: int = 95, chroma: str = "420") -> ProcessedImage:
        """The stored image: the source bytes, or the pixels as a JPEG (`chroma` "420" or "444")."""
        sizes = (self.height, self.width, self.orig_height, self.orig_width)
        if self.source is not None:
            return ProcessedImage(self.source, *sizes, True, self.warnings)
        return ProcessedImage(encode_jpeg(self.pixels, quality, chroma), *sizes, False, self.warnings)


@dataclass(frozen=True)
class ImageHeader:
    """What PIL reads from an image's header (no pixels decoded)."""

    format: str  # PIL's format name: "JPEG", "MPO", "PNG", "TIFF", "WEBP", ...
    width: int  # as stored (before EXIF orientation; the pixel count is the same)
    height: int
    frames: int  # pages / animation frames; 1 for still images


def configure_worker() -> None:
    """One OpenCV thread per process: packing parallelises over processes, and nested
    thread pools only add contention. Idempotent; process_image calls it lazily."""
    global _configured
    if not _configured:
        cv2.setNumThreads(0)
        cv2.ocl.setUseOpenCL(False)
        _configured = True


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
    if data[:8] == PNG_SIG and not png_complete(data):
        raise ImageError("truncated", "PNG chunk chain ends before IEND")
    return None


def _pil_identify(data: bytes) -> Image.Image | None:
    """The first of _PIL_FORMATS whose plugin opens `data` (header only), else None. Not `Image.open`:
    that applies PIL's own bomb limit (warning, error at twice MAX_IMAGE_PIXELS); ours is max_pixels."""
    Image.init()  # registers every plugin once; a dict lookup afterwards
    for fmt in _PIL_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        ok = factory is not None and (accept is None or accept(data[:16]))
        if not ok or isinstance(ok, str):  # a str is PIL's "this plugin is not installed"
            continue
        try:
            return factory(io.BytesIO(data), None)
        except _PIL_OPEN_ERRORS:
            continue
    return None


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a WebP canvas from its header: PIL's WebP plugin applies PIL's own bomb limit."""
    kind, le = data[12:16], int.from_bytes
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    if kind == b"VP8X":
        return le(data[24:27], "little") + 1, le(data[27:30], "little") + 1
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = le(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return le(data[26:28], "little") & 0x3FFF, le(data[28:30], "little") & 0x3FFF
    return None


def read_header(data: bytes) -> ImageHeader:
    """Format, size and frame count from the header, decoding no pixels.

    ImageError("unreadable"): no supported format recognised (text, other formats, broken header);
    "too_large": PIL's own hard limit tripped on a GIF frame larger than its canvas."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: our limit decides
        try:
            im = _pil_identify(data)
            if im is None:
                raise ImageError("unreadable", "not a JPEG, PNG, TIFF, WebP, BMP, GIF or JPEG 2000 image")
            frames = int(getattr(im, "n_frames", 1) or 1)
        except Image.DecompressionBombError:
            if (wh := _webp_canvas(data)) is not None:
                return ImageHeader("WEBP", *wh, 1)
            raise ImageError("too_large", f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels") from None
        except _PIL_OPEN_ERRORS as e:
            raise ImageError("unreadable", f"{im.format} header: {type(e).__name__}") from None
    return ImageHeader(im.format or "", im.size[0], im.size[1], frames)


def check_size(head: ImageHeader, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """ImageError("too_large") above `max_pixels`, ImageError("too_small") for a side under MIN_SIDE."""
    w, h = head.width, head.height
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (--max-pixels)")
    if min(w, h) < MIN_SIDE:
        raise ImageError("too_small", f"{w}x{h} pixels; each side needs at least {MIN_SIDE} (as ultralytics)")


def _libjpeg_detail(e: Exception) -> str:
    """libjpeg's message without the TurboJPEG function name and without quoted file bytes."""
    return "libjpeg: " + (_STARTS_WITH.sub("", _TJ_PREFIX.sub("", (str(e).strip() or "error").splitlines()[0])) or "error")


def decode_jpeg_strict(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, info: JpegInfo | None = None) -> np.ndarray:
    """Decode a JPEG like cv2.imdecode(IMREAD_COLOR) (BGR uint8 HxWx3, EXIF orientation applied,
    same pixels), but fail where libjpeg only warns (corrupt entropy data, premature end...).

    ImageError reasons: empty_file; unreadable (not a JPEG, libjpeg gives up); corrupt_data (libjpeg
    recovers with a warning, which OpenCV ignores); too_large (over max_pixels: nothing decoded).
    `info`: parse_jpeg(data) when the caller has it (the marker walk is not repeated)."""
    if not data:
        raise ImageError("empty_file", "0 bytes")
    try:
        info = info or parse_jpeg(data)
    except ValueError:
        raise ImageError("unreadable", "not a JPEG (no SOI marker)") from None
    if info.width * info.height > max_pixels:
        raise ImageError("too_large", f"{info.width}x{info.height} pixels, over the limit of {max_pixels:,}")
    colorspace = "CMYK" if info.components == 4 else "BGR"
    try:
        img = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except ValueError as e:
        try:
            simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=False)
        except ValueError:
            raise ImageError("unreadable", _libjpeg_detail(e)) from None
        raise ImageError("corrupt_data", _libjpeg_detail(e)) from None
    if colorspace == "BGR" and info.orientation in (None, 1):
        return np.ascontiguousarray(img)
    return decode(data)  # CMYK or EXIF-rotated: clean, so OpenCV's decode is the reference


def _decode_jpeg_or_opencv(data: bytes, max_pixels: int, info: JpegInfo) -> tuple[np.ndarray, tuple[tuple[str, str], ...]]:
    """Strict decode; a JPEG libjpeg warns about is decoded as OpenCV does, with a corrupt_data warning.
    One that libjpeg-turbo's TurboJPEG API cannot read at all is left to OpenCV to judge."""
    try:
        return decode_jpeg_strict(data, max_pixels, info), ()
    except ImageError as e:
        if e.reason not in ("corrupt_data", "unreadable"):
            raise
        note = ("corrupt_data", f"{e.detail}; packed as OpenCV decodes it, re-encoded")
        return decode(data), (note,) if e.reason == "corrupt_data" else ()


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
    if img.ndim == 2 or img.shape[2] == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
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


CHROMA = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}
CHROMA_CHOICES = ("auto", *CHROMA)  # what --chroma accepts
SMALL_OBJECT_AREA = 32 * 32  # COCO's "small" objects: under 32x32 px


def pick_chroma(setting: str, boxes: np.ndarray, height: int, width: int) -> str:
    """The chroma subsampling to re-encode one image with. "auto": 4:4:4 when most of its boxes
    (normalized xywh, as stored in a record) are small in the stored `height` x `width` image,
    by COCO's definition: 4:2:0 keeps one colour sample per 2x2 pixels, so the colour of an
    object a few pixels wide bleeds into its background. Otherwise 4:2:0, 1.33x smaller and
    1.46x faster to decode (README: the packer's `--chroma`)."""
    if setting != "auto":
        return setting
    if len(boxes) == 0:
        return "420"
    areas = boxes[:, 2] * boxes[:, 3] * (height * width)
    return "444" if float(np.median(areas)) < SMALL_OBJECT_AREA else "420"


def encode_jpeg(img: np.ndarray, quality: int = 95, chroma: str = "420") -> bytes:
    """Baseline (non-progressive) JPEG, deterministic for the same pixels, quality and chroma
    subsampling ("420": colour at half resolution, libjpeg's default; "444": full resolution)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_PROGRESSIVE, 0,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, CHROMA[chroma]]
    ok, buf = cv2.imencode(".jpg", img, params)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def load_image(data: bytes, size: int = 704, upscale: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Validate, check the header size, decode, orient and resize one image (see module doc).

    The bytes are always decoded (to validate them and learn the true size). A baseline 3-channel
    JPEG needing no resize nor re-orientation, that libjpeg decodes without warning, is kept byte
    for byte. ImageError reasons: empty_file, truncated, unreadable, too_large, too_small.
    """
    configure_worker()
    info = check_bytes(data)
    head = read_header(data)
    check_size(head, max_pixels)  # before any decoding: nothing above max_pixels is ever allocated
    notes: tuple[tuple[str, str], ...] = ()
    if head.frames > 1 and head.format != "MPO":  # MPO: a camera JPEG plus previews, the first is the photo
        notes = (("multi_frame", f"{head.format} with {head.frames} frames; packed the first, as OpenCV reads it"),)
    img, corrupt = _decode_jpeg_or_opencv(data, max_pixels, info) if info is not None else (decode(data), ())
    h0, w0 = img.shape[:2]
    h, w = target_size(h0, w0, size, upscale)
    same = (h, w) == (h0, w0) and can_pass_through(info) and (info.height, info.width) == (h0, w0)
    if same and not corrupt:
        return LoadedImage(bytes(data), None, h0, w0, h0, w0, notes)
    out = resize(img, size, upscale)
    return LoadedImage(None, out, out.shape[0], out.shape[1], h0, w0, notes + corrupt)


def process_image(
    data: bytes, size: int = 704, quality: int = 95, upscale: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
    chroma: str = "420",
) -> ProcessedImage:
    """`load_image`, then `encode` with a fixed chroma subsampling ("420" or "444")."""
    return load_image(data, size, upscale, max_pixels).encode(quality, chroma)
