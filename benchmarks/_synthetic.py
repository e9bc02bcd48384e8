"""Synthetic detection sets for benchmarks/learn.py: coloured shapes on textured backgrounds, YOLO layout.

Two sets that differ in shapes, object sizes, object counts and image sizes (`SETS`):

- ``shapes``: 4 classes (circle, square, triangle, cross), 1-4 objects of 1/8..1/3 of the short
  side, images 200..320 px (the set of issue 11: 320 train / 64 val, trained at 256 px);
- ``dense``: 5 other classes (diamond, ring, star, hexagon, bar), 3-12 objects of 1/16..1/5 of the
  short side, wider images 240..480 px (so most are downscaled, and objects are small).

Every box is the tight box of the pixels the shape covers (drawn once on a mask), so labels are
exact for any shape. Deterministic for a (set, seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Drawer = Callable[[np.ndarray, int, int, int, tuple[int, ...], np.random.Generator], None]


@dataclass(frozen=True)
class SetSpec:
    """How one synthetic set is drawn."""

    name: str
    classes: tuple[str, ...]
    side: tuple[int, int]  # image width and height drawn independently in [lo, hi]
    count: tuple[int, int]  # objects per image in [lo, hi]
    size: tuple[int, int]  # object side = min(h, w) // size[1] .. min(h, w) // size[0]
    n_train: int = 320
    n_val: int = 64
    imgsz: int = 256  # training size used by the benchmark


def _poly(img: np.ndarray, pts: np.ndarray, color: tuple[int, ...]) -> None:
    cv2.fillPoly(img, [np.round(pts).astype(np.int32)], color, lineType=cv2.LINE_AA)


def _regular(x0: int, y0: int, s: int, k: int, phase: float, inner: float = 1.0) -> np.ndarray:
    """k-gon (or 2k-point star with `inner` < 1) inscribed in the s x s box at (x0, y0)."""
    r = (s - 1) / 2
    n = 2 * k if inner < 1 else k
    a = phase + np.arange(n) * 2 * math.pi / n
    rad = np.where(np.arange(n) % 2, r * inner, r) if inner < 1 else np.full(n, r)
    return np.stack([x0 + r + rad * np.cos(a), y0 + r + rad * np.sin(a)], 1)


def _circle(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    cv2.circle(img, (x0 + s // 2, y0 + s // 2), s // 2, color, -1, lineType=cv2.LINE_AA)


def _square(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    cv2.rectangle(img, (x0, y0), (x0 + s - 1, y0 + s - 1), color, -1)


def _triangle(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    _poly(img, np.array([[x0 + s / 2, y0], [x0, y0 + s - 1], [x0 + s - 1, y0 + s - 1]]), color)


def _cross(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    t = max(2, s // 4)
    c = (s - t) // 2
    cv2.rectangle(img, (x0 + c, y0), (x0 + c + t - 1, y0 + s - 1), color, -1)
    cv2.rectangle(img, (x0, y0 + c), (x0 + s - 1, y0 + c + t - 1), color, -1)


def _diamond(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    _poly(img, _regular(x0, y0, s, 4, 0.0), color)


def _ring(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    cv2.circle(img, (x0 + s // 2, y0 + s // 2), s // 2 - max(1, s // 10), color, max(2, s // 5),
               lineType=cv2.LINE_AA)


def _star(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    _poly(img, _regular(x0, y0, s, 5, -math.pi / 2, inner=0.45), color)


def _hexagon(img, x0, y0, s, color, rng):  # noqa: ANN001, ARG001
    _poly(img, _regular(x0, y0, s, 6, 0.0), color)


def _bar(img, x0, y0, s, color, rng):  # noqa: ANN001
    """A thin bar, horizontal or vertical: boxes with aspect ratios of 3..5."""
    t = max(3, int(s / rng.uniform(3, 5)))
    if rng.random() < 0.5:
        cv2.rectangle(img, (x0, y0 + (s - t) // 2), (x0 + s - 1, y0 + (s - t) // 2 + t - 1), color, -1)
    else:
        cv2.rectangle(img, (x0 + (s - t) // 2, y0), (x0 + (s - t) // 2 + t - 1, y0 + s - 1), color, -1)


DRAWERS: dict[str, Drawer] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross,
    "diamond": _diamond, "ring": _ring, "star": _star, "hexagon": _hexagon, "bar": _bar,
}

SETS: dict[str, SetSpec] = {
    "shapes": SetSpec("shapes", ("circle", "square", "triangle", "cross"), side=(200, 320), count=(1, 4), size=(3, 8)),
    "dense": SetSpec("dense", ("diamond", "ring", "star", "hexagon", "bar"), side=(240, 480), count=(3, 12),
                     size=(5, 16)),
}


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Texture: low-frequency colour noise + stripes or a checkerboard + pixel noise."""
    small = rng.uniform(40, 200, (max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 24)
    if rng.random() < 0.5:
        ang = rng.uniform(0, math.pi)
        pattern = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
    else:
        pattern = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    img += pattern[..., None] * rng.uniform(8, 30)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, h: int, w: int, s: int, taken: list[tuple[int, int, int, int]]):
    """A free s x s spot (no overlap with `taken`, so every label stays fully visible), or None."""
    for _ in range(30):
        x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if all(x0 + s < b[0] or b[2] < x0 or y0 + s < b[1] or b[3] < y0 for b in taken):
            return x0, y0
    return None


def draw_image(spec: SetSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """One image (BGR) and its YOLO label lines."""
    w, h = (int(v) for v in rng.integers(spec.side[0], spec.side[1] + 1, size=2))
    img = background(rng, h, w)
    taken: list[tuple[int, int, int, int]] = []
    lines = []
    for _ in range(int(rng.integers(spec.count[0], spec.count[1] + 1))):
        s = int(rng.integers(min(h, w) // spec.size[1], min(h, w) // spec.size[0] + 1))
        spot = _place(rng, h, w, s, taken)
        if spot is None:
            continue
        x0, y0 = spot
        c = int(rng.integers(0, len(spec.classes)))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        mask = np.zeros((h, w), np.uint8)
        state = rng.bit_generator.state  # the same random choices (bar orientation) for mask and image
        DRAWERS[spec.classes[c]](mask, x0, y0, s, (255,), rng)
        rng.bit_generator.state = state
        DRAWERS[spec.classes[c]](img, x0, y0, s, color, rng)
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # tight box, pixel edges
        taken.append((x0, y0, x0 + s, y0 + s))
        lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return img, lines


def make_set(root: Path, spec: SetSpec, seed: int = 0, n_train: int | None = None, n_val: int | None = None) -> Path:
    """Write the set in YOLO layout (images/, labels/, data.yaml) under `root`; returns `root`."""
    rng = np.random.default_rng([seed, sum(map(ord, spec.name))])
    for split, n in (("train", n_train or spec.n_train), ("val", n_val or spec.n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lines = draw_image(spec, rng)
            cv2.imwrite(str(root / "images" / split / f"{split}{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            (root / "labels" / split / f"{split}{i:04d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "data.yaml").write_text(
        f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(spec.classes)))
    return root
