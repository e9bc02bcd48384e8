"""Letterbox / flip / affine / mosaic / HSV arithmetic on small exact cases."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.pixels import augment_image, hsv_jitter, letterbox, mosaic_image, warp
from trainer.data.transforms import (
    FILL,
    P_AFFINE,
    P_FLIP,
    P_FLIPUD,
    P_MIX,
    P_MOSAIC,
    P_PROJ,
    AugmentConfig,
    AugmentError,
    affine_boxes,
    augment_boxes,
    box_candidates,
    identity_params,
    letterbox_geometry,
    mosaic_quadrants,
    norm_to_tile,
    paste_regions,
    sample_params,
    warp_matrix,
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


def test_mosaic_quadrants_tile_the_canvas():
    s = 64
    for cx, cy in [(16, 16), (32, 40), (48, 17)]:
        cover = np.zeros((s, s), int)
        for (iy, ix), (qh, qw), (oy, ox) in mosaic_quadrants(cx, cy, s):
            assert iy >= 0 and iy + qh <= s and ix >= 0 and ix + qw <= s
            cover[oy : oy + qh, ox : ox + qw] += 1
        assert (cover == 1).all()


def test_mosaic_pixels_and_boxes():
    s, cx, cy = 64, 20, 40
    tiles = [np.full((s, s, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    out = mosaic_image(tiles, cx, cy, s)
    assert out[0, 0, 0] == 10 and out[0, s - 1, 0] == 20 and out[s - 1, 0, 0] == 30 and out[s - 1, s - 1, 0] == 40
    assert out[cy - 1, cx - 1, 0] == 10 and out[cy, cx, 0] == 40
    p = identity_params(s)
    p[P_MOSAIC], p[1], p[2] = 1, cx, cy
    # a box at the bottom-right corner of tile 0 shows at the top-left quadrant's inner corner
    box0 = (np.array([1]), np.array([[s - 10.0, s - 10, s - 2, s - 2]]))
    # a box in tile 3's top-left corner (the part that is pasted at the centre)
    box3 = (np.array([3]), np.array([[0.0, 0, 6, 6]]))
    # tile 1's box lies where tile 1 is not shown: dropped
    box1 = (np.array([2]), np.array([[0.0, 5, 10, 15]]))
    cls, xyxy = augment_boxes([box0, box1, (np.zeros(0, int), np.zeros((0, 4))), box3], p, s)
    assert cls.tolist() == [1, 3]
    np.testing.assert_allclose(xyxy, [[cx - 10, cy - 10, cx - 2, cy - 2], [cx, cy, cx + 6, cy + 6]])


def test_paste_regions_without_mosaic_rebuild_tile():
    p = identity_params(64)
    q = paste_regions(p, 64)
    assert (q[:, 0] == q[:, 2]).all()


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
    assert (s // 4 <= many[:, 1]).all() and (many[:, 1] <= 3 * s // 4).all()
    assert sample_params(np.random.default_rng(0), AugmentConfig(), s, mosaic=False)[P_MOSAIC] == 0


def test_hsv():
    img = np.full((4, 4, 3), (40, 80, 160), np.uint8)
    assert hsv_jitter(img, 0, 1, 1) is img
    darker = hsv_jitter(img, 0, 1, 0.5)
    assert darker.max() <= 82 and darker[0, 0, 2] < 160
    shifted = hsv_jitter(img, 120, 1, 1)
    assert not np.array_equal(shifted, img)


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


def test_resize_paste_equals_warp_affine():
    """The snapped axis-aligned affine (resize + paste) matches OpenCV's general warpAffine."""
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 2)  # smooth, so interpolation differences stay small
    for seed in range(6):
        p = sample_params(np.random.default_rng(seed), AugmentConfig(mosaic=0), 64)
        a = p[P_AFFINE].reshape(2, 3)
        fast = warp(img, a, 64)
        m = a.copy()
        m[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5
        slow = cv2.warpAffine(img, m, (64, 64), flags=cv2.INTER_LINEAR, borderValue=(FILL, FILL, FILL))
        inner = (slow != FILL).all(-1) & (fast != FILL).all(-1)
        assert np.abs(fast.astype(int) - slow.astype(int))[inner].mean() < 2.0
        assert ((slow == FILL).all(-1) != (fast == FILL).all(-1)).mean() < 0.05  # same pasted area


def test_resize_paste_flips_like_a_whole_canvas_flip():
    """Flipping only the visible part, pasted at the mirrored place, is the flip of the pasted canvas."""
    import cv2

    from trainer.data.pixels import _resize_paste

    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for d, bx, by in [(40, 5, 9), (90, -20, -7), (64, 10, 0), (30, 50, 50), (64, -64, 0)]:
        want = cv2.flip(_resize_paste(img, d, bx, by, False, 64), 1)
        assert np.array_equal(_resize_paste(img, d, bx, by, True, 64), want), (d, bx, by)


def test_hsv_into_a_slot_equals_returned_image():
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for args in [(5.0, 1.3, 0.8), (0.0, 1.0, 1.0)]:
        out = np.zeros_like(img)
        assert hsv_jitter(img, *args, out=out) is out and np.array_equal(out, hsv_jitter(img, *args))


def _pixel_box(img: np.ndarray) -> np.ndarray:
    """xyxy (pixel edges) of the bright pixels (the warped rectangle) of an image."""
    ys, xs = np.nonzero(img[..., 0] > 180)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


GEOM = {
    "degrees": AugmentConfig.off().to_dict() | {"degrees": 30.0, "scale": 0.2},
    "shear": AugmentConfig.off().to_dict() | {"shear": 20.0, "translate": 0.1},
    "perspective": AugmentConfig.off().to_dict() | {"perspective": 0.002, "scale": 0.2},
    "all": AugmentConfig.off().to_dict() | {"degrees": 15.0, "shear": 10.0, "perspective": 0.001, "scale": 0.3,
                                             "translate": 0.1, "flipud": 0.5, "fliplr": 0.5},
}


@pytest.mark.parametrize("name", list(GEOM))
def test_warp_pixels_and_boxes_agree(name):
    """A solid rectangle warped by rotation / shear / perspective: the box of its four warped
    corners (ultralytics' apply_bboxes) is the box of the warped pixels, to a pixel."""
    s = 96
    img = np.zeros((s, s, 3), np.uint8)
    rect = np.array([[30.0, 36, 66, 60]])
    img[36:60, 30:66] = 255
    cfg = AugmentConfig(**GEOM[name])
    for seed in range(8):
        p = sample_params(np.random.default_rng(seed), cfg, s)
        if name == "perspective":
            assert p[P_PROJ][:2].any()
        out = warp(img, warp_matrix(p), s)
        want = affine_boxes(rect, warp_matrix(p))[0]
        np.testing.assert_allclose(_pixel_box(out), want, atol=1.5, err_msg=f"seed {seed}")
        cls, boxes = augment_boxes([(np.array([0]), rect)] * 4, p, s)
        np.testing.assert_allclose(boxes[0], want.clip(0, s), atol=1e-9)


def test_perspective_boxes_divide_by_w():
    m = np.array([[1, 0, 0], [0, 1, 0], [0.01, 0, 1]], float)  # x' = x / (1 + 0.01 x)
    np.testing.assert_allclose(affine_boxes(np.array([[0.0, 0, 100, 10]]), m), [[0, 0, 50, 10]])


def test_flipud_pixels_and_boxes():
    s = 64
    cfg = AugmentConfig(**(AugmentConfig.off().to_dict() | {"flipud": 1.0}))
    p = sample_params(np.random.default_rng(0), cfg, s)
    assert p[P_FLIPUD] == 1
    np.testing.assert_allclose(p[P_AFFINE], [1, 0, 0, 0, -1, s])
    img = np.zeros((s, s, 3), np.uint8)
    img[2:10, 5:20] = 255
    out = augment_image([img] * 4, p, s)
    assert np.array_equal(out, img[::-1])
    _, boxes = augment_boxes([(np.array([1]), np.array([[5.0, 2, 20, 10]]))] * 4, p, s)
    np.testing.assert_allclose(boxes, [[5, s - 10, 20, s - 2]])


def test_mixup_blends_and_keeps_both_labels():
    s = 64
    cfg = AugmentConfig(**(AugmentConfig.off().to_dict() | {"mixup": 1.0}))
    rng = np.random.default_rng(0)
    many = np.stack([sample_params(rng, cfg, s) for _ in range(300)])
    assert (many[:, P_MIX] < 1).all() and abs(many[:, P_MIX].mean() - 0.5) < 0.02  # Beta(32, 32)
    p, p2 = many[0], sample_params(rng, cfg, s, mix=False)
    assert p2[P_MIX] == 1 and sample_params(rng, cfg, s, mosaic=False)[P_MIX] == 1  # off with close_mosaic
    a, b = np.zeros((s, s, 3), np.uint8), np.zeros((s, s, 3), np.uint8)
    a[0:20, 0:20], b[30:60, 30:60] = 200, 100
    out = augment_image([a] * 4, p, s, mix=([b] * 4, p2))
    r = p[P_MIX]
    assert abs(int(out[5, 5, 0]) - 200 * r) <= 1 and abs(int(out[40, 40, 0]) - 100 * (1 - r)) <= 1
    cls, boxes = augment_boxes([(np.array([1]), np.array([[0.0, 0, 20, 20]]))] * 4, p, s,
                               mix=([(np.array([2]), np.array([[30.0, 30, 60, 60]]))] * 4, p2))
    assert cls.tolist() == [1, 2]
    np.testing.assert_allclose(boxes, [[0, 0, 20, 20], [30, 30, 60, 60]])


def test_new_options_off_draw_nothing():
    """shear/perspective/flipud/mixup at 0 leave the random stream (and the fast resize+paste warp) as before."""
    p = sample_params(np.random.default_rng(3), AugmentConfig(mosaic=0), 64)
    assert p[P_MIX] == 1 and p[P_FLIPUD] == 0 and tuple(p[P_PROJ]) == (0, 0, 1)
    assert p[P_AFFINE][1] == p[P_AFFINE][3] == 0  # axis-aligned: the snapped fast path
    with pytest.raises(AugmentError, match="shear"):
        AugmentConfig(shear=90)
    with pytest.raises(AugmentError, match="mixup"):
        AugmentConfig(mixup=1.5)
    with pytest.raises(AugmentError, match="perspective"):
        AugmentConfig(perspective=0.5)
