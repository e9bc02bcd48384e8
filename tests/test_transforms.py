"""Letterbox / flip / affine / mosaic / HSV arithmetic on small exact cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trainer.data.pixels import augment_image, grid_crop, hsv_jitter, letterbox, mosaic_image, warp
from trainer.data.transforms import (
    FILL,
    P_AFFINE,
    P_FLIP,
    P_MOSAIC,
    AugmentConfig,
    AugmentError,
    affine_boxes,
    augment_boxes,
    box_candidates,
    canvas_matrix,
    identity_params,
    letterbox_geometry,
    mosaic_layout,
    norm_to_tile,
    paste_regions,
    sample_params,
    xyxy_to_yolo,
)


@pytest.mark.parametrize(
    ("h", "w", "s", "want"),
    [
        (480, 640, 640, (1.0, 1.0, 0, 80, 640, 480)),
        (640, 427, 320, (214 / 427, 0.5, 53, 0, 214, 320)),  # ceil(213.5) = 214, like ultralytics
        (100, 50, 64, (32 / 50, 64 / 100, 16, 0, 32, 64)),  # upscaled
        (64, 64, 64, (1.0, 1.0, 0, 0, 64, 64)),
        (100, 30, 64, (20 / 30, 0.64, 22, 0, 20, 64)),  # ceil(19.2) = 20, not round
    ],
)
def test_letterbox_geometry(h, w, s, want):
    got = letterbox_geometry(h, w, s)
    assert got[2:] == want[2:]
    assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])


def test_letterbox_pixels_centred_with_114():
    img = np.full((30, 60, 3), 7, np.uint8)
    out = letterbox(img, 64)
    gx, gy, px, py, nw, nh = letterbox_geometry(30, 60, 64)
    assert out.shape == (64, 64, 3) and (px, py, nw, nh) == (0, 16, 64, 32)
    assert (out[:16] == FILL).all() and (out[48:] == FILL).all() and (out[16:48] == 7).all()


def test_boxes_to_tile_and_back():
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = norm_to_tile(boxes, 30, 60, 64)  # 60x30 -> 64x32 at y offset 16
    np.testing.assert_allclose(xyxy[0], [25.6, 25.6, 38.4, 38.4])
    back = xyxy_to_yolo(xyxy, 64)
    np.testing.assert_allclose(back[:, 0], boxes[:, 0], atol=1e-6)  # x spans the full width
    np.testing.assert_allclose(back[:, 3], boxes[:, 3] * 32 / 64, atol=1e-6)


def test_flip_pixels_and_boxes_agree():
    img = np.zeros((8, 8, 3), np.uint8)
    img[2:5, 1:3] = 255  # a 3x2 block at x in [1, 3)
    a = np.array([[-1, 0, 8], [0, 1, 0]], float)
    out = warp(img, a, 8)
    assert (out[2:5, 5:7] == 255).all() and out.sum() == img.sum()
    np.testing.assert_allclose(affine_boxes(np.array([[1.0, 2, 3, 5]]), a), [[5, 2, 7, 5]])


def test_warp_scale_keeps_pixel_grid():
    """A 2x scale about the origin maps pixel [1,2) to [2,4): OpenCV's centre convention is corrected."""
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 1] = 200
    out = warp(img, np.array([[2, 0, 0], [0, 2, 0]], float), 8)[4, :, 0]
    assert out[2] == out[3] and out[2] > 100 and out[1] < out[2] and out[4] < out[2]


def test_mosaic_layout_touches_the_centre():
    """ultralytics' _mosaic4 arithmetic: each image's inner corner at (xc, yc), clipped to 2S."""
    s, sizes = 64, [(64, 48), (40, 64), (64, 64), (20, 64)]
    for xc, yc in [(32, 32), (64, 64), (95, 40), (33, 90)]:
        lay = mosaic_layout(xc, yc, sizes, s)
        for k, ((w, h), (x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b)) in enumerate(zip(sizes, lay, strict=True)):
            assert 0 <= x1a <= x2a <= 2 * s and 0 <= y1a <= y2a <= 2 * s
            assert (x2a - x1a, y2a - y1a) == (x2b - x1b, y2b - y1b) and x1b >= 0 and x2b <= w and y2b <= h
            assert (x2a if k % 2 == 0 else x1a) == xc and (y2a if k < 2 else y1a) == yc


def _tiles_and_geoms(s, sizes, values):
    tiles, geoms = [], []
    for (h, w), v in zip(sizes, values, strict=True):
        tiles.append(letterbox(np.full((h, w, 3), v, np.uint8), s))
        geoms.append(letterbox_geometry(h, w, s)[2:])
    return tiles, geoms


def test_mosaic_quadrants_are_the_four_images_flush_at_the_centre():
    """Centre (S, S), scale 1, no translation: each output quadrant is one image, no letterbox band
    nor grey at the junction (the images are 48 / 64 px on their short side: >= S/2)."""
    s = 64
    tiles, geoms = _tiles_and_geoms(s, [(48, 64), (64, 48), (64, 64), (40, 64)], (10, 20, 30, 40))
    cfg = AugmentConfig(**(AugmentConfig.off().to_dict() | {"mosaic": 1.0}))
    p = sample_params(np.random.default_rng(0), cfg, s)
    p[1] = p[2] = s
    np.testing.assert_allclose(p[P_AFFINE], [1, 0, -s / 2, 0, 1, -s / 2])  # centre shift -S, translate S/2
    out = augment_image(tiles, p, s, geoms=geoms)
    h = s // 2
    for (ys, xs), v in zip([(slice(0, h), slice(0, h)), (slice(0, h), slice(h, s)), (slice(h, s), slice(0, h)),
                            (slice(h, s), slice(h, s))], (10, 20, 30, 40), strict=True):
        assert (out[ys, xs] == v).all(), v
    # boxes: an object in each image's inner corner lands at the output centre
    inner = [np.array([[px + nw - 8.0, py + nh - 8, px + nw, py + nh]]) if k == 0 else
             np.array([[px + 0.0, py + nh - 8, px + 8, py + nh]]) if k == 1 else
             np.array([[px + nw - 8.0, py + 0, px + nw, py + 8]]) if k == 2 else
             np.array([[px + 0.0, py + 0, px + 8, py + 8]]) for k, (px, py, nw, nh) in enumerate(geoms)]
    cls, boxes = augment_boxes([(np.array([k]), b, g) for k, (b, g) in enumerate(zip(inner, geoms, strict=True))],
                               p, s)
    assert cls.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(boxes, [[h - 8, h - 8, h, h], [h, h - 8, h + 8, h], [h - 8, h, h, h + 8],
                                       [h, h, h + 8, h + 8]])


def test_mosaic_pixels_and_boxes():
    s, cx, cy = 64, 50, 80
    tiles, geoms = _tiles_and_geoms(s, [(32, 64), (64, 64), (64, 64), (64, 32)], (10, 20, 30, 40))
    out = mosaic_image(tiles, cx, cy, s, geoms)
    assert out.shape == (2 * s, 2 * s, 3)
    assert out[cy - 1, cx - 1, 0] == 10 and out[cy - 1, cx, 0] == 20 and out[cy, cx - 1, 0] == 30
    assert out[cy, cx, 0] == 40 and out[cy, cx + 32, 0] == FILL  # tile 3 is 32 px wide, no band
    assert out[cy - 33, cx - 1, 0] == FILL and out[cy - 32, cx - 1, 0] == 10  # tile 0 is 32 px tall
    p = identity_params(s)
    p[P_MOSAIC], p[1], p[2] = 1, cx, cy
    p[P_AFFINE] = [1, 0, s / 2 - cx, 0, 1, s / 2 - cy]  # the output's centre shows the mosaic centre
    box0 = (np.array([1]), np.array([[s - 10.0, 16 + 22, s - 2, 16 + 30]]), geoms[0])  # tile 0: 16 px band
    box1 = (np.array([2]), np.array([[0.0, 50, 10, 60]]), geoms[1])
    box2 = (np.array([4]), np.array([[0.0, 5, 10, 15]]), geoms[2])  # left of the canvas (x < 0): dropped
    box3 = (np.array([3]), np.array([[16.0, 0, 22, 6]]), geoms[3])  # tile 3's image starts at x = 16
    cls, xyxy = augment_boxes([box0, box1, box2, box3], p, s)
    assert cls.tolist() == [1, 2, 3]
    h = s // 2
    np.testing.assert_allclose(xyxy, [[h - 10, h - 10, h - 2, h - 2], [h, h + 50 - 64, h + 10, h + 60 - 64],
                                      [h, h, h + 6, h + 6]])


def _strip(img: np.ndarray, s: int) -> np.ndarray:
    """What dali_loader builds per sample: the resized image in four corner-aligned S x S blocks,
    then its centred letterbox (numpy, to check paste_regions without DALI)."""
    h, w = img.shape[:2]
    blocks = []
    for k in range(4):
        b = np.full((s, s, 3), FILL, np.uint8)
        y0, x0 = (s - h if k < 2 else 0), (s - w if k % 2 == 0 else 0)
        b[y0 : y0 + h, x0 : x0 + w] = img
        blocks.append(b)
    return np.concatenate([*blocks, letterbox(img, s)], axis=1)


@pytest.mark.parametrize("mosaic", [1, 0])
def test_paste_regions_build_the_same_canvas(mosaic):
    """DALI's layout (blocks of five versions pasted by paste_regions, warped by canvas_matrix)
    gives the torch loader's pixels."""
    s = 64
    imgs = [np.full(hw + (3,), v, np.uint8) for hw, v in zip([(32, 64), (64, 40), (64, 64), (50, 64)],
                                                               (10, 20, 30, 40), strict=True)]
    imgs[0][3:9, 5:20] = 200  # something not uniform
    tiles, geoms = _tiles_and_geoms(s, [i.shape[:2] for i in imgs], (0, 0, 0, 0))
    tiles = [letterbox(i, s) for i in imgs]
    cfg = AugmentConfig(**(AugmentConfig.off().to_dict() | {"mosaic": float(mosaic), "scale": 0.4,
                                                            "translate": 0.1, "fliplr": 0.5}))
    for seed in range(6):
        p = sample_params(np.random.default_rng(seed), cfg, s)
        canvas = np.full((2 * s, 2 * s, 3), FILL, np.uint8)
        strips = [_strip(i, s) for i in imgs]
        for k, ((iy, ix), (qh, qw), (oy, ox)) in enumerate(paste_regions(p, s)):
            canvas[oy : oy + qh, ox : ox + qw] = strips[k if mosaic else 0][iy : iy + qh, ix : ix + qw]
        want = augment_image(tiles, p, s, geoms=geoms)
        a = np.vstack([canvas_matrix(p, s), [0, 0, 1]])
        got = warp(canvas, a, s)
        assert np.array_equal(got, want), seed  # the same canvas window, the same resize


def test_sample_params():
    s = 64
    off = AugmentConfig.off()
    np.testing.assert_allclose(sample_params(np.random.default_rng(0), off, s)[P_AFFINE], [1, 0, 0, 0, 1, 0])
    cfg = AugmentConfig(fliplr=1.0, scale=0, translate=0, mosaic=0)
    p = sample_params(np.random.default_rng(0), cfg, s)
    assert p[P_FLIP] == 1 and p[P_MOSAIC] == 0
    np.testing.assert_allclose(p[P_AFFINE], [-1, 0, s, 0, 1, 0], atol=1e-9)
    a = sample_params(np.random.default_rng(5), AugmentConfig(), s)
    b = sample_params(np.random.default_rng(5), AugmentConfig(), s)
    np.testing.assert_array_equal(a, b)
    many = np.stack([sample_params(np.random.default_rng(i), AugmentConfig(), s) for i in range(200)])
    assert many[:, P_MOSAIC].all()
    assert 0.3 < many[:, P_FLIP].mean() < 0.7
    assert (s // 2 <= many[:, 1:3]).all() and (many[:, 1:3] < 3 * s // 2).all()  # on the 2S canvas
    assert many[:, 1:3].min() < 0.6 * s and many[:, 1:3].max() > 1.4 * s
    assert sample_params(np.random.default_rng(0), AugmentConfig(), s, mosaic=False)[P_MOSAIC] == 0


def test_hsv():
    img = np.full((4, 4, 3), (40, 80, 160), np.uint8)
    assert hsv_jitter(img, 0, 1, 1) is img
    darker = hsv_jitter(img, 0, 1, 0.5)
    assert darker.max() <= 82 and darker[0, 0, 2] < 160
    shifted = hsv_jitter(img, 120, 1, 1)
    assert not np.array_equal(shifted, img)


def test_hsv_matches_ultralytics_random_hsv(coco128):
    """Our one-pass HSV jitter against ultralytics' RandomHSV with the same gains, on real photos:
    equal for hue shifts >= 0; within one hue step on a few pixels for shifts < 0; ultralytics'
    LUTs themselves for shifts too large for the one pass."""
    from ultralytics.data.augment import RandomHSV

    files = sorted((coco128 / "train2017").glob("*.jpg"))[:12]
    gains = (0.015, 0.7, 0.4)
    for k, f in enumerate(files):
        bgr = cv2.imread(str(f))
        np.random.seed(k)
        r = np.random.uniform(-1, 1, 3) * gains  # what RandomHSV draws after the same seed
        np.random.seed(k)
        want = RandomHSV(*gains).apply_image({"img": bgr.copy()})["img"].astype(int)
        got = hsv_jitter(np.ascontiguousarray(bgr[..., ::-1]), r[0] * 360, 1 + r[1], 1 + r[2])[..., ::-1].astype(int)
        d = np.abs(got - want).max(-1)
        if r[0] >= 0:
            assert d.max() <= 1, (f.name, r)
        else:
            assert d.mean() < 0.15 and (d > 2).mean() < 0.03, (f.name, r, d.mean(), (d > 2).mean())
    big = hsv_jitter(np.ascontiguousarray(bgr[..., ::-1]), 170.0, 1.2, 0.9)  # 85 hue steps: the LUT path
    x = np.arange(256.0)
    lut = np.stack([(x + 85) % 180, np.clip(x * 1.2, 0, 255), np.clip(x * 0.9, 0, 255)], -1).astype(np.uint8)
    lut[0, 1] = 0
    hsv = cv2.cvtColor(np.ascontiguousarray(bgr[..., ::-1]), cv2.COLOR_RGB2HSV)
    assert np.array_equal(big, cv2.cvtColor(cv2.LUT(hsv, lut.reshape(1, 256, 3)), cv2.COLOR_HSV2RGB))


def test_box_candidates():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 10, 10], [0, 0, 400, 3]], float)
    ref = np.array([100, 15, 2000, 1200])
    assert box_candidates(boxes, ref).tolist() == [True, False, False, False]


def test_config_validation():
    with pytest.raises(AugmentError, match="mosaic"):
        AugmentConfig(mosaic=1.5)
    with pytest.raises(AugmentError, match="scale"):
        AugmentConfig(scale=1.0)
    with pytest.raises(AugmentError, match="degrees"):
        AugmentConfig(degrees=float("nan"))
    assert AugmentConfig.off().is_off and not AugmentConfig().is_off


@pytest.mark.parametrize("mosaic", [0, 1])
def test_crop_resize_equals_warp_affine(mosaic):
    """The snapped axis-aligned affine (crop + resize) matches OpenCV's general warpAffine on the
    S tile and on the 2S mosaic canvas (scales 0.5-1.5, translation, flips)."""
    import cv2

    s = 64
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, ((1 + mosaic) * s, (1 + mosaic) * s, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 2)  # smooth, so interpolation differences stay small
    cfg = AugmentConfig(**(AugmentConfig().to_dict() | {"mosaic": float(mosaic), "flipud": 0.5}))
    for seed in range(12):
        p = sample_params(np.random.default_rng(seed), cfg, s)
        a = p[P_AFFINE].reshape(2, 3)
        assert grid_crop(a, s) is not None, seed  # the snap puts every default sample on the fast path
        fast = warp(img, a, s)
        m = a.copy()
        m[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5
        slow = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))
        diff = np.abs(fast.astype(int) - slow.astype(int)).max(-1)
        # the first row / column may read the window's edge instead of the pixel before it
        inner = np.zeros((s, s), bool)
        inner[1:-1, 1:-1] = True
        assert diff[inner].max() <= 2 and diff.mean() < 0.5, (seed, diff[inner].max(), diff.mean())


def test_crop_resize_flips_like_a_flip_of_the_output():
    s = 64
    img = np.random.default_rng(1).integers(0, 255, (2 * s, 2 * s, 3), dtype=np.uint8)
    for sc, x0, y0 in [(0.6, 5, 9), (1.4, -20, -7), (1.0, 10, 0), (0.5, 50, 70), (1.25, -64, 100)]:
        bx, by = -x0 * sc, -y0 * sc
        plain = warp(img, np.array([[sc, 0, bx], [0, sc, by]]), s)
        for m, code in [([[-sc, 0, s - bx], [0, sc, by]], 1), ([[sc, 0, bx], [0, -sc, s - by]], 0),
                        ([[-sc, 0, s - bx], [0, -sc, s - by]], -1)]:
            assert grid_crop(np.array(m, float), s)[-1] == code
            assert np.array_equal(warp(img, np.array(m, float), s), cv2.flip(plain, code)), (sc, x0, y0, code)


def test_mosaic_window_is_the_part_of_the_canvas():
    s = 64
    tiles, geoms = _tiles_and_geoms(s, [(32, 64), (64, 48), (64, 64), (40, 64)], (10, 20, 30, 40))
    full = mosaic_image(tiles, 50, 80, s, geoms)
    for x0, y0, n in [(0, 0, 2 * s), (10, 20, 70), (-15, -4, 90), (100, 90, 60), (-200, 0, 50)]:
        win = mosaic_image(tiles, 50, 80, s, geoms, (x0, y0, n))
        want = np.full((n, n, 3), FILL, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + n, 2 * s), min(y0 + n, 2 * s)
        if xa < xb and ya < yb:
            want[ya - y0 : yb - y0, xa - x0 : xb - x0] = full[ya:yb, xa:xb]
        assert np.array_equal(win, want), (x0, y0, n)


def test_hsv_into_a_slot_equals_returned_image():
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for args in [(5.0, 1.3, 0.8), (0.0, 1.0, 1.0)]:
        out = np.zeros_like(img)
        assert hsv_jitter(img, *args, out=out) is out and np.array_equal(out, hsv_jitter(img, *args))
