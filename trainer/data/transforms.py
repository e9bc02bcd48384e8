"""Training augmentation parameters and the box geometry of the letterbox and augmentations.

The single definition of the augmentation parameters (`AugmentConfig`, ultralytics' names
and defaults) and of how random per-sample parameters are drawn (`sample_params`). Both
loader families use the same parameter vector and the same box arithmetic (pure numpy on
boxes, here); they differ only in who moves the pixels (OpenCV in `pixels`, DALI operators in
`dali_loader`).

Geometry conventions:

- Boxes inside this module are pixel ``xyxy`` in continuous coordinates (pixel edges at
  integers); they leave as YOLO ``cx, cy, w, h`` normalized to the ``S x S`` network input.
- Letterbox (like ultralytics): resize so the long side is ``S`` (``r = S / max(h, w)``, up
  or down), then pad centred with 114 to ``S x S``.
- Training pipeline per sample: letterboxed tile -> mosaic of 4 tiles (probability
  ``mosaic``) -> one warp (ultralytics' RandomPerspective matrix ``T @ Sh @ R @ P @ C``:
  perspective ``+- perspective``, rotation ``+- degrees`` with scale ``1 +- scale``, shear
  ``+- shear`` degrees, translation ``+- translate``; then horizontal / vertical flips with
  probabilities ``fliplr`` / ``flipud`` folded into the same matrix; a perspective warp only
  when ``perspective > 0``, as ultralytics) -> [mixup, probability ``mixup``: blended at
  ``r ~ Beta(32, 32)`` with a second sample made the same way, labels of both kept] -> HSV.
- Mosaic (ultralytics' Mosaic._mosaic4): a ``2S x 2S`` canvas filled with 114; the four images,
  resized to long side ``S`` without letterbox padding, each touch the centre ``(cx, cy)``
  (drawn in ``[S/2, 3S/2)``) with one corner (top-left image: its bottom-right corner, ...),
  clipped to the canvas (`mosaic_layout`). The warp then maps that canvas to the ``S x S`` output
  with centre shift ``-S`` (``-S/2`` for a sample without mosaic, whose canvas is its tile).
  Boxes are clipped to the canvas (zero-area ones dropped) before the warp, and that clipped
  area times ``scale**2`` is box_candidates' reference, as ultralytics.
- Boxes are clipped to the visible area and kept when wider and taller than 2 px, with
  aspect ratio < 100 and more than 10 % of their area left (ultralytics' box_candidates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from packer.errors import PackerError

FILL = 114  # letterbox / border grey, as ultralytics

# Layout of the per-sample parameter vector drawn by `sample_params` (float64).
P_MOSAIC, P_CX, P_CY = 0, 1, 2  # mosaic flag; mosaic centre (pixels)
P_PARTNERS = slice(3, 6)  # three uniforms in [0, 1): which samples fill the other quadrants
P_AFFINE = slice(6, 12)  # 2x3 affine, canvas (2S mosaic / S tile) -> S output (row-major)
P_HUE, P_SAT, P_VAL = 12, 13, 14  # hue shift (degrees), saturation and value gains
P_FLIP, P_SCALE = 15, 16  # flip flag (already inside the affine); scale factor
P_PROJ = slice(17, 20)  # bottom row of the 3x3 warp matrix: (0, 0, 1) unless perspective
P_FLIPUD = 20  # vertical flip flag (already inside the matrix)
P_MIX, P_MIX_PARTNER = 21, 22  # mixup: this sample's weight r (1 = no mixup); a uniform picking the partner
NUM_PARAMS = 23


class AugmentError(PackerError, ValueError):
    """An augmentation parameter is out of range."""


@dataclass
class AugmentConfig:
    """Training augmentation parameters (ultralytics' names and defaults)."""

    hsv_h: float = 0.015  # hue shift, fraction of the hue circle
    hsv_s: float = 0.7  # saturation gain range (+-)
    hsv_v: float = 0.4  # value gain range (+-)
    degrees: float = 0.0  # rotation range (+- degrees)
    translate: float = 0.1  # translation range (+- fraction of the image size)
    scale: float = 0.5  # scale range (1 +- scale)
    shear: float = 0.0  # shear range (+- degrees)
    perspective: float = 0.0  # perspective range (+-), ultralytics suggests <= 0.001
    flipud: float = 0.0  # vertical flip probability
    fliplr: float = 0.5  # horizontal flip probability
    mosaic: float = 1.0  # mosaic probability; 0 = off
    mixup: float = 0.0  # mixup probability

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise AugmentError(f"augmentation {f.name}={v!r}: must be a finite number >= 0")
        for name in ("fliplr", "flipud", "mosaic", "mixup", "hsv_h", "hsv_s", "hsv_v", "translate"):
            if getattr(self, name) > 1:
                raise AugmentError(f"augmentation {name}={getattr(self, name)}: must be in [0, 1]")
        if self.scale >= 1:
            raise AugmentError(f"augmentation scale={self.scale}: must be in [0, 1)")
        if self.shear >= 90:
            raise AugmentError(f"augmentation shear={self.shear}: must be in [0, 90) degrees")
        if self.perspective >= 0.1:  # 0.1 folds a 640 px image over itself; ultralytics uses <= 0.001
            raise AugmentError(f"augmentation perspective={self.perspective}: must be in [0, 0.1)")

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all (letterbox only)."""
        return cls(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0, scale=0, shear=0, perspective=0, flipud=0,
                   fliplr=0, mosaic=0, mixup=0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def is_off(self) -> bool:
        return all(v == 0 for v in asdict(self).values())


# ----------------------------------------------------------------------------- parameters


def identity_params(imgsz: int) -> np.ndarray:
    """The parameter vector of 'no augmentation'."""
    p = np.zeros(NUM_PARAMS, dtype=np.float64)
    p[P_CX] = p[P_CY] = imgsz // 2
    p[P_AFFINE] = (1, 0, 0, 0, 1, 0)
    p[P_SAT] = p[P_VAL] = p[P_SCALE] = 1.0
    p[P_PROJ] = (0, 0, 1)
    p[P_MIX] = 1.0
    return p


def warp_matrix(params: np.ndarray) -> np.ndarray:
    """The 3x3 warp matrix of a parameter vector (network-input canvas -> output)."""
    return np.vstack([params[P_AFFINE].reshape(2, 3), params[P_PROJ]])


def sample_params(rng: np.random.Generator, cfg: AugmentConfig, imgsz: int, *, mosaic: bool = True,
                  mix: bool = True) -> np.ndarray:
    """Draw one sample's random augmentation parameters (see the P_* layout).

    `mosaic=False` disables mosaic and mixup regardless of `cfg` (close-mosaic epochs, as
    ultralytics' close_mosaic); `mix=False` disables mixup (the mixup partner itself). Options at 0 draw nothing, so their random stream
    is that of a configuration without them.
    """
    p = identity_params(imgsz)
    if mosaic and cfg.mosaic > 0 and rng.random() < cfg.mosaic:
        p[P_MOSAIC] = 1
        p[P_CX], p[P_CY] = rng.integers(imgsz // 2, 3 * imgsz // 2, size=2)  # int(U[S/2, 3S/2)), as ultralytics
    p[P_PARTNERS] = rng.random(3)
    m, scale, flip, flipud = _draw_matrix(rng, cfg, imgsz, float(imgsz) if p[P_MOSAIC] else imgsz / 2)
    p[P_AFFINE], p[P_PROJ] = m[:2].reshape(-1), m[2]
    p[P_FLIP], p[P_FLIPUD], p[P_SCALE] = float(flip), float(flipud), scale
    g = rng.uniform(-1, 1, 3) * (cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    p[P_HUE], p[P_SAT], p[P_VAL] = g[0] * 360.0, 1 + g[1], 1 + g[2]
    if mix and mosaic and cfg.mixup > 0 and rng.random() < cfg.mixup:
        p[P_MIX], p[P_MIX_PARTNER] = rng.beta(32.0, 32.0), rng.random()
    return p


def _draw_matrix(rng: np.random.Generator, cfg: AugmentConfig, imgsz: int,
                 centre: float) -> tuple[np.ndarray, float, bool, bool]:
    """(3x3 warp, scale, fliplr, flipud): ultralytics' ``T @ Sh @ R @ P @ C``, then the flips;
    C shifts by -centre (S on the 2S mosaic canvas, S/2 on a lone S x S tile)."""
    s_ = float(imgsz)
    persp = rng.uniform(-cfg.perspective, cfg.perspective, size=2) if cfg.perspective > 0 else np.zeros(2)
    angle = rng.uniform(-cfg.degrees, cfg.degrees)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    shear = np.tan(np.radians(rng.uniform(-cfg.shear, cfg.shear, size=2))) if cfg.shear > 0 else np.zeros(2)
    tx, ty = (0.5 + rng.uniform(-cfg.translate, cfg.translate, size=2)) * s_
    flip = cfg.fliplr > 0 and rng.random() < cfg.fliplr
    flipud = cfg.flipud > 0 and rng.random() < cfg.flipud
    if angle == 0 and not shear.any() and not persp.any():
        # snap the shift (by < scale/2 output pixels) so that the output's top-left corner lies on
        # a whole canvas pixel: the warp is then a crop + cv2.resize (pixels.warp), 2-3x cheaper
        # than warpAffine on the CPU
        tx, ty = scale * (centre - np.round(centre - np.array([tx, ty]) / scale))
    c = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]])
    pm = np.eye(3)
    pm[2, :2] = persp
    r = np.eye(3)
    r[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=scale)
    sh = np.array([[1, shear[0], 0], [shear[1], 1, 0], [0, 0, 1]])
    t = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    f = np.array([[-1, 0, s_], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
    fu = np.array([[1, 0, 0], [0, -1, s_], [0, 0, 1]]) if flipud else np.eye(3)
    return fu @ f @ t @ sh @ r @ pm @ c, scale, flip, flipud


def mix_partner(params: np.ndarray, own: int, pool: int) -> int | None:
    """Index (into a pool of `pool` samples) of this sample's mixup partner; None without mixup."""
    if params[P_MIX] >= 1:
        return None
    return min(int(params[P_MIX_PARTNER] * pool), pool - 1)


def partner_ids(params: np.ndarray, own: int, pool: int) -> list[int]:
    """Indices (into a pool of `pool` samples) of the four mosaic tiles; tile 0 is the sample itself."""
    if not params[P_MOSAIC]:
        return [own] * 4
    return [own] + [min(int(u * pool), pool - 1) for u in params[P_PARTNERS]]


# ----------------------------------------------------------------------------- geometry


def letterbox_geometry(h: int, w: int, imgsz: int) -> tuple[float, float, int, int, int, int]:
    """(gain_x, gain_y, pad_x, pad_y, new_w, new_h) of the letterbox of an h x w image.

    Pixel x of the input lands at ``x * gain_x + pad_x`` (same for y), exactly.
    """
    r = imgsz / max(h, w)
    # ceil like ultralytics' load_image (the small margin absorbs float error; DALI does the same)
    nw, nh = max(1, min(imgsz, math.ceil(w * r - 1e-3))), max(1, min(imgsz, math.ceil(h * r - 1e-3)))
    px, py = (imgsz - nw) // 2, (imgsz - nh) // 2
    return nw / w, nh / h, px, py, nw, nh


def mosaic_layout(xc: int, yc: int, sizes: list[tuple[int, int]], imgsz: int) -> np.ndarray:
    """int (4, 8) per tile: canvas region ``x1a, y1a, x2a, y2a`` and image region ``x1b, y1b, x2b, y2b``
    (in the resized image, no letterbox padding) as ultralytics' Mosaic._mosaic4 computes them.

    sizes: each tile's resized (w, h); tile order top-left, top-right, bottom-left, bottom-right;
    canvas ``2S x 2S``; each image touches (xc, yc) with its inner corner.
    """
    s2 = 2 * imgsz
    out = np.zeros((4, 8), dtype=np.int64)
    for k, (w, h) in enumerate(sizes):
        if k == 0:
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif k == 1:
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s2), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif k == 2:
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s2, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s2), min(s2, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        out[k] = (x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b)
    return out


def tile_geometry(geom: tuple | None, imgsz: int) -> tuple[int, int, int, int]:
    """(px, py, nw, nh) of a letterboxed tile: `geom` as given, or (None) a tile the image fills."""
    return (0, 0, imgsz, imgsz) if geom is None else tuple(int(v) for v in geom)  # type: ignore[return-value]


def paste_regions(params: np.ndarray, imgsz: int) -> np.ndarray:
    """int32 (4, 3, 2) per tile: in-anchor [y, x], shape [h, w], out-anchor [y, x] (multi_paste's
    layout) building this sample's 2S x 2S canvas from a (S, 5S) strip of five S x S versions of
    each image: versions 0-3 the resized image in the corner that touches the mosaic centre
    (bottom-right, bottom-left, top-right, top-left), version 4 the centred letterbox.

    Mosaic: block k of tile k with its inner corner at (cx, cy), clipped to the canvas (the 114
    around each image is the canvas' own fill, so the pixels are those of `mosaic_layout`).
    No mosaic: tile 0's version 4 at (S/2, S/2), in four quadrants (see `canvas_matrix`).
    """
    s = imgsz
    q = np.zeros((4, 3, 2), dtype=np.int32)
    if not params[P_MOSAIC]:
        h = s // 2
        for k, (y0, x0, hh, ww) in enumerate([(0, 0, h, h), (0, h, h, s - h), (h, 0, s - h, h), (h, h, s - h, s - h)]):
            q[k] = [[y0, 4 * s + x0], [hh, ww], [h + y0, h + x0]]
        return q
    cx, cy = int(params[P_CX]), int(params[P_CY])
    for k in range(4):
        oy0, ox0 = (cy - s if k < 2 else cy), (cx - s if k % 2 == 0 else cx)  # block's top-left on the canvas
        y0, x0 = max(oy0, 0), max(ox0, 0)
        y1, x1 = min(oy0 + s, 2 * s), min(ox0 + s, 2 * s)
        q[k] = [[y0 - oy0, k * s + x0 - ox0], [y1 - y0, x1 - x0], [y0, x0]]
    return q


def canvas_matrix(params: np.ndarray, imgsz: int) -> np.ndarray:
    """The 2x3 warp from the 2S canvas `paste_regions` builds to the output: the sample's own
    matrix, after a -S/2 shift for a lone tile (pasted at (S/2, S/2))."""
    a = warp_matrix(params)
    if not params[P_MOSAIC]:
        a = a @ np.array([[1, 0, -imgsz / 2], [0, 1, -imgsz / 2], [0, 0, 1]])
    return a[:2]


def norm_to_tile(boxes: np.ndarray, h: int, w: int, imgsz: int) -> np.ndarray:
    """Normalized cx,cy,w,h of an h x w stored image -> pixel xyxy in its letterboxed tile."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return norm_to_tile_many(b, np.full(len(b), h), np.full(len(b), w), imgsz)


def norm_to_tile_many(boxes: np.ndarray, h: np.ndarray, w: np.ndarray, imgsz: int) -> np.ndarray:
    """`norm_to_tile` of many boxes at once, box i belonging to an h[i] x w[i] stored image
    (the same float64 arithmetic as `letterbox_geometry`, vectorized)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = np.asarray(h, dtype=np.float64), np.asarray(w, dtype=np.float64)
    r = imgsz / np.maximum(h, w)
    nw = np.clip(np.ceil(w * r - 1e-3), 1, imgsz)
    nh = np.clip(np.ceil(h * r - 1e-3), 1, imgsz)
    px, py = (imgsz - nw) // 2, (imgsz - nh) // 2
    sx, sy = w * (nw / w), h * (nh / h)
    out = np.empty_like(b)
    out[:, 0] = (b[:, 0] - b[:, 2] / 2) * sx + px
    out[:, 1] = (b[:, 1] - b[:, 3] / 2) * sy + py
    out[:, 2] = (b[:, 0] + b[:, 2] / 2) * sx + px
    out[:, 3] = (b[:, 1] + b[:, 3] / 2) * sy + py
    return out


def affine_boxes(xyxy: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Transform boxes by a 2x3 affine or 3x3 perspective matrix: the enclosing box of the four
    transformed corners (ultralytics' apply_bboxes)."""
    if len(xyxy) == 0:
        return np.zeros((0, 4))
    x1, y1, x2, y2 = xyxy.T
    xs = np.stack([x1, x2, x1, x2], 1)
    ys = np.stack([y1, y1, y2, y2], 1)
    tx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    ty = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    if a.shape[0] == 3 and (a[2, 0] != 0 or a[2, 1] != 0):
        tz = a[2, 0] * xs + a[2, 1] * ys + a[2, 2]
        tx, ty = tx / tz, ty / tz
    return np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], 1)


def _clip(xyxy: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    out = xyxy.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(x0, x1)
    out[:, [1, 3]] = out[:, [1, 3]].clip(y0, y1)
    return out


def _area(b: np.ndarray) -> np.ndarray:
    return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)


def augment_boxes(
    tiles: list[tuple], params: np.ndarray, imgsz: int,
    mix: tuple[list[tuple], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of one output sample from its four tiles' labels ``(cls (n,), xyxy (n,4) in the tile
    [, (px, py, nw, nh) the tile's letterbox geometry])`` (no geometry: the image fills the tile).

    Applies the mosaic placement (or takes tile 0 alone), the warp, clipping and the
    candidate filter; returns ``(cls (m,), xyxy (m,4))`` in output pixels. mix: the mixup
    partner's (tiles' labels, params): its labels follow (mixup keeps both samples' labels).
    """
    c, b = _warped_boxes(tiles, params, imgsz)
    if mix is None:
        return c, b
    c2, b2 = _warped_boxes(*mix, imgsz)
    return np.concatenate([c, c2]), np.concatenate([b, b2])


def _warped_boxes(tiles: list[tuple], params: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    s = imgsz
    a = warp_matrix(params)
    if params[P_MOSAIC]:
        c, b = _mosaic_boxes(tiles, params, s)
        ref = _area(b)
    else:
        c, b = tiles[0][0], tiles[0][1]
        ref = _area(b)
        b = _clip(b, 0, 0, s, s)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    out = _clip(affine_boxes(b, a), 0, 0, s, s)
    keep = box_candidates(out, ref * params[P_SCALE] ** 2)
    return c.astype(np.int64)[keep], out[keep]


def _mosaic_boxes(tiles: list[tuple], params: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(cls, xyxy) of the four tiles on the 2S canvas: shifted by their paste offset, clipped to
    the canvas, zero-area boxes dropped (ultralytics' _cat_labels + remove_zero_area_boxes)."""
    geoms = [tile_geometry(t[2] if len(t) > 2 else None, s) for t in tiles]
    lay = mosaic_layout(int(params[P_CX]), int(params[P_CY]), [(g[2], g[3]) for g in geoms], s)
    cls_parts, box_parts = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 4))]
    for t, (px, py, _, _), (x1a, y1a, _, _, x1b, y1b, _, _) in zip(tiles, geoms, lay, strict=True):
        b = np.asarray(t[1], dtype=np.float64).reshape(-1, 4)
        cls_parts.append(np.asarray(t[0]).astype(np.int64).reshape(-1))
        box_parts.append(b + np.array([x1a - x1b - px, y1a - y1b - py] * 2, dtype=np.float64))
    b = _clip(np.concatenate(box_parts), 0, 0, 2 * s, 2 * s)
    keep = _area(b) > 0
    return np.concatenate(cls_parts)[keep], b[keep]


def box_candidates(xyxy: np.ndarray, ref_area: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1) -> np.ndarray:
    """ultralytics' rule: keep boxes wider/taller than `wh_thr` px, aspect < `ar_thr`, and
    more than `area_thr` of the reference (unclipped, scaled) area."""
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    ar = np.maximum(w / (h + 1e-16), h / (w + 1e-16))
    return (w > wh_thr) & (h > wh_thr) & (w * h / (ref_area + 1e-16) > area_thr) & (ar < ar_thr)


def xyxy_to_yolo(xyxy: np.ndarray, imgsz: int) -> np.ndarray:
    """Pixel xyxy -> cx,cy,w,h normalized to the S x S input (float32)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return (out / imgsz).astype(np.float32)
