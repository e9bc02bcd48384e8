"""Rotation / shear / perspective / flipud / mixup: pixels and boxes agree, and box survival
matches ultralytics' own Mosaic + RandomPerspective."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.pixels import augment_image, warp
from trainer.data.transforms import (
    P_AFFINE,
    P_FLIPUD,
    P_MIX,
    P_PROJ,
    AugmentConfig,
    AugmentError,
    affine_boxes,
    augment_boxes,
    letterbox_geometry,
    norm_to_tile,
    partner_ids,
    sample_params,
    warp_matrix,
)


def _pixel_box(img: np.ndarray) -> np.ndarray:
    """xyxy (pixel edges) of the bright pixels (the warped rectangle) of an image."""
    ys, xs = np.nonzero(img[..., 0] > 180)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


GEOM = {
    "scale_translate": AugmentConfig.off().to_dict() | {"scale": 0.5, "translate": 0.1, "fliplr": 0.5, "flipud": 0.5},
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
    """shear/perspective/flipud/mixup at 0 leave the random stream (and the fast crop + resize warp) as before."""
    p = sample_params(np.random.default_rng(3), AugmentConfig(mosaic=0), 64)
    assert p[P_MIX] == 1 and p[P_FLIPUD] == 0 and tuple(p[P_PROJ]) == (0, 0, 1)
    assert p[P_AFFINE][1] == p[P_AFFINE][3] == 0  # axis-aligned: the snapped fast path
    with pytest.raises(AugmentError, match="shear"):
        AugmentConfig(shear=90)
    with pytest.raises(AugmentError, match="mixup"):
        AugmentConfig(mixup=1.5)
    with pytest.raises(AugmentError, match="perspective"):
        AugmentConfig(perspective=0.5)


def test_objects_per_image_match_ultralytics_mosaic():
    """Box survival of our mosaic + warp vs ultralytics' own Mosaic + RandomPerspective on the same
    labels (fixed seeds, 400 samples): objects per output image within 10 %."""
    ul_aug = pytest.importorskip("ultralytics.data.augment")
    from ultralytics.utils.instance import Instances

    s, n = 64, 16
    rng = np.random.default_rng(0)
    shapes = [[(48, 64), (64, 64), (64, 40), (32, 64)][i % 4] for i in range(n)]
    labs = []
    for _ in range(n):
        wh = rng.uniform(0.05, 0.3, (int(rng.integers(1, 6)), 2))
        labs.append(np.hstack([rng.uniform(wh / 2, 1 - wh / 2), wh]))

    class Data:  # the part of an ultralytics dataset that Mosaic reads
        cache, buffer = None, list(range(n))

        def __len__(self) -> int:
            return n

        def get_image_and_label(self, i: int) -> dict:
            h, w = shapes[i]
            return {"im_file": str(i), "img": np.zeros((h, w, 3), np.uint8), "resized_shape": (h, w),
                    "ori_shape": (h, w), "cls": np.zeros((len(labs[i]), 1), np.float32),
                    "instances": Instances(labs[i].astype(np.float32), np.zeros((0, 1000, 2), np.float32), None,
                                           bbox_format="xywh", normalized=True)}

    data = Data()
    mosaic = ul_aug.Mosaic(data, imgsz=s, p=1.0)
    persp = ul_aug.RandomPerspective(degrees=0, translate=0.1, scale=0.5, shear=0, size=(s, s))
    import random

    random.seed(0)
    np.random.seed(0)
    theirs = np.mean([len(persp(mosaic(data.get_image_and_label(k % n)))["cls"]) for k in range(400)])
    cfg, rng = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0), np.random.default_rng(0)
    ours = []
    for k in range(400):
        p = sample_params(rng, cfg, s)
        tiles = [(np.zeros(len(labs[i]), int), norm_to_tile(labs[i], *shapes[i], s),
                  letterbox_geometry(*shapes[i], s)[2:]) for i in partner_ids(p, k % n, n)]
        ours.append(len(augment_boxes(tiles, p, s)[0]))
    assert abs(np.mean(ours) / theirs - 1) < 0.1, (np.mean(ours), theirs)
