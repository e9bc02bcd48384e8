"""Pixel side of the training augmentations: OpenCV on numpy RGB images.

Moves the pixels that `transforms` describes: the letterbox, the mosaic, the warp (an exact
resize + paste when the matrix is an axis-aligned scale and whole-pixel shift), the mixup
blend and the HSV jitter. The parameter vector, the box geometry and the conventions
(continuous coordinates, 114 fill) are those of `trainer.data.transforms`; the DALI loader
moves the same pixels with its own operators.
"""

from __future__ import annotations

import cv2
import numpy as np

from trainer.data.transforms import (
    FILL,
    P_CX,
    P_CY,
    P_HUE,
    P_MIX,
    P_MOSAIC,
    P_SAT,
    P_VAL,
    letterbox_geometry,
    mosaic_layout,
    tile_geometry,
    warp_matrix,
)


def letterbox(img: np.ndarray, imgsz: int) -> np.ndarray:
    """Resize the long side to `imgsz` (INTER_LINEAR, like ultralytics) and pad centred with 114."""
    h, w = img.shape[:2]
    _, _, px, py, nw, nh = letterbox_geometry(h, w, imgsz)
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if (nw, nh) == (imgsz, imgsz):
        return np.ascontiguousarray(img)
    out = np.full((imgsz, imgsz, 3), FILL, dtype=np.uint8)
    out[py : py + nh, px : px + nw] = img
    return out


def mosaic_image(tiles: list[np.ndarray], cx: int, cy: int, imgsz: int,
                 geoms: list[tuple[int, int, int, int] | None] | None = None) -> np.ndarray:
    """The 2S x 2S mosaic canvas (114 fill) of four letterboxed S x S tiles: each tile's image (its
    (px, py, nw, nh) letterbox geometry in `geoms`; None: the image fills the tile) placed by
    `mosaic_layout` around (cx, cy), without its letterbox bands."""
    gs = [tile_geometry(None if geoms is None else g, imgsz) for g in (geoms or [None] * 4)]
    out = np.full((2 * imgsz, 2 * imgsz, 3), FILL, dtype=np.uint8)
    lay = mosaic_layout(cx, cy, [(g[2], g[3]) for g in gs], imgsz)
    for t, (px, py, _, _), (x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b) in zip(tiles, gs, lay, strict=True):
        out[y1a:y2a, x1a:x2a] = t[py + y1b : py + y2b, px + x1b : px + x2b]
    return out


def warp(img: np.ndarray, a: np.ndarray, imgsz: int) -> np.ndarray:
    """Apply the 2x3 affine or 3x3 perspective matrix `a` (continuous coordinates) to a square
    canvas (S x S tile or 2S x 2S mosaic), giving S x S; 114 outside. A perspective warp
    (cv2.warpPerspective) only when the matrix has one."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape == (3, 3) and (a[2, 0] != 0 or a[2, 1] != 0):
        # pixel centres: index = continuous - 0.5, so the matrix on indices is T(-.5) @ a @ T(+.5)
        half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        m = np.linalg.inv(half) @ a @ half
        return cv2.warpPerspective(img, m, (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))
    a = a.reshape(-1)[:6].reshape(2, 3)  # the 2x3 part (a 3x3 here has no perspective)
    (a00, a01, a02), (a10, a11, a12) = a.tolist()
    d = a11 * img.shape[0]  # the scaled size of the input canvas (S or 2S), not of the output
    bx = a02 if a00 > 0 else imgsz - a02  # x offset before the flip
    # the resize + paste only pays on an S x S tile: on the 2S mosaic canvas it would resample up to
    # 9 S^2 pixels, warpAffine only the S^2 of the output (about 2x faster at S = 640)
    if img.shape[0] == imgsz and a01 == a10 == 0 and abs(a00) == a11 > 0 and all(
            abs(v - round(v)) < 1e-6 for v in (d, bx, a12)):
        return _resize_paste(img, round(d), round(bx), round(a12), a00 < 0, imgsz)
    # OpenCV samples at integer pixel centres: x_c' = a x_c + t  <=>  centres move by a(0.5) - 0.5
    m = a.copy()
    m[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return cv2.warpAffine(img, m, (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))


def _resize_paste(img: np.ndarray, d: int, bx: int, by: int, flip: bool, imgsz: int) -> np.ndarray:
    """The axis-aligned affine x' = (d/n) x + b on an n x n canvas (then optional flip) as resize +
    paste: exact. Only the visible part is flipped (pasted at the mirrored place), never the whole canvas."""
    n = img.shape[0]
    if d == n == imgsz and bx == by == 0:
        return cv2.flip(img, 1) if flip else img
    r = img if d == n else cv2.resize(img, (d, d), interpolation=cv2.INTER_LINEAR)
    out = np.full((imgsz, imgsz, 3), FILL, dtype=np.uint8)
    x0, y0, x1, y1 = max(bx, 0), max(by, 0), min(bx + d, imgsz), min(by + d, imgsz)
    if x0 < x1 and y0 < y1:
        part = r[y0 - by : y1 - by, x0 - bx : x1 - bx]
        if flip:
            out[y0:y1, imgsz - x1 : imgsz - x0] = cv2.flip(part, 1)
        else:
            out[y0:y1, x0:x1] = part
    return out


def hsv_jitter(img: np.ndarray, hue_deg: float, sat: float, val: float, out: np.ndarray | None = None) -> np.ndarray:
    """ultralytics' RandomHSV (on an RGB image): hue shift (degrees), saturation/value gains.
    out: a contiguous (H, W, 3) uint8 array to write the result into (e.g. a batch slot)."""
    if hue_deg == 0 and sat == 1 and val == 1:
        if out is not None:
            out[...] = img
            return out
        return img
    x = np.arange(256, dtype=np.float64)
    lut = np.empty((1, 256, 3), dtype=np.uint8)  # one 3-channel LUT: a single pass, no split/merge
    lut[0, :, 0] = (x + hue_deg / 2) % 180  # OpenCV hue is 0..180 (2 degrees per step)
    lut[0, :, 1] = np.clip(x * sat, 0, 255)
    lut[0, :, 2] = np.clip(x * val, 0, 255)
    lut[0, 0, 1] = 0  # saturation 0 stays 0: grey/white never gains a colour (ultralytics >= 8.3.79)
    hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), lut)
    if out is not None:
        res = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=out)
        if res is not out:  # OpenCV allocated anew (out not usable as is): copy
            out[...] = res
        return out
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def augment_image(tiles: list[np.ndarray], params: np.ndarray, imgsz: int, out: np.ndarray | None = None,
                  mix: tuple | None = None, geoms: list | None = None) -> np.ndarray:
    """Pixels of one output sample from its four letterboxed tiles (RGB, S x S), written into
    `out` (a contiguous S x S x 3 array, e.g. a batch slot) when given. geoms: the tiles'
    (px, py, nw, nh) letterbox geometry (None: the images fill their tiles). mix: the mixup
    partner's (tiles, params[, geoms]), blended in at weight ``1 - params[P_MIX]`` before the HSV jitter."""
    img = _warped_image(tiles, params, imgsz, geoms)
    if mix is not None:
        r = float(params[P_MIX])
        img = cv2.addWeighted(img, r, _warped_image(*mix, imgsz) if len(mix) == 2 else
                              _warped_image(mix[0], mix[1], imgsz, mix[2]), 1 - r, 0)
    return hsv_jitter(img, params[P_HUE], params[P_SAT], params[P_VAL], out=out)


def _warped_image(tiles: list[np.ndarray], params: np.ndarray, imgsz: int, geoms: list | None = None) -> np.ndarray:
    if params[P_MOSAIC]:
        img = mosaic_image(tiles, int(params[P_CX]), int(params[P_CY]), imgsz, geoms)
    else:
        img = tiles[0]
    return warp(img, warp_matrix(params), imgsz)
