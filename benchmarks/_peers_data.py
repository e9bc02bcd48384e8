"""Data and loaders for benchmarks/peers.py.

Data, made once under a work folder and reused (built under a temporary name and renamed when
complete, so an interrupted run leaves nothing a later run takes for done): `coco_labels`
(coco128's json -> YOLO txt by ultralytics' `convert_coco`), `upscaled_images` (coco128 upscaled
to a 3000-px long side, JPEG q92), `yolo_set` (n symlinked copies: what ultralytics reads),
`packed_set` (that folder packed by our packer, wds at imgsz), `write_mds` / `write_litdata` (our
packed samples written again for MosaicML Streaming and LitData: every peer reads our JPEGs).

Loaders: `RUNNERS[name](name, data, cfg)` builds one loader under test as a `Loop`. The
streaming peers share `decode_letterbox` (cv2.imdecode, long side resized to imgsz with
INTER_LINEAR as ultralytics' load_image, centred 114 padding as its LetterBox, RGB CHW uint8,
boxes moved into the padded frame) and `collate` (ultralytics' batch dict).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import json
import multiprocessing as mp
import os
import shutil
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml

from packer.format import WDS_BOX, WDS_CLASS, WDS_IMAGE, read_manifest


@dataclass(frozen=True)
class Member:
    """Where one packed sample's image, class and box bytes lie in its tar."""

    tar: str
    jpg: tuple[int, int]  # (data offset, size)
    cls: tuple[int, int]
    box: tuple[int, int]


def _build(dst: Path, make: Callable[[Path], None]) -> Path:
    """`dst` if it exists, else `make(tmp)` into a sibling temp folder renamed to `dst` when done."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover (this pid's name), never someone else's folder
    tmp.mkdir(parents=True)
    make(tmp)
    tmp.rename(dst)
    return dst


def class_names(coco_json: Path) -> list[str]:
    """The 80 names in the order of ultralytics' 91->80 class mapping (ascending category id)."""
    cats = json.loads(coco_json.read_text())["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def coco_labels(coco_root: Path, work: Path) -> Path:
    """Folder of YOLO txt labels (one per annotated image) made by ultralytics' convert_coco."""
    from ultralytics.data.converter import convert_coco

    def make(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        for j in (coco_root / "annotations").glob("instances_*.json"):
            (tmp / "annotations" / j.name).symlink_to(j.resolve())
        convert_coco(str(tmp / "annotations"), save_dir=str(tmp / "converted"), cls91to80=True)

    done = _build(work / "coco128-yolo-labels", make)
    (sub,) = [p for p in (done / "converted" / "labels").iterdir() if p.is_dir()]
    return sub


def _upscale_one(src: Path, dst: Path, long_side: int, quality: int) -> None:
    """`src` upscaled to `long_side` px written to `dst` (via a temp name: a file there is complete)."""
    if dst.is_file():
        return
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    r = long_side / max(h, w)
    img = cv2.resize(img, (round(w * r), round(h * r)), interpolation=cv2.INTER_CUBIC)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    tmp.write_bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    tmp.rename(dst)


def upscaled_images(images: list[Path], work: Path, long_side: int = 3000, quality: int = 92) -> list[Path]:
    """`images` upscaled to `long_side` px (JPEG `quality`), same file names, in work/ (made once)."""
    out = work / f"coco128-{long_side}px-q{quality}"
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as ex:  # cv2 releases the GIL
        list(ex.map(lambda p: _upscale_one(p, out / p.name, long_side, quality), images))
    return [out / p.name for p in images]


def yolo_set(name: str, images: list[Path], labels: Path, n: int, names: list[str], work: Path) -> Path:
    """A YOLO folder of `n` symlinked copies (r<copy>_<file>) of `images`, labels from `labels`."""

    def make(tmp: Path) -> None:
        img_dir, lab_dir = tmp / "images" / "train", tmp / "labels" / "train"
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        for i in range(n):
            src = images[i % len(images)]
            stem = f"r{i // len(images)}_{src.stem}"
            (img_dir / f"{stem}{src.suffix}").symlink_to(src.resolve())
            lab = labels / f"{src.stem}.txt"
            if lab.is_file():
                (lab_dir / f"{stem}.txt").symlink_to(lab.resolve())
        cfg = {"path": ".", "train": "images/train", "names": dict(enumerate(names))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    return _build(work / name, make)


def packed_name(yolo_dir: Path, imgsz: int, chroma: str = "auto") -> str:
    """A packed set's folder name, holding the options that change its bytes (never reused across them)."""
    return f"{yolo_dir.name}-wds{imgsz}-{chroma}"


def packed_set(yolo_dir: Path, imgsz: int, work: Path, chroma: str = "auto") -> Path:
    """`yolo_dir` packed by our packer as WebDataset shards at `imgsz` (`chroma`: packer build --chroma)."""
    from packer.build import build_dataset

    def make(tmp: Path) -> None:
        # the set's images are symlinks to coco128 outside the folder: packing them is the point
        build_dataset(yolo_dir, tmp / "shards", fmt="wds", size=imgsz, workers=os.cpu_count() or 1,
                      overwrite=True, chroma=chroma, follow_symlinks=True)

    return _build(work / packed_name(yolo_dir, imgsz, chroma), make) / "shards"


def packed_tars(shards: Path, split: str = "train") -> list[Path]:
    """The split's tar files, in manifest order."""
    return [shards / sh.path for sh in read_manifest(shards).splits[split].shards]


def packed_members(shards: Path, split: str = "train") -> list[Member]:
    """Every sample of the split: where its JPEG, class and box bytes lie (read from the tar headers)."""
    out = []
    for tar in packed_tars(shards, split):
        parts: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(tar, "r:") as tf:
            for ti in tf:
                key, _, ext = ti.name.partition(".")
                parts.setdefault(key, {})[ext] = (ti.offset_data, ti.size)
        for p in parts.values():
            out.append(Member(str(tar), p[WDS_IMAGE], p[WDS_CLASS], p[WDS_BOX]))
    return out


def read_member(m: Member) -> dict[str, bytes]:
    """The sample's stored bytes: jpg, cls (int32 LE), box (float32 LE, normalized cx,cy,w,h)."""
    out = {}
    with open(m.tar, "rb") as f:
        for name, (off, size) in (("jpg", m.jpg), ("cls", m.cls), ("box", m.box)):
            f.seek(off)
            out[name] = f.read(size)
    return out


def write_mds(members: list[Member], work: Path, name: str) -> Path:
    """The samples as a local MosaicML Streaming (MDS) dataset."""
    from streaming import MDSWriter

    def make(tmp: Path) -> None:
        cols = {"jpg": "bytes", "cls": "bytes", "box": "bytes"}
        with MDSWriter(out=str(tmp / "mds"), columns=cols, size_limit=1 << 26) as w:
            for m in members:
                w.write(read_member(m))

    return _build(work / name, make) / "mds"


def write_litdata(members: list[Member], work: Path, name: str) -> Path:
    """The samples as a local LitData optimized dataset (`litdata.optimize`)."""
    from litdata import optimize

    def make(tmp: Path) -> None:
        optimize(fn=read_member, inputs=members, output_dir=str(tmp / "litdata"), chunk_bytes="64MB",
                 num_workers=1, mode="overwrite", verbose=False, start_method="fork")

    return _build(work / name, make) / "litdata"


def decode_letterbox(s: dict[str, bytes], imgsz: int) -> dict[str, torch.Tensor]:
    """One stored sample (jpg/cls/box bytes) as a letterboxed imgsz x imgsz RGB CHW uint8 sample."""
    img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    r = imgsz / max(h, w)
    nw, nh = (min(round(w * r), imgsz), min(round(h * r), imgsz)) if r != 1 else (w, h)
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (imgsz - nh) // 2, (imgsz - nw) // 2
    img = cv2.copyMakeBorder(img, top, imgsz - nh - top, left, imgsz - nw - left, cv2.BORDER_CONSTANT,
                             value=(114, 114, 114))
    boxes = np.frombuffer(s["box"], "<f4").reshape(-1, 4) * np.array([nw, nh, nw, nh], np.float32) / imgsz
    boxes[:, :2] += np.array([left, top], np.float32) / imgsz
    cls = np.frombuffer(s["cls"], "<i4").astype(np.float32).reshape(-1, 1)
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])
    return {"img": torch.from_numpy(chw), "cls": torch.from_numpy(cls), "bboxes": torch.from_numpy(boxes)}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ultralytics' detection batch: stacked images, concatenated boxes with their batch index."""
    idx = [torch.full((len(s["cls"]),), i, dtype=torch.float32) for i, s in enumerate(samples)]
    return {"img": torch.stack([s["img"] for s in samples]), "cls": torch.cat([s["cls"] for s in samples]),
            "bboxes": torch.cat([s["bboxes"] for s in samples]), "batch_idx": torch.cat(idx)}


# ----------------------------------------------------------------------------- the loaders under test


class PeerError(RuntimeError):
    """A peer library failed on our data (exit 1)."""


@dataclass(frozen=True)
class Config:
    imgsz: int
    batch: int
    workers: int
    augment: bool
    seed: int = 0


@dataclass
class Loop:
    """One loader under test: `epoch(e)` runs epoch e to its end and returns the images it gave."""

    loader: Any
    set_epoch: Callable[[int], None] | None
    close: Callable[[], None]

    def epoch(self, e: int) -> int:
        if self.set_epoch is not None:
            self.set_epoch(e)
        return sum(int(b["img"].shape[0]) for b in self.loader)


PEER_MODULES = {p: p.removesuffix("-ram") for p in ("streaming", "litdata", "webdataset", "ultralytics",
                                                   "ultralytics-ram")}


def unavailable(peer: str) -> str | None:
    """Why `peer` cannot run here (one line), or None."""
    if peer == "ours-ram":
        from trainer.data import make_loader

        if "cache" not in inspect.signature(make_loader).parameters:
            return "trainer.data.make_loader has no cache= parameter yet"
    mod = PEER_MODULES.get(peer)
    if mod is not None:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure means: not installed usably
            return f"cannot import {mod} ({type(e).__name__}: {str(e)[:80]}); pip install '.[bench]'"
    return None


def versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "opencv-python", "ultralytics", "mosaicml-streaming", "litdata", "webdataset"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def ours(name: str, data: dict, cfg: Config) -> Loop:
    from trainer.data import AugmentConfig, make_loader

    extra = {"cache": "ram"} if name == "ours-ram" else {}
    store = _ram_store(data["shards"]) if extra else None
    ours_now = store is not None and not store.exists()
    ld = make_loader(data["shards"], "train", loader="torch", imgsz=cfg.imgsz, batch=cfg.batch, train=True,
                     seed=cfg.seed, workers=cfg.workers, device="cpu",
                     augment=AugmentConfig() if cfg.augment else AugmentConfig.off(), **extra)

    def close() -> None:
        ld.close()
        if ours_now:  # the decoded store this run had built (in RAM): do not leave it behind
            shutil.rmtree(store, ignore_errors=True)

    return Loop(ld, ld.set_epoch, close)


def _ram_store(shards: Path) -> Path | None:
    """Where make_loader(cache="ram") keeps this split's decoded store (None if that API moved)."""
    try:
        from trainer.data.common import open_split
        from trainer.data.decoded_cache import store_dir

        return store_dir(open_split(shards, "train"), "ram")
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def ultralytics(name: str, data: dict, cfg: Config) -> Loop:
    """YOLODataset + build_dataloader (peers.py has run trainer.offline.setup_offline first)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import DEFAULT_CFG

    hyp = get_cfg(DEFAULT_CFG, {"imgsz": cfg.imgsz})  # ultralytics' default augmentation (mosaic 1.0, ...)
    ds = YOLODataset(img_path=str(data["yolo"] / "images" / "train"), imgsz=cfg.imgsz, batch_size=cfg.batch,
                     augment=cfg.augment, hyp=hyp, rect=False, cache="ram" if name.endswith("-ram") else False,
                     single_cls=False, stride=32, pad=0.0, prefix="", task="detect", classes=None, fraction=1.0,
                     data={"names": dict(enumerate(data["names"])), "nc": len(data["names"]), "channels": 3})
    dl = build_dataloader(ds, cfg.batch, cfg.workers, shuffle=True, rank=-1, pin_memory=False, device="cpu")
    return Loop(dl, None, dl.close)


def streaming(name: str, data: dict, cfg: Config) -> Loop:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()

    class Decoded(StreamingDataset):
        def __getitem__(self, i: int) -> dict:
            return decode_letterbox(super().__getitem__(i), cfg.imgsz)

    ds = Decoded(local=str(data["mds"]), shuffle=True, shuffle_seed=cfg.seed, batch_size=cfg.batch)
    dl = DataLoader(ds, batch_size=cfg.batch, num_workers=cfg.workers, collate_fn=collate, persistent_workers=True)
    return Loop(dl, None, lambda: _shutdown(dl))


def litdata(name: str, data: dict, cfg: Config) -> Loop:
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(input_dir=str(data["litdata"]), shuffle=True, seed=cfg.seed,
                          transform=functools.partial(decode_letterbox, imgsz=cfg.imgsz))
    dl = StreamingDataLoader(ds, batch_size=cfg.batch, num_workers=cfg.workers, collate_fn=collate,
                             persistent_workers=True)
    return Loop(dl, None, lambda: _shutdown(dl))


def webdataset(name: str, data: dict, cfg: Config) -> Loop:
    import webdataset as wds

    tars = [str(t) for t in packed_tars(data["shards"])]
    ds = (wds.WebDataset(tars, shardshuffle=len(tars), seed=cfg.seed, empty_check=False)
          .shuffle(256)  # the buffer our torch loader used (records mixed before decoding)
          .map(functools.partial(decode_letterbox, imgsz=cfg.imgsz))
          .batched(cfg.batch, collation_fn=collate, partial=True))
    dl = wds.WebLoader(ds, batch_size=None, num_workers=cfg.workers, persistent_workers=True)
    return Loop(dl, None, lambda: _shutdown(dl))


def _shutdown(dl: Any) -> None:
    """End a DataLoader's persistent workers now (not at garbage collection)."""
    if not hasattr(dl, "_iterator"):  # webdataset's WebLoader wraps the DataLoader
        dl = dl.pipeline[0]
    it = getattr(dl, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


_JPEGS: list[bytes] = []


def _decode_range(span: tuple[int, int]) -> int:
    for j in _JPEGS[span[0]:span[1]]:
        cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
    return span[1] - span[0]


def decode(name: str, data: dict, cfg: Config) -> Loop:
    """The ceiling: cv2.imdecode of the packed JPEGs (in memory) on `workers` forked processes."""
    global _JPEGS
    _JPEGS = [read_member(m)["jpg"] for m in data["members"]]
    n, k = len(_JPEGS), cfg.workers
    spans = [(i * n // k, (i + 1) * n // k) for i in range(k)]
    pool = mp.get_context("fork").Pool(k)

    class Epoch:
        def __iter__(self):  # one "batch" per epoch: the count is all the loop needs
            yield {"img": np.empty((sum(pool.map(_decode_range, spans)), 0))}

    return Loop(Epoch(), None, lambda: (pool.terminate(), pool.join()))


RUNNERS: dict[str, Callable[[str, dict, Config], Loop]] = {
    "ours": ours, "ours-ram": ours, "ultralytics": ultralytics, "ultralytics-ram": ultralytics,
    "streaming": streaming, "litdata": litdata, "webdataset": webdataset, "decode": decode}
