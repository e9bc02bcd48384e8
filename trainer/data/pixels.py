"""Pixel side of the training augmentations: OpenCV on numpy RGB images.

Moves the pixels that `transforms` describes: the letterbox, the mosaic, the warp (a crop +
resize when the matrix is an axis-aligned scale with its corner on a canvas pixel), the mixup
blend and the HSV jitter. The parameter vector, the box geometry and the conventions
(continuous coordinates, 114 fill) are those of `trainer.data.transforms`; the DALI loader
moves the same pixels with its own operators.
"""

from __future__ import annotations

import math

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
                 geoms: list[tuple[int, int, int, int] | None] | None = None,
                 window: tuple[int, int, int] | None = None) -> np.ndarray:
    """The 2S x 2S mosaic canvas (114 fill) of four letterboxed S x S tiles: each tile's image (its
    (px, py, nw, nh) letterbox geometry in `geoms`; None: the image fills the tile) placed by
    `mosaic_layout` around (cx, cy), without its letterbox bands. window: (x0, y0, n), build only
    the n x n part of that canvas at (x0, y0) (it may reach outside the canvas: 114 there)."""
    gs = [tile_geometry(None if geoms is None else g, imgsz) for g in (geoms or [None] * 4)]
    x0, y0, n = window or (0, 0, 2 * imgsz)
    out = np.full((n, n, 3), FILL, dtype=np.uint8)
    lay = mosaic_layout(cx, cy, [(g[2], g[3]) for g in gs], imgsz)
    for t, (px, py, _, _), (x1a, y1a, x2a, y2a, x1b, y1b, _, _) in zip(tiles, gs, lay, strict=True):
        xa, ya, xb, yb = max(x1a, x0), max(y1a, y0), min(x2a, x0 + n), min(y2a, y0 + n)
        if xa < xb and ya < yb:  # the part of this image's canvas rectangle inside the window
            u, v = px + x1b - x1a, py + y1b - y1a  # canvas -> tile offset
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = t[ya + v : yb + v, xa + u : xb + u]
    return out


def warp(img: np.ndarray, a: np.ndarray, imgsz: int) -> np.ndarray:
    """Apply the 2x3 affine or 3x3 perspective matrix `a` (continuous coordinates) to a square
    canvas (S x S tile or 2S x 2S mosaic), giving S x S; 114 outside. A perspective warp
    (cv2.warpPerspective) only when the matrix has one; a crop + resize when `grid_crop` finds
    the matrix is one."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape == (3, 3) and (a[2, 0] != 0 or a[2, 1] != 0):
        # pixel centres: index = continuous - 0.5, so the matrix on indices is T(-.5) @ a @ T(+.5)
        half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        m = np.linalg.inv(half) @ a @ half
        return cv2.warpPerspective(img, m, (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))
    a = a.reshape(-1)[:6].reshape(2, 3)  # the 2x3 part (a 3x3 here has no perspective)
    grid = grid_crop(a, imgsz)
    if grid is not None:
        x0, y0, n, s, flips = grid
        if s == 1 and x0 == y0 == 0 and img.shape[:2] == (imgsz, imgsz):
            return img if flips is None else cv2.flip(img, flips)
        return resize_window(_window(img, x0, y0, n), s, flips, imgsz)
    # OpenCV samples at integer pixel centres: x_c' = a x_c + t  <=>  centres move by a(0.5) - 0.5
    m = a.copy()
    m[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return cv2.warpAffine(img, m, (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))


def grid_crop(a: np.ndarray, imgsz: int) -> tuple[int, int, int, float, int | None] | None:
    """(x0, y0, n, s, flip code) when the 2x3 affine `a` is an axis-aligned scale s (then flips)
    whose output's top-left corner lies on canvas pixel (x0, y0) (`sample_params` snaps the shift
    so): the warp is then the n x n canvas window at (x0, y0) resized by s. None otherwise, or
    when s < 0.5 (the window would outgrow the 2S canvas: warpAffine is cheaper)."""
    (a00, a01, a02), (a10, a11, a12) = a.tolist()
    s = abs(a00)
    if a01 != 0 or a10 != 0 or s < 0.5 or abs(abs(a11) - s) > 1e-12 * s:
        return None
    bx, by = (a02 if a00 > 0 else imgsz - a02), (a12 if a11 > 0 else imgsz - a12)  # shifts before flips
    x0, y0 = -bx / s, -by / s
    if abs(x0 - round(x0)) > 1e-6 or abs(y0 - round(y0)) > 1e-6:
        return None
    flips = {(True, False): 1, (False, True): 0, (True, True): -1}.get((a00 < 0, a11 < 0))
    return round(x0), round(y0), math.ceil(imgsz / s) + 1, s, flips


def _window(img: np.ndarray, x0: int, y0: int, n: int) -> np.ndarray:
    """The n x n part of `img` at (x0, y0), 114 where it reaches outside (a view when inside)."""
    h, w = img.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + n <= w and y0 + n <= h:
        return img[y0 : y0 + n, x0 : x0 + n]
    out = np.full((n, n, 3), FILL, dtype=np.uint8)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + n, w), min(y0 + n, h)
    if xa < xb and ya < yb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = img[ya:yb, xa:xb]
    return out


def resize_window(win: np.ndarray, s: float, flips: int | None, imgsz: int) -> np.ndarray:
    """The S x S output of a `grid_crop` warp from its canvas window: cv2.resize by exactly s
    (output pixel j samples window pixel (j + 0.5) / s - 0.5, the warp's own sampling), then the
    flips. Only difference from warpAffine: when s > 1 the first row and column read the
    window's edge instead of blending in the pixel before it (a fraction 0.5 - 0.5/s of a pixel)."""
    r = cv2.resize(win, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)[:imgsz, :imgsz]
    return r if flips is None else cv2.flip(r, flips)


def hsv_jitter(img: np.ndarray, hue_deg: float, sat: float, val: float, out: np.ndarray | None = None) -> np.ndarray:
    """ultralytics' RandomHSV (on an RGB image): hue shift (degrees), saturation/value gains.
    out: a contiguous (H, W, 3) uint8 array to write the result into (e.g. a batch slot)."""
    if hue_deg == 0 and sat == 1 and val == 1:
        if out is not None:
            out[...] = img
            return out
        return img
    c = hue_deg / 2  # OpenCV hue is 0..180 (2 degrees per step)
    if abs(c) > 75:  # the shifted hue would pass 255: ultralytics' own LUTs
        return _hsv_by_luts(img, c, sat, val, out)
    # ultralytics' three LUTs as one cv2.transform (0.16 ms instead of 0.9 ms at 640 x 640, 1 core):
    # offsets of -+0.499 turn the transform's rounding into the LUTs' truncation (x * 0 stays 0,
    # so grey never gains a colour), and OpenCV's HSV -> RGB wraps hues >= 180. A negative shift
    # is a positive one on the R/B-swapped image (the swap mirrors the hue circle): equal pixels
    # for shifts >= 0; for shifts < 0 about 1 % of pixels are one hue step (2 degrees) apart.
    to_hsv, to_rgb = (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if c >= 0 else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR)
    m = np.array([[1, 0, 0, abs(c) - 0.499 if c >= 0 else abs(c) + 0.499],
                  [0, sat, 0, -0.499], [0, 0, val, -0.499]], dtype=np.float32)
    hsv = cv2.cvtColor(img, to_hsv)
    cv2.transform(hsv, m, dst=hsv)
    return _into(cv2.cvtColor(hsv, to_rgb, dst=out), out)


def _hsv_by_luts(img: np.ndarray, c: float, sat: float, val: float, out: np.ndarray | None) -> np.ndarray:
    x = np.arange(256, dtype=np.float64)
    lut = np.empty((1, 256, 3), dtype=np.uint8)  # one 3-channel LUT: a single pass, no split/merge
    lut[0, :, 0] = (x + c) % 180
    lut[0, :, 1] = np.clip(x * sat, 0, 255)
    lut[0, :, 2] = np.clip(x * val, 0, 255)
    lut[0, 0, 1] = 0  # saturation 0 stays 0: grey/white never gains a colour (ultralytics >= 8.3.79)
    hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), lut)
    return _into(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=out), out)


def _into(res: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`out` holding `res` (OpenCV allocates anew when `out` is not usable as is: copy)."""
    if out is None or res is out:
        return res
    out[...] = res
    return out


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
    a = warp_matrix(params)
    if not params[P_MOSAIC]:
        return warp(tiles[0], a, imgsz)
    cx, cy = int(params[P_CX]), int(params[P_CY])
    grid = None if a[2, :2].any() else grid_crop(a[:2], imgsz)
    if grid is None:
        return warp(mosaic_image(tiles, cx, cy, imgsz, geoms), a, imgsz)
    x0, y0, n, s, flips = grid  # build only the window the resize reads, not the whole 2S canvas
    return resize_window(mosaic_image(tiles, cx, cy, imgsz, geoms, (x0, y0, n)), s, flips, imgsz)
