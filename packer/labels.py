"""Label parsing and hygiene: YOLO text labels and COCO boxes -> clean normalized boxes.

Every box found ends up either kept or in exactly one `Problem(kind="box")`, so
`found == len(kept) + dropped` always holds. Order of checks per box: bad_line,
non_finite, class_out_of_range, zero_size, out_of_bounds (or the "clipped" fix), duplicate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from packer.sources.base import Problem

# Corners this far outside [0, 1] are float noise (e.g. x + w == width), clamped silently.
CLIP_EPS = 1e-6


@dataclass
class LabelResult:
    """Clean labels of one image plus what was dropped or fixed on the way."""

    cls: np.ndarray  # int32 (N,)
    boxes: np.ndarray  # float32 (N, 4) normalized cx, cy, w, h
    problems: list[Problem] = field(default_factory=list)
    found: int = 0  # boxes found, kept or not

    @property
    def dropped(self) -> int:
        return sum(p.count for p in self.problems if p.kind == "box")


def _fmt(values: Iterable[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def clean_boxes(
    rows: Sequence[tuple[int, float, float, float, float, str]], nc: int, source: str
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Hygiene for (class, cx, cy, w, h, where) rows in normalized units; `where` names the
    box in messages (e.g. "line 3"). Returns kept classes, kept boxes and problems."""
    problems: list[Problem] = []
    kept_cls: list[int] = []
    kept: list[tuple[float, float, float, float]] = []
    seen: set[bytes] = set()
    for c, cx, cy, w, h, where in rows:
        vals = (cx, cy, w, h)
        if not all(math.isfinite(v) for v in vals):
            problems.append(Problem("box", "non_finite", source, f"{where}: {_fmt(vals)}"))
            continue
        if not 0 <= c < nc:
            problems.append(Problem("box", "class_out_of_range", source, f"{where}: class {c} not in [0, {nc})"))
            continue
        if w <= 0 or h <= 0:
            problems.append(Problem("box", "zero_size", source, f"{where}: w={w:g} h={h:g}"))
            continue
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        outside = min(x1, y1) < -CLIP_EPS or max(x2, y2) > 1 + CLIP_EPS
        x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
        if outside:
            if x2 <= x1 or y2 <= y1:
                problems.append(Problem("box", "out_of_bounds", source, f"{where}: {_fmt(vals)} lies outside the image"))
                continue
            problems.append(Problem("fix", "clipped", source, f"{where}: {_fmt(vals)} clipped to the image"))
            box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        elif (x1, y1, x2, y2) != (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2):
            box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)  # float-noise clamp
        else:
            box = (cx, cy, w, h)
        if min(np.float32(box[2]), np.float32(box[3])) <= 0:  # stored as float32: a 1e-46 side is no side
            problems.append(Problem("box", "zero_size", source, f"{where}: w={w:g} h={h:g}"))
            continue
        sig = np.array([c], np.int32).tobytes() + np.array(box, np.float32).tobytes()
        if sig in seen:  # exact duplicates dropped, as ultralytics' verify_image_label does
            problems.append(Problem("box", "duplicate", source, f"{where}: {c} {_fmt(box)} repeats an earlier box"))
            continue
        seen.add(sig)
        kept_cls.append(c)
        kept.append(box)
    return (
        np.array(kept_cls, dtype=np.int32).reshape(-1),
        np.array(kept, dtype=np.float32).reshape(-1, 4),
        problems,
    )


def _box_of_line(vals: list[float], kpt_shape: tuple[int, int] | None) -> tuple[float, float, float, float] | str:
    """cx, cy, w, h of one numeric label line, or why its column count is wrong."""
    n = len(vals)
    if kpt_shape is not None:  # pose: class, box, then the keypoints (not packed)
        want = 5 + kpt_shape[0] * kpt_shape[1]
        if n != want:
            return f"{n} columns (expected {want} for kpt_shape [{kpt_shape[0]}, {kpt_shape[1]}])"
        return vals[1], vals[2], vals[3], vals[4]
    if n != 5 and (n < 7 or n % 2 == 0):
        return f"{n} columns (expected 5, or a polygon)"
    if n == 5:
        return vals[1], vals[2], vals[3], vals[4]
    xs, ys = vals[1::2], vals[2::2]
    if not all(math.isfinite(v) for v in vals[1:]):
        return math.nan, math.nan, math.nan, math.nan
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)


def parse_yolo(text: str, source: str, nc: int, kpt_shape: tuple[int, int] | None = None) -> LabelResult:
    """Parse a YOLO label file's text: `class cx cy w h` per line (normalized), or a
    polygon `class x1 y1 x2 y2 x3 y3 ...` (ultralytics' segment format, boxed as its
    min/max). With `kpt_shape` (a pose dataset) every line must hold exactly
    5 + prod(kpt_shape) columns and its first five are the box, as ultralytics reads them.
    Blank lines are ignored; anything else is a "bad_line". Problem details give the line
    number and why, never the line's text (a label file may be anything, even a secret)."""
    rows: list[tuple[int, float, float, float, float, str]] = []
    problems: list[Problem] = []
    found = 0
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        found += 1
        where = f"line {i}"
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            problems.append(Problem("box", "bad_line", source, f"{where}: not numeric"))
            continue
        box = _box_of_line(vals, kpt_shape)
        if isinstance(box, str):
            problems.append(Problem("box", "bad_line", source, f"{where}: {box}"))
            continue
        c = vals[0]
        if not math.isfinite(c) or c != int(c):
            problems.append(Problem("box", "bad_line", source, f"{where}: class is not an integer"))
            continue
        rows.append((int(c), *box, where))
    cls, boxes, more = clean_boxes(rows, nc, source)
    return LabelResult(cls, boxes, problems + more, found)


def coco_to_yolo(
    coco_boxes: Sequence[tuple[int, float, float, float, float, int]],
    height: int,
    width: int,
    source: str,
    nc: int,
    keep_crowd: bool = False,
) -> LabelResult:
    """Convert COCO top-left xywh pixel boxes `(class, x, y, w, h, iscrowd)` to normalized
    cx, cy, w, h of an image of `height` x `width` (its real decoded size). Crowd boxes
    are dropped ("crowd") unless `keep_crowd`."""
    rows: list[tuple[int, float, float, float, float, str]] = []
    problems: list[Problem] = []
    for j, (c, x, y, w, h, crowd) in enumerate(coco_boxes):
        where = f"annotation {j}"
        if crowd and not keep_crowd:
            problems.append(Problem("box", "crowd", source, f"{where}: iscrowd=1"))
            continue
        x, y, w, h = (float(v) for v in (x, y, w, h))
        rows.append((int(c), (x + w / 2) / width, (y + h / 2) / height, w / width, h / height, where))
    cls, boxes, more = clean_boxes(rows, nc, source)
    return LabelResult(cls, boxes, problems + more, len(coco_boxes))
