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
- Mosaic: four letterboxed ``S x S`` tiles meet at a random centre ``(cx, cy)`` drawn in
  ``[S/4, 3S/4]``; each fills one quadrant of the ``S x S`` canvas with the part of its tile
  nearest to that centre (at full scale, as ultralytics' mosaic does before its crop).
- Boxes are clipped to the visible area and kept when wider and taller than 2 px, with
  aspect ratio < 100 and more than 10 % of their area left (ultralytics' box_candidates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

FILL = 114  # letterbox / border grey, as ultralytics

# Layout of the per-sample parameter vector drawn by `sample_params` (float64).
P_MOSAIC, P_CX, P_CY = 0, 1, 2  # mosaic flag; mosaic centre (pixels)
P_PARTNERS = slice(3, 6)  # three uniforms in [0, 1): which samples fill the other quadrants
P_AFFINE = slice(6, 12)  # 2x3 affine, network-input canvas -> output (row-major)
P_HUE, P_SAT, P_VAL = 12, 13, 14  # hue shift (degrees), saturation and value gains
P_FLIP, P_SCALE = 15, 16  # flip flag (already inside the affine); scale factor
P_PROJ = slice(17, 20)  # bottom row of the 3x3 warp matrix: (0, 0, 1) unless perspective
P_FLIPUD = 20  # vertical flip flag (already inside the matrix)
P_MIX, P_MIX_PARTNER = 21, 22  # mixup: this sample's weight r (1 = no mixup); a uniform picking the partner
NUM_PARAMS = 23


class AugmentError(ValueError):
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
        p[P_CX], p[P_CY] = rng.integers(imgsz // 4, 3 * imgsz // 4 + 1, size=2)
    p[P_PARTNERS] = rng.random(3)
    m, scale, flip, flipud = _draw_matrix(rng, cfg, imgsz)
    p[P_AFFINE], p[P_PROJ] = m[:2].reshape(-1), m[2]
    p[P_FLIP], p[P_FLIPUD], p[P_SCALE] = float(flip), float(flipud), scale
    g = rng.uniform(-1, 1, 3) * (cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    p[P_HUE], p[P_SAT], p[P_VAL] = g[0] * 360.0, 1 + g[1], 1 + g[2]
    if mix and mosaic and cfg.mixup > 0 and rng.random() < cfg.mixup:
        p[P_MIX], p[P_MIX_PARTNER] = rng.beta(32.0, 32.0), rng.random()
    return p


def _draw_matrix(rng: np.random.Generator, cfg: AugmentConfig, imgsz: int) -> tuple[np.ndarray, float, bool, bool]:
    """(3x3 warp, scale, fliplr, flipud): ultralytics' ``T @ Sh @ R @ P @ C``, then the flips."""
    s_ = float(imgsz)
    persp = rng.uniform(-cfg.perspective, cfg.perspective, size=2) if cfg.perspective > 0 else np.zeros(2)
    angle = rng.uniform(-cfg.degrees, cfg.degrees)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    shear = np.tan(np.radians(rng.uniform(-cfg.shear, cfg.shear, size=2))) if cfg.shear > 0 else np.zeros(2)
    tx, ty = (0.5 + rng.uniform(-cfg.translate, cfg.translate, size=2)) * s_
    flip = cfg.fliplr > 0 and rng.random() < cfg.fliplr
    flipud = cfg.flipud > 0 and rng.random() < cfg.flipud
    if angle == 0 and not shear.any() and not persp.any():
        # snap to whole output pixels (scale to D/S, integer shift): the warp is then an exact
        # resize + paste, several times cheaper than a general warpAffine on the CPU
        d = max(1, round(scale * imgsz))
        scale = d / imgsz
        tx, ty = np.round(np.array([tx, ty]) - d / 2) + d / 2
    c = np.array([[1, 0, -s_ / 2], [0, 1, -s_ / 2], [0, 0, 1]])
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


def mosaic_quadrants(cx: int, cy: int, imgsz: int) -> np.ndarray:
    """int32 (4, 3, 2) per tile: in-anchor [y, x], shape [h, w], out-anchor [y, x] (multi_paste's layout).

    Tile order: top-left, top-right, bottom-left, bottom-right.
    """
    s = imgsz
    return np.array(
        [
            [[s - cy, s - cx], [cy, cx], [0, 0]],
            [[s - cy, 0], [cy, s - cx], [0, cx]],
            [[0, s - cx], [s - cy, cx], [cy, 0]],
            [[0, 0], [s - cy, s - cx], [cy, cx]],
        ],
        dtype=np.int32,
    )


def paste_regions(params: np.ndarray, imgsz: int) -> np.ndarray:
    """The four (in-anchor, shape, out-anchor) regions that build this sample's canvas:
    the mosaic quadrants, or (no mosaic) the four quadrants of tile 0 left in place."""
    q = mosaic_quadrants(int(params[P_CX]), int(params[P_CY]), imgsz)
    if not params[P_MOSAIC]:
        q[:, 0] = q[:, 2]
    return q


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
    tiles: list[tuple[np.ndarray, np.ndarray]], params: np.ndarray, imgsz: int,
    mix: tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of one output sample from its four tiles' labels ``(cls (n,), xyxy (n,4) in the tile)``.

    Applies the mosaic placement (or takes tile 0 alone), the warp, clipping and the
    candidate filter; returns ``(cls (m,), xyxy (m,4))`` in output pixels. mix: the mixup
    partner's (tiles' labels, params): its labels follow (mixup keeps both samples' labels).
    """
    c, b = _warped_boxes(tiles, params, imgsz)
    if mix is None:
        return c, b
    c2, b2 = _warped_boxes(*mix, imgsz)
    return np.concatenate([c, c2]), np.concatenate([b, b2])


def _warped_boxes(
    tiles: list[tuple[np.ndarray, np.ndarray]], params: np.ndarray, imgsz: int
) -> tuple[np.ndarray, np.ndarray]:
    s = imgsz
    a = warp_matrix(params)
    cls_parts, box_parts, ref_parts = [], [], []
    if params[P_MOSAIC]:
        quads = mosaic_quadrants(int(params[P_CX]), int(params[P_CY]), s)
        for (c, b), ((iy, ix), (qh, qw), (oy, ox)) in zip(tiles, quads, strict=True):
            if len(b) == 0 or qh == 0 or qw == 0:
                continue
            shifted = b + np.array([ox - ix, oy - iy, ox - ix, oy - iy], dtype=np.float64)
            clipped = _clip(shifted, ox, oy, ox + qw, oy + qh)
            # boxes outside their quadrant clip to lines: drop them (ultralytics' remove_zero_area_boxes),
            # or a rotation would turn a line into a box over nothing
            seen = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
            cls_parts.append(c[seen])
            ref_parts.append(_area(shifted[seen]))
            box_parts.append(clipped[seen])
    else:
        c, b = tiles[0]
        cls_parts.append(c)
        ref_parts.append(_area(b))
        box_parts.append(_clip(b, 0, 0, s, s))
    if not box_parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    cls = np.concatenate(cls_parts).astype(np.int64)
    boxes = np.concatenate(box_parts).reshape(-1, 4)
    ref = np.concatenate(ref_parts) * params[P_SCALE] ** 2
    out = _clip(affine_boxes(boxes, a), 0, 0, s, s)
    keep = box_candidates(out, ref)
    return cls[keep], out[keep]


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
