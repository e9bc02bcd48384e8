"""Loaders on real packed shards: geometry, exact validation mapping, formats agree,
corrupt samples and shards, start-up errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_util import make_records, pack, rect_match

from packer.writers import open_reader
from trainer.data import AugmentConfig, DataError, LoaderError, SplitError, make_loader

IMGSZ = 160
N_TRAIN, N_VAL = 24, 10


@pytest.fixture(scope="module")
def records():
    return {"train": make_records(N_TRAIN, "train", seed=1), "val": make_records(N_VAL, "val", seed=2)}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, records) -> dict[str, Path]:
    """The same samples in the three formats; uneven shards for tfrecord/wds."""
    base = tmp_path_factory.mktemp("packed")
    sizes = {"train": [7, 3, 9, 5], "val": [6, 4]}
    return {fmt: pack(base / fmt, fmt, records, sizes) for fmt in ("tfrecord", "wds", "lmdb")}


def _epoch(loader) -> list[dict]:
    return [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


def _check_batch_form(b: dict, batch: int) -> None:
    assert b["img"].dtype == torch.uint8 and b["img"].shape == (batch, 3, IMGSZ, IMGSZ)
    n = len(b["batch_idx"])
    assert b["cls"].shape == (n, 1) and b["bboxes"].shape == (n, 4)
    assert b["batch_idx"].dtype == b["cls"].dtype == b["bboxes"].dtype == torch.float32
    assert torch.all(b["batch_idx"][1:] >= b["batch_idx"][:-1])
    assert len(b["keys"]) == len(b["im_file"]) == len(b["ori_shape"]) == batch
    assert b["ratio_pad"].shape == (batch, 4) and b["valid"].shape == (batch,)
    if n:
        assert float(b["bboxes"].min()) >= 0 and float(b["bboxes"].max()) <= 1


GEOMETRY = {
    "flip-off": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0, fliplr=0.0, scale=0.3, translate=0.1),
    "flip-on": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0, fliplr=1.0, scale=0.3, translate=0.1),
    "mosaic": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, fliplr=0.5, scale=0.3, translate=0.1),
    "rotate-shear-flipud": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0, degrees=20, shear=10, flipud=0.5,
                                         fliplr=0.5, scale=0.3, translate=0.1),
    "mosaic-rotate-shear": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, degrees=10, shear=5, flipud=0.5,
                                         scale=0.3, translate=0.1),
    "perspective": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0.5, degrees=10, perspective=0.001, scale=0.3,
                                 translate=0.1),
}


@pytest.mark.parametrize("aug", list(GEOMETRY))
@pytest.mark.parametrize(("loader", "fmt"), [("dali", "tfrecord"), ("torch", "wds"), ("torch", "lmdb"),
                                             ("torch+cache", "wds")])
def test_boxes_sit_on_their_rectangles(packed, loader, fmt, aug, tmp_path):
    """Every returned box lies on its rectangle's pixels in the returned image: IoU >= 0.9 with the
    colour patch, or -- for slivers a mosaic cut left a few px wide, where one px of JPEG/resampling
    blur (or blending with the border fill at the canvas edge) costs more than 10 % IoU --
    every edge within 2 px of the patch's edge. With rotation / shear / perspective a box that
    reaches the canvas edge is the clipped box of the whole warped rectangle (as ultralytics'), which
    may be larger than the visible patch: those are not checked. Nor, up to 3 % of the boxes, are
    thin boxes (aspect >= 3) after mosaic + rotation: a sliver the mosaic cut left < 1 px wide is
    kept as ultralytics keeps it, but its rotated box covers pixels the interpolation blurred away."""
    cfg = GEOMETRY[aug]
    rotates = cfg.degrees > 0 or cfg.shear > 0 or cfg.perspective > 0
    if aug == "perspective" and loader == "dali":
        with pytest.raises(LoaderError, match="perspective"):
            make_loader(packed[fmt], "train", loader="dali", imgsz=IMGSZ, batch=4, augment=GEOMETRY[aug], device="cpu")
        return
    cache = {"cache": "disk", "cache_dir": tmp_path} if loader.endswith("+cache") else {}
    ld = make_loader(packed[fmt], "train", loader=loader.removesuffix("+cache"), imgsz=IMGSZ, batch=4, train=True,
                     workers=1, device="cpu", augment=GEOMETRY[aug], seed=3, **cache)
    checked, bad, slivers = 0, [], 0
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        for b in _epoch(ld):
            _check_batch_form(b, 4)
            img = b["img"].permute(0, 2, 3, 1).numpy()
            for (i, c), box in zip(torch.cat([b["batch_idx"][:, None], b["cls"]], 1).long().tolist(),
                                   (b["bboxes"] * IMGSZ).numpy(), strict=True):
                xyxy = np.array([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2])
                if rotates and (xyxy.min() < 1 or xyxy.max() > IMGSZ - 1):
                    continue
                iou, edge = rect_match(img[i], xyxy, c)
                checked += 1
                w, h = xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]
                if iou < 0.9 and edge > 2.0 and rotates and cfg.mosaic > 0 and max(w / h, h / w) >= 3:
                    slivers += 1
                elif iou < 0.9 and edge > 2.0:
                    bad.append((round(iou, 3), round(edge, 2), xyxy.round(1).tolist()))
    ld.close()
    assert checked >= (50 if rotates else 80) and slivers <= 0.03 * checked
    assert not bad, f"{len(bad)} of {checked} boxes off their rectangles: {bad[:5]}"


def test_flip_really_flips(packed):
    """Same sample with flip forced off and on: pixels are mirror images, boxes mirrored."""
    off = AugmentConfig.off()
    on = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0, fliplr=1.0, scale=0, translate=0)
    for loader in ("dali", "torch"):
        a = _epoch(make_loader(packed["tfrecord"], "train", loader=loader, imgsz=IMGSZ, batch=4, augment=off,
                               workers=1, device="cpu"))
        b = _epoch(make_loader(packed["tfrecord"], "train", loader=loader, imgsz=IMGSZ, batch=4, augment=on,
                               workers=1, device="cpu"))
        ia = {k: (x["img"][i], x["bboxes"][x["batch_idx"] == i]) for x in a for i, k in enumerate(x["keys"])}
        ib = {k: (x["img"][i], x["bboxes"][x["batch_idx"] == i]) for x in b for i, k in enumerate(x["keys"])}
        for k in set(ia) & set(ib):
            assert torch.equal(ia[k][0].flip(-1), ib[k][0]) or (ia[k][0].flip(-1).float() - ib[k][0].float()).abs().mean() < 2
            mirrored = ia[k][1].clone()
            mirrored[:, 0] = 1 - mirrored[:, 0]
            assert torch.allclose(mirrored, ib[k][1], atol=1e-5)


@pytest.mark.parametrize(("loader", "fmt"), [("dali", "tfrecord"), ("dali", "wds"), ("torch", "wds"),
                                             ("torch", "lmdb")])
def test_fraction_reads_the_leading_samples_with_equal_steps(packed, records, loader, fmt):
    """fraction=0.5 of 24 samples in shards [7, 3, 9, 5]: the first 12 (a cut inside the third
    shard), split over 2 ranks with equal batch counts, each sample once."""
    first = sorted(r.key for r in records["train"][:12])
    keys, lens = [], []
    for rank in (0, 1):
        ld = make_loader(packed[fmt], "train", loader=loader, imgsz=IMGSZ, batch=2, rank=rank, world_size=2,
                         device="cpu", workers=1, augment=AugmentConfig.off(), fraction=0.5)
        assert ld.num_samples == 12
        batches = _epoch(ld)
        lens.append((len(ld), len(batches)))
        keys += [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
        ld.close()
    assert lens == [(3, 3), (3, 3)]
    assert sorted(keys) == first
    with pytest.raises(LoaderError, match="fraction"):
        make_loader(packed[fmt], "train", loader=loader, imgsz=IMGSZ, batch=2, device="cpu", fraction=0.0)


@pytest.mark.parametrize(("loader", "fmt"), [("dali", "wds"), ("torch", "tfrecord")])
def test_mixup_blends_two_samples_and_keeps_both_labels(packed, loader, fmt):
    """mixup alone: each image is r * its own letterboxed sample + (1 - r) * another's, with
    r ~ Beta(32, 32), and its labels are both samples' labels (own first)."""
    ref = {}
    for b in _epoch(make_loader(packed[fmt], "train", loader=loader, imgsz=IMGSZ, batch=4, device="cpu",
                                augment=AugmentConfig.off(), workers=1)):
        for i, k in enumerate(b["keys"]):
            m = b["batch_idx"] == i
            ref[k] = (b["img"][i].double(), torch.cat([b["cls"][m], b["bboxes"][m]], 1))
    mix = AugmentConfig(**(AugmentConfig.off().to_dict() | {"mixup": 1.0}))
    ratios = []
    for b in _epoch(make_loader(packed[fmt], "train", loader=loader, imgsz=IMGSZ, batch=4, device="cpu",
                                augment=mix, workers=1, seed=1)):
        for i, k in enumerate(b["keys"]):
            m = b["batch_idx"] == i
            lab = torch.cat([b["cls"][m], b["bboxes"][m]], 1)
            own = ref[k][1]
            assert torch.allclose(lab[: len(own)], own, atol=1e-5)
            rest = lab[len(own) :]
            img = b["img"][i].double()
            partners = [k2 for k2, (_, l2) in ref.items() if l2.shape == rest.shape and torch.allclose(l2, rest, atol=1e-5)]
            assert partners, f"{k}: extra labels match no other sample"
            if partners == [k]:  # mixed with itself (the partner is drawn at random, as ultralytics)
                assert (img - ref[k][0]).abs().max() <= 1
                continue
            fits = []
            for k2 in set(partners) - {k}:  # least-squares r of img = r * own + (1 - r) * partner
                a, p2 = ref[k][0], ref[k2][0]
                d = (a - p2).flatten()
                r = float((img - p2).flatten() @ d / float(d @ d))
                fits.append(((img - (r * a + (1 - r) * p2)).abs().max().item(), r))
            err, r = min(fits)
            assert err <= 1.01, f"{k}: not a blend of two samples (max error {err})"
            ratios.append(r)
    assert all(0.25 < r < 0.75 for r in ratios) and len(ratios) >= N_TRAIN // 2, ratios


@pytest.mark.parametrize(("loader", "fmt"), [("dali", "tfrecord"), ("dali", "wds"), ("torch", "lmdb")])
def test_val_maps_back_to_original_exactly(packed, records, loader, fmt):
    truth = {r.key: r for r in records["val"]}
    ld = make_loader(packed[fmt], "val", loader=loader, imgsz=IMGSZ, batch=4, train=False, workers=2, device="cpu")
    assert len(ld) == 3  # ceil(10 / 4), padding flagged invalid
    seen = []
    for b in _epoch(ld):
        _check_batch_form(b, 4)
        for i, k in enumerate(b["keys"]):
            if not b["valid"][i]:
                continue
            seen.append(k)
            r = truth[k]
            gx, gy, px, py = b["ratio_pad"][i].double().tolist()
            oh, ow = b["ori_shape"][i]
            assert (oh, ow) == (r.orig_height, r.orig_width)
            bx = b["bboxes"][b["batch_idx"] == i].double() * IMGSZ
            x1 = ((bx[:, 0] - bx[:, 2] / 2) - px) / gx
            y1 = ((bx[:, 1] - bx[:, 3] / 2) - py) / gy
            x2 = ((bx[:, 0] + bx[:, 2] / 2) - px) / gx
            y2 = ((bx[:, 1] + bx[:, 3] / 2) - py) / gy
            rb = r.boxes.astype(np.float64)
            want = np.stack([(rb[:, 0] - rb[:, 2] / 2) * ow, (rb[:, 1] - rb[:, 3] / 2) * oh,
                             (rb[:, 0] + rb[:, 2] / 2) * ow, (rb[:, 1] + rb[:, 3] / 2) * oh], 1)
            got = torch.stack([x1, y1, x2, y2], 1).numpy()
            np.testing.assert_allclose(got, want, atol=0.02)  # float32 of the batch; pixels of the original
            assert b["cls"][b["batch_idx"] == i].view(-1).long().tolist() == r.cls.tolist()
    assert sorted(seen) == sorted(truth)  # every sample exactly once


def test_formats_and_loaders_agree(packed, records):
    """tfrecord / wds / lmdb through the torch loader, and tfrecord / wds through DALI: same samples and labels."""
    results = {}
    for loader, fmt in [("torch", "tfrecord"), ("torch", "wds"), ("torch", "lmdb"), ("dali", "tfrecord"),
                        ("dali", "wds")]:
        ld = make_loader(packed[fmt], "train", loader=loader, imgsz=IMGSZ, batch=4, train=True,
                         augment=AugmentConfig.off(), workers=2, device="cpu")
        assert len(ld) == N_TRAIN // 4
        got = {}
        for b in _epoch(ld):
            for i, k in enumerate(b["keys"]):
                m = b["batch_idx"] == i
                got[k] = (b["cls"][m].view(-1).tolist(), b["bboxes"][m].numpy(), b["img"][i].float().mean().item())
        ld.close()
        results[(loader, fmt)] = got
    ref = results[("torch", "lmdb")]
    assert sorted(ref) == sorted(r.key for r in records["train"])
    for name, got in results.items():
        assert sorted(got) == sorted(ref), name
        for k, (c, bx, mean) in got.items():
            assert c == ref[k][0], name
            np.testing.assert_allclose(bx, ref[k][1], atol=1e-5, err_msg=str(name))
            assert abs(mean - ref[k][2]) < 1.5, name  # OpenCV and DALI decode/resample alike


def test_epochs_reshuffle_and_mosaic_switch(packed):
    ld = make_loader(packed["wds"], "train", loader="torch", imgsz=IMGSZ, batch=4, workers=2, device="cpu", seed=5)
    ld.set_epoch(0)
    e0 = [k for b in ld for k in b["keys"]]
    ld.set_epoch(1)
    e1 = [k for b in ld for k in b["keys"]]
    ld.set_epoch(0)
    again = [k for b in ld for k in b["keys"]]
    assert len(e0) == len(e1) == N_TRAIN and e0 != e1 and e0 == again
    ld.set_mosaic(False)
    assert len(list(ld)) == len(ld)
    ld.close()


def test_mosaic_partners_outlive_the_epoch(packed):
    """The torch worker's pool of mosaic partners (tiles with their letterbox geometry) is the
    worker's own and carries over to the next epoch, like ultralytics' buffer."""
    ld = make_loader(packed["wds"], "train", loader="torch", imgsz=IMGSZ, batch=4, workers=0, device="cpu", seed=1)
    ld.set_epoch(0)
    _epoch(ld)
    pool = ld.dataset.pool
    first = pool[0]
    assert len(pool) == N_TRAIN < pool.maxlen - 4
    tile, cls, xyxy, (px, py, nw, nh) = pool[-1]
    assert tile.shape == (IMGSZ, IMGSZ, 3) and len(cls) == len(xyxy) and 0 < nw <= IMGSZ and 0 < nh <= IMGSZ
    assert (px, py) == ((IMGSZ - nw) // 2, (IMGSZ - nh) // 2)
    ld.set_epoch(1)
    b = next(iter(ld))
    # the new epoch's first tiles join last epoch's (N_TRAIN < the pool's 64: nothing evicted yet)
    assert ld.dataset.pool is pool and pool[0] is first and len(pool) == N_TRAIN + 4
    assert b["img"].shape[0] == 4
    ld.close()


def _corrupt_one_jpeg(shard: Path, fmt: str, pos: int) -> str:
    """Overwrite the start of record `pos`'s JPEG inside the shard file (framing left intact)."""
    with open_reader(fmt, shard) as r:
        rec = r.read(pos)
    data = bytearray(shard.read_bytes())
    at = data.find(rec.jpeg)
    assert at > 0
    data[at : at + 200] = b"\x00garbage" * 25
    shard.write_bytes(bytes(data))
    return rec.key


@pytest.mark.parametrize(("loader", "fmt"), [("torch", "tfrecord"), ("torch", "wds"), ("dali", "tfrecord")])
def test_corrupt_sample_is_skipped_and_counted(tmp_path, records, loader, fmt, caplog):
    root = pack(tmp_path / fmt, fmt, {"train": records["train"]}, {"train": [12, 12]})
    bad = _corrupt_one_jpeg(root / "train" / f"train-00001{'.tfrecord' if fmt == 'tfrecord' else '.tar'}", fmt, 4)
    ld = make_loader(root, "train", loader=loader, imgsz=IMGSZ, batch=4, workers=0 if loader == "torch" else 1,
                     device="cpu", augment=AugmentConfig.off())
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batches = _epoch(ld)
    assert len(batches) == len(ld) == N_TRAIN // 4  # batch count unchanged
    assert all(b["img"].shape[0] == 4 for b in batches)
    assert ld.stats["corrupt_skipped"] >= 1
    assert "corrupt" in caplog.text or "could not read" in caplog.text
    valid_keys = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
    assert bad not in valid_keys


def test_corrupt_shard_refused_with_verify(tmp_path, records):
    root = pack(tmp_path / "t", "wds", {"train": records["train"]}, {"train": [12, 12]})
    shard = root / "train" / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    make_loader(root, "train", loader="torch", imgsz=IMGSZ, batch=4, device="cpu")  # no verify: opens
    with pytest.raises(DataError, match="checksum mismatch"):
        make_loader(root, "train", loader="torch", imgsz=IMGSZ, batch=4, device="cpu", verify=True)


def test_startup_errors(packed):
    with pytest.raises(LoaderError, match="LMDB"):
        make_loader(packed["lmdb"], "train", loader="dali", imgsz=IMGSZ, batch=4, device="cpu")
    with pytest.raises(SplitError, match="too few"):
        make_loader(packed["wds"], "train", loader="torch", imgsz=IMGSZ, batch=16, world_size=2, device="cpu")
    with pytest.raises(DataError, match="no split"):
        make_loader(packed["wds"], "test", imgsz=IMGSZ, device="cpu")
    with pytest.raises(LoaderError, match="multiple of 32"):
        make_loader(packed["wds"], "train", imgsz=100, device="cpu")
    with pytest.raises(ValueError, match="fliplr"):
        AugmentConfig(fliplr=2)


def test_auto_choice_without_cuda(packed):
    if torch.cuda.is_available():
        pytest.skip("CPU-only choice")
    kinds = {fmt: make_loader(packed[fmt], "val", train=False, imgsz=IMGSZ, batch=4).kind for fmt in packed}
    assert kinds == {"tfrecord": "torch", "wds": "torch", "lmdb": "torch"}  # DALI CPU measured 0.26x with aug


def test_dali_pipeline_is_built_once_per_run(packed):
    ld = make_loader(packed["wds"], "train", loader="dali", imgsz=IMGSZ, batch=4, workers=1, device="cpu", seed=2)
    epochs, pipes = [], []
    for epoch in range(3):
        ld.set_epoch(epoch)
        it = iter(ld)  # as the trainer does: exactly len() batches, then the iterator is dropped
        batches = [next(it) for _ in range(len(ld))]
        del it
        epochs.append([k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v])
        pipes.append(id(ld._pipe))
    assert len(set(pipes)) == 1  # no rebuild (teardown, shuffle-buffer refill) between epochs
    for keys in epochs:
        assert len(keys) == len(set(keys)) == N_TRAIN  # each epoch still one whole reader epoch
    assert epochs[0] != epochs[1]  # and reshuffled
    ld.close()


def _valid_keys(ld) -> list[str]:
    return [k for b in _epoch(ld) for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]


def test_dali_set_epoch_on_a_fresh_loader_never_replays_epoch_0(packed):
    """A resumed run calls set_epoch(k) on a fresh loader: DALI then draws an order seeded from (seed, rank, k),
    the same every time, and not epoch 0's; a replayed or half-read epoch rebuilds instead of drifting."""
    def fresh(epoch: int) -> list[str]:
        ld = make_loader(packed["wds"], "train", loader="dali", imgsz=IMGSZ, batch=4, workers=1, device="cpu", seed=2)
        ld.set_epoch(epoch)
        keys = _valid_keys(ld)
        ld.close()
        return keys

    e0, e3 = fresh(0), fresh(3)
    assert e3 != e0 and e3 == fresh(3) and sorted(e3) == sorted(e0)
    ld = make_loader(packed["wds"], "train", loader="dali", imgsz=IMGSZ, batch=4, workers=1, device="cpu", seed=2)
    assert _valid_keys(ld) == e0
    next(iter(ld))  # an epoch abandoned after one batch
    ld.set_epoch(0)
    assert _valid_keys(ld) == e0  # rebuilt: the replay starts at the epoch's first batch
    ld.close()


def test_batch_buffers_are_reused_not_leaked(packed):
    """Pooled shared buffers come back once batches are dropped: after several epochs no worker
    holds more busy buffers than batches in flight (none at all once every batch is gone)."""
    ld = make_loader(packed["wds"], "train", loader="torch", imgsz=IMGSZ, batch=4, workers=2, device="cpu",
                     augment=AugmentConfig.off())
    for epoch in range(6):
        ld.set_epoch(epoch)
        assert len(list(ld)) == len(ld)
    ld.dataset.slots.poll()
    assert sum(ld.dataset.slots.flags) == 0  # nothing left taken
    for _ in range(4):  # epochs abandoned after one batch: the batches the DataLoader discards never arrive
        it = iter(ld)
        next(it)
        del it
        assert len(list(ld)) == len(ld)
    ld.dataset.slots.poll()
    assert sum(ld.dataset.slots.flags) == 0  # a worker frees them at its next epoch (all 5 stayed taken before)
    ld.close()


def test_held_batches_keep_their_pixels(packed):
    """Batches cross from the workers as slot numbers of buffers mapped before the fork; a slot is
    written again only once every tensor on it is gone, so batches the consumer still holds (here
    views of a whole epoch, across two more reshuffled epochs) never change under it."""
    ld = make_loader(packed["wds"], "train", loader="torch", imgsz=IMGSZ, batch=4, workers=2, device="cpu",
                     augment=AugmentConfig.off(), seed=3)
    assert ld.dataset.slots.mapped
    held, copies = [], []
    for epoch in range(3):
        ld.set_epoch(epoch)
        for b in ld:
            _check_batch_form(b, 4)
            if epoch == 0:
                held.append(b["img"][1:])  # a view keeps the slot
                copies.append(b["img"][1:].clone())
    assert all(torch.equal(h, c) for h, c in zip(held, copies, strict=True))
    assert sum(ld.dataset.slots.flags) > 0
    del held, b
    assert sum(ld.dataset.slots.flags) == 0  # every slot free once the last view is dropped
    ld.close()


def test_bad_arguments_are_one_line_errors_before_any_work(packed, tmp_path):
    """A misspelled torch option used to build the whole decoded cache first; a negative seed failed in a worker
    with a 25-line traceback; a float batch only at len()."""
    kw = dict(imgsz=IMGSZ, batch=4, device="cpu")
    with pytest.raises(LoaderError, match="unknown option.*pin_memmory"):
        make_loader(packed["wds"], "train", cache="disk", cache_dir=tmp_path, pin_memmory=True, **kw)
    assert not (tmp_path / "decoded").exists()
    for bad, words in (({"seed": -1}, "seed must be an integer >= 0"), ({"batch": 2.5}, "batch must be an integer"),
                       ({"fraction": 0.01}, "fraction 0.01 keeps 0"), ({"workers": -1}, "workers must be an integer >= 0")):
        with pytest.raises(LoaderError, match=words):
            make_loader(packed["wds"], "train", **{**kw, **bad})
    if not torch.cuda.is_available():  # DALI's GPU pipeline used to be built, and fail only at the first batch
        with pytest.raises(DataError, match="device cuda: CUDA is not available here; use 'auto' or 'cpu'"):
            make_loader(packed["tfrecord"], "train", **{**kw, "device": "cuda"})
    with pytest.raises(DataError, match="device 'gpu0': not a device name"):
        make_loader(packed["tfrecord"], "train", **{**kw, "device": "gpu0"})
