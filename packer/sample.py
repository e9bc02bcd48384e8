"""One candidate in, at most one Record out: the per-sample work of a build.

`process_candidate` is pure (reads the candidate's files, writes nothing) and runs in
worker processes. Every box found is either packed or named in one box Problem, so
`boxes_found == len(record.cls) + sum(p.count for p in problems if p.kind == "box")`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packer.format import Record, make_key
from packer.images import CHROMA_CHOICES, DEFAULT_MAX_PIXELS, ImageError, LoadedImage, load_image, pick_chroma
from packer.labels import LabelResult, coco_to_yolo, parse_yolo
from packer.sources.base import Candidate, Problem


@dataclass(frozen=True)
class ProcessOptions:
    size: int = 704  # long side in pixels
    quality: int = 95  # JPEG quality
    nc: int = 80  # number of classes (class ids >= nc are out of range)
    keep_crowd: bool = False
    upscale: bool = False  # never upscale unless asked
    max_pixels: int = DEFAULT_MAX_PIXELS  # images declaring more pixels are skipped as too_large, undecoded
    chroma: str = "auto"  # chroma subsampling of re-encoded JPEGs (images.pick_chroma)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, not {self.size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels, not {self.max_pixels}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be 1..100, not {self.quality}")
        if self.chroma not in CHROMA_CHOICES:
            raise ValueError(f"chroma must be one of {', '.join(CHROMA_CHOICES)}, not {self.chroma!r}")
        if self.nc < 0:
            raise ValueError(f"nc must be >= 0, not {self.nc}")


@dataclass
class SampleResult:
    record: Record | None  # None when the image was skipped
    problems: list[Problem]  # including the candidate's discovery problems
    boxes_found: int  # kept + dropped boxes of this image
    stored: str | None = None  # packed images: "source" (bytes kept), "420" or "444" (re-encoded)


def _read_label_text(path: str) -> str:
    with open(path, "rb") as f:
        # utf-8-sig as ultralytics reads labels; undecodable bytes become bad lines, not a crash
        return f.read().decode("utf-8-sig", errors="replace")


def process_candidate(c: Candidate, opts: ProcessOptions) -> SampleResult:
    """Decode/resize/encode the candidate's image and clean its labels (see module doc)."""
    problems = list(c.problems)
    found = sum(p.count for p in problems if p.kind == "box")

    # YOLO labels do not depend on the image size: parse them first so a skipped image
    # still reports how many boxes it took with it.
    yolo: LabelResult | None = None
    if c.label_file is not None:
        try:
            yolo = parse_yolo(_read_label_text(c.label_file), c.source, opts.nc, c.kpt_shape)
        except OSError as e:
            problems.append(Problem("box", "bad_line", c.source, f"label file unreadable: {e.strerror or e}"))
            found += 1
    n_boxes = yolo.found if yolo is not None else len(c.coco_boxes or ())
    found += n_boxes

    def skipped(reason: str, detail: str) -> SampleResult:
        problems.append(Problem("image", reason, c.source, detail))
        if n_boxes:
            problems.append(Problem("box", "image_skipped", c.source, f"image skipped ({reason})", n_boxes))
        return SampleResult(None, problems, found)

    if c.reject is not None or c.path is None:
        return skipped(c.reject or "missing_image", c.detail)
    try:
        with open(c.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return skipped("missing_image", "file vanished after discovery")
    except OSError as e:
        return skipped("unreadable", f"cannot read file: {e.strerror or e}")
    try:
        img = load_image(data, opts.size, opts.upscale, opts.max_pixels)
    except ImageError as e:
        return skipped(e.reason, e.detail)
    problems.extend(Problem("warning", reason, c.source, detail) for reason, detail in img.warnings)
    labels = _labels_of(c, yolo, img, opts, problems)
    chroma = pick_chroma(opts.chroma, labels.boxes, img.height, img.width)
    stored = img.encode(opts.quality, chroma)
    record = Record(
        key=make_key(c.source), source=c.source, jpeg=stored.jpeg, height=img.height, width=img.width,
        orig_height=img.orig_height, orig_width=img.orig_width, cls=labels.cls, boxes=labels.boxes,
    )
    return SampleResult(record, problems, found, "source" if stored.passthrough else chroma)


def _labels_of(c: Candidate, yolo: LabelResult | None, img: LoadedImage, opts: ProcessOptions,
               problems: list[Problem]) -> LabelResult:
    """The image's cleaned labels (YOLO as parsed, COCO normalized by the decoded size); their
    problems and a COCO size mismatch are appended to `problems`."""
    if yolo is not None:
        labels = yolo
    elif c.coco_boxes is not None:
        labels = coco_to_yolo(c.coco_boxes, img.orig_height, img.orig_width, c.source, opts.nc, opts.keep_crowd)
    else:
        labels = LabelResult(np.zeros(0, np.int32), np.zeros((0, 4), np.float32))  # background image
    if c.coco_size is not None and tuple(c.coco_size) != (img.orig_height, img.orig_width):
        jh, jw = c.coco_size
        problems.append(
            Problem(
                "warning", "size_mismatch", c.source,
                f"json says {jw}x{jh}, image is {img.orig_width}x{img.orig_height}; boxes normalized by the image",
            )
        )
    problems.extend(labels.problems)
    return labels
