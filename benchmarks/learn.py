"""It learns: our trainer vs ultralytics' own trainer on synthetic detection sets, median over seeds.

For each set of `_synthetic.SETS` (``shapes``: the issue-11 set, 4 classes, 320 train / 64 val;
``dense``: other shapes, smaller and more objects, larger images):

1. generate it (YOLO layout, data seed 0) and pack it with ``packer.build.build_dataset`` (tfrecord);
2. per training seed, train ``trainer.engine.train`` (the ``python -m trainer.run`` job) and
   ``YOLO(model).train(...)`` on the raw images with the same model / epochs / imgsz / batch;
3. validate both best.pt files the same way, ``YOLO(best).val(rect=False)`` on the raw val images;
4. print the median mAP50-95 of each trainer over the seeds and the ratio ours / ultralytics per set
   (target >= 1.0 on every set).

``--aug-stats`` trains nothing: it runs one epoch of each trainer's training augmentation and prints
objects per image, box size and the share of fill-grey pixels (mosaic on and off), the cheap check
that both loaders show the model the same thing.

Full benchmark (slow on CPU: 2 sets x 3 seeds x 2 trainers):
``.venv/bin/python benchmarks/learn.py --seeds 0,1,2``.
Ablations: ``--mosaic off`` (both trainers, no mosaic at all), ``--close-mosaic N``,
``--trainers ours`` / ``ultralytics``, ``--epochs``, ``--train``/``--val`` (smaller sets).
Writes ``out/learn/learn.json`` with every figure and the per-epoch loss/mAP curves of every run.
``--stats A.json B.json`` trains nothing: it pools runs of the same settings and prints what
their seed spread lets them say (``_seed_stats``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from _seed_stats import pool_runs, print_pooled
from _synthetic import SETS, SetSpec, make_set

from trainer.offline import setup_offline

ROOT = Path(__file__).resolve().parents[1]

MAP = "metrics/mAP50-95(B)"
TRAINERS = ("ours", "ultralytics", "plugin")
CURVE_EPOCHS = (1, 5, 10, 15)  # epochs shown in the printed curves table (those that exist)
CURVE_COLS = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP50(B)", MAP)


def val_on_raw(weights: Path, data: Path, imgsz: int, batch: int) -> dict[str, float]:
    """The common yardstick: ultralytics' val on the raw val images, square letterbox (rect=False)."""
    from ultralytics import YOLO

    r = YOLO(str(weights)).val(data=str(data), imgsz=imgsz, batch=batch, rect=False, plots=False, verbose=False,
                               device="cpu", workers=0, project=str(weights.parent.parent), name="val",
                               exist_ok=True)
    return {k: round(float(v), 5) for k, v in r.results_dict.items()}


def read_curves(results_csv: Path) -> dict[str, list[float]]:
    """Per-epoch columns of a results.csv (ours or ultralytics': same column names)."""
    if not results_csv.exists():
        return {}
    with open(results_csv, newline="") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return {c: [round(float(r[c]), 5) for r in rows] for c in CURVE_COLS if rows and c in rows[0]}


def train_ours(a: argparse.Namespace, shards: Path, out: Path, seed: int) -> Path:
    from trainer.engine import TrainConfig, train

    r = train(TrainConfig(shards=str(shards), model=a.model, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                          device="cpu", loader=a.loader, seed=seed, out=str(out), exist_ok=True,
                          mosaic=a.mosaic == "on", close_mosaic=a.close_mosaic))
    return r.best or r.last


def train_ultralytics(a: argparse.Namespace, data: Path, out: Path, seed: int) -> Path:
    from ultralytics import YOLO

    YOLO(a.model).train(data=str(data / "data.yaml"), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, device="cpu",
                        workers=0, project=str(out.parent), name=out.name, exist_ok=True, plots=False, amp=False,
                        seed=seed, verbose=False, mosaic=1.0 if a.mosaic == "on" else 0.0,
                        close_mosaic=a.close_mosaic)
    return out / "weights" / "best.pt"


def train_plugin(a: argparse.Namespace, shards: Path, out: Path, seed: int) -> Path:
    """ultralytics' own trainer fed by our loader: YOLO().train(trainer=ShardsTrainer) on the packed set."""
    from ultralytics import YOLO

    from trainer.ultralytics import ShardsTrainer

    YOLO(a.model).train(data=str(shards), trainer=ShardsTrainer.options(loader=a.loader), epochs=a.epochs,
                        imgsz=a.imgsz, batch=a.batch, device="cpu", workers=2, project=str(out.parent), name=out.name,
                        exist_ok=True, plots=False, amp=False, seed=seed, verbose=False,
                        mosaic=1.0 if a.mosaic == "on" else 0.0, close_mosaic=a.close_mosaic)
    return out / "weights" / "best.pt"


def prepare_set(a: argparse.Namespace, spec: SetSpec, out: Path) -> Path:
    """Generate the set (data seed 0) and pack it; returns the raw data folder."""
    from packer.build import build_dataset

    data = make_set(out / "data", spec, 0, a.train, a.val)
    build_dataset(data, out / "shards", fmt="tfrecord", size=a.pack_size or a.imgsz, chroma=a.pack_chroma,
                  overwrite=True)
    return data


def run_one(a: argparse.Namespace, spec: SetSpec, out: Path, data: Path, who: str, seed: int) -> dict:
    """One training run of one trainer, scored on the raw val images."""
    run_dir = out / f"{who}_s{seed}"
    t0 = time.time()
    if who == "ours":
        best = train_ours(a, out / "shards", run_dir, seed)
    elif who == "plugin":
        best = train_plugin(a, out / "shards", run_dir, seed)
    else:
        best = train_ultralytics(a, data, run_dir, seed)
    t_train = time.time() - t0
    m = val_on_raw(best, data / "data.yaml", a.imgsz, a.batch)
    print(f"[{spec.name}] {who:<11} seed {seed}: mAP50-95 {m[MAP]:.4f}  mAP50 {m['metrics/mAP50(B)']:.4f}"
          f"  ({t_train:.0f} s)", flush=True)
    return {"train_s": round(t_train, 1), "val": m, "curves": read_curves(run_dir / "results.csv")}


def _run_of(key: str, who: str, seeds: list[int]) -> bool:
    """Whether run key "trainer/seed" is one of `who`'s with a seed in `seeds`."""
    w, seed = key.split("/")
    return w == who and int(seed) in seeds


def summarize(a: argparse.Namespace, res: dict) -> None:
    """Medians over the seeds done so far and the ratio ours / ultralytics, per set (in place)."""
    for who in a.trainers:
        vals = [r["val"][MAP] for k, r in res["runs"].items() if _run_of(k, who, a.seeds)]
        if vals:
            res[f"{who}_median"] = round(statistics.median(vals), 5)
            res[f"{who}_seeds"] = len(vals)
    if res.get("ultralytics_median"):
        for who in ("ours", "plugin"):
            if f"{who}_median" in res:
                key = "ratio" if who == "ours" else f"{who}_ratio"
                res[key] = round(res[f"{who}_median"] / res["ultralytics_median"], 3)


SAME_RUN = ("epochs", "imgsz", "batch", "model", "loader", "mosaic", "close_mosaic", "train", "val", "pack_size",
            "pack_chroma")
OLD_DEFAULTS = {"pack_chroma": "420"}  # settings that learn.json files older than the setting did not record


def reusable_runs(a: argparse.Namespace, out: Path) -> dict[str, dict]:
    """--reuse: the runs of an earlier learn.json in `out` made with the same settings, per set."""
    f = out / "learn.json"
    if not a.reuse or not f.exists():
        return {}
    old = json.loads(f.read_text())
    if any(old.get("args", {}).get(k, OLD_DEFAULTS.get(k)) != getattr(a, k) for k in SAME_RUN):
        print(f"--reuse: {f} was made with other settings; training everything again", flush=True)
        return {}
    return {name: r.get("runs", {}) for name, r in old.get("sets", {}).items()}


def run_all(a: argparse.Namespace, out: Path, res: dict) -> None:
    """Seed by seed across the sets (so an interrupted run still has every set), writing
    learn.json after every training run; with --reuse, runs already in learn.json are kept."""
    old = reusable_runs(a, out)
    data = {name: prepare_set(a, SETS[name], out / name) for name in a.sets}
    for name in [*old, *(n for n in a.sets if n not in old)]:  # sets not asked for this time stay in learn.json
        res["sets"][name] = {"set": name, "classes": list(SETS[name].classes), "runs": dict(old.get(name, {}))}
    for seed in a.seeds:
        for name in a.sets:
            for who in a.trainers:
                r = res["sets"][name]
                if f"{who}/{seed}" in r["runs"]:
                    continue
                r["runs"][f"{who}/{seed}"] = run_one(a, SETS[name], out / name, data[name], who, seed)
                summarize(a, r)
                (out / "learn.json").write_text(json.dumps(res, indent=2) + "\n")
    for r in res["sets"].values():  # every set, reused runs included
        summarize(a, r)
    (out / "learn.json").write_text(json.dumps(res, indent=2) + "\n")


# ----------------------------------------------------------------------------- --aug-stats


def _stats(imgs: list[np.ndarray], nboxes: list[int], areas: list[np.ndarray]) -> dict[str, float]:
    """Objects per image, median box area (fraction of the input) and share of fill-grey pixels.

    Fill pixels are found as R == G == B (the textured backgrounds and random shape colours are
    almost never exactly grey; HSV value jitter moves 114 but keeps it grey)."""
    grey = [float(np.mean((im[..., 0] == im[..., 1]) & (im[..., 1] == im[..., 2]))) for im in imgs]
    a = np.concatenate(areas) if areas else np.zeros(0)
    return {"images": len(imgs), "objects_per_image": round(float(np.mean(nboxes)), 3),
            "median_box_area": round(float(np.median(a)) if len(a) else 0.0, 5),
            "grey_share": round(float(np.mean(grey)), 4)}


def _draw_batch(b: dict, fname: Path, names: dict[int, str]) -> None:
    """One augmented batch with its boxes, drawn by ultralytics' plot_images (as train_batch0.jpg)."""
    from ultralytics.utils.plotting import plot_images

    keep = {k: b[k] for k in ("img", "cls", "bboxes", "batch_idx") if k in b}
    plot_images(labels=keep, fname=fname, names=names, threaded=False)


def _ultra_epoch(data: Path, imgsz: int, batch: int, mosaic: bool, n: int, picture: Path) -> dict[str, float]:
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "mosaic": 1.0})
    d = check_det_dataset(str(data / "data.yaml"))
    ds = build_yolo_dataset(cfg, d["train"], batch, d, mode="train", stride=32)
    if not mosaic:
        ds.close_mosaic(cfg)
    imgs, nb, areas, first = [], [], [], []
    for i in np.random.default_rng(0).permutation(len(ds))[:n]:
        s = ds[int(i)]
        if len(first) < batch:
            first.append(s)
            if len(first) == batch:
                _draw_batch(ds.collate_fn(first), picture, d["names"])
        imgs.append(s["img"].permute(1, 2, 0).numpy())
        nb.append(len(s["cls"]))
        areas.append((s["bboxes"][:, 2] * s["bboxes"][:, 3]).numpy())
    return _stats(imgs, nb, areas)


def _our_epoch(shards: Path, imgsz: int, batch: int, mosaic: bool, loader: str, n: int,
               picture: Path) -> dict[str, float]:
    from trainer.data import make_loader

    ld = make_loader(shards, "train", loader=loader, imgsz=imgsz, batch=batch, train=True, workers=0 if
                     loader == "torch" else 1, device="cpu")
    ld.set_epoch(0)
    ld.set_mosaic(mosaic)
    imgs, nb, areas = [], [], []
    for b in ld:
        if not imgs:
            _draw_batch(b, picture, dict(enumerate(ld.names)))
        img = b["img"].permute(0, 2, 3, 1).numpy()
        for j in range(img.shape[0]):
            sel = (b["batch_idx"] == j).numpy()
            imgs.append(img[j])
            nb.append(int(sel.sum()))
            areas.append((b["bboxes"][sel, 2] * b["bboxes"][sel, 3]).numpy())
        if len(imgs) >= n:
            break
    ld.close()
    return _stats(imgs[:n], nb[:n], areas[:n])


def side_by_side(pictures: list[Path], dst: Path, height: int = 480) -> None:
    """The pictures in a row, each scaled to `height`, white gaps between: one file to compare at a glance."""
    import cv2

    ims = [cv2.imread(str(p)) for p in pictures]
    ims = [cv2.resize(im, (round(im.shape[1] * height / im.shape[0]), height), interpolation=cv2.INTER_AREA)
           for im in ims if im is not None]
    gap = np.full((height, 12, 3), 255, np.uint8)
    row = [x for im in ims for x in (im, gap)][:-1]
    if row:
        cv2.imwrite(str(dst), np.hstack(row), [cv2.IMWRITE_JPEG_QUALITY, 85])


def aug_stats(a: argparse.Namespace, spec: SetSpec, out: Path) -> dict:
    from trainer.data import dali_available

    data = prepare_set(a, spec, out)
    n = a.train or spec.n_train
    res: dict = {}
    loaders = ["torch"] + (["dali"] if dali_available() else [])
    for mosaic in (True, False):
        tag = "mosaic" if mosaic else "no-mosaic"
        pics = [out / f"aug_ultralytics_{tag}.jpg", *(out / f"aug_ours-{ld}_{tag}.jpg" for ld in loaders)]
        res[f"ultralytics/{tag}"] = _ultra_epoch(data, a.imgsz, a.batch, mosaic, n, pics[0])
        for ld, pic in zip(loaders, pics[1:], strict=True):
            res[f"ours-{ld}/{tag}"] = _our_epoch(out / "shards", a.imgsz, a.batch, mosaic, ld, n, pic)
        side_by_side(pics, out / f"aug_side_by_side_{tag}.jpg")
    print(f"\n[{spec.name}] one epoch of training augmentation, {n} images at {a.imgsz} px")
    print(f"{'who/mode':<28}{'objects/img':>12}{'median box area':>17}{'grey share':>12}")
    for k, v in res.items():
        print(f"{k:<28}{v['objects_per_image']:>12.2f}{v['median_box_area']:>17.4f}{v['grey_share']:>12.3f}")
    print(f"first augmented batch of each ({', '.join(['ultralytics'] + loaders)}): {out}/aug_side_by_side_*.jpg")
    return res


# ----------------------------------------------------------------------------- main


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "learn"))
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (0,1,2: median over 3)")
    ap.add_argument("--trainers", default="ours,ultralytics",
                    help=f"comma-separated, of: {', '.join(TRAINERS)} (plugin: YOLO().train(trainer=ShardsTrainer))")
    ap.add_argument("--train", type=int, default=None, help="training images (default: the set's, 320)")
    ap.add_argument("--val", type=int, default=None, help="validation images (default: the set's, 64)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--pack-size", type=int, default=None,
                    help="long side the set is packed at (default: --imgsz; larger: no pack-time downscale)")
    ap.add_argument("--pack-chroma", choices=("auto", "420", "444"), default="auto", help="packer build --chroma")
    ap.add_argument("--loader", default="auto", help="our loader: auto, torch, dali")
    ap.add_argument("--mosaic", choices=("on", "off"), default="on", help="mosaic in both trainers")
    ap.add_argument("--close-mosaic", type=int, default=10, help="both trainers: last N epochs without mosaic")
    ap.add_argument("--reuse", action="store_true", help="keep the runs of an earlier learn.json in --out "
                    "made with the same settings; train only the missing (set, trainer, seed)")
    ap.add_argument("--aug-stats", action="store_true", help="compare one epoch of augmentation; no training")
    ap.add_argument("--stats", nargs="+", metavar="LEARN_JSON", help="no training: pool the runs of these "
                    "learn.json files (same settings) and print what their seed spread lets them say")
    a = ap.parse_args()
    a.sets = [s for s in a.sets.split(",") if s]
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    a.trainers = [t for t in a.trainers.split(",") if t]
    bad = [s for s in a.sets if s not in SETS] + [t for t in a.trainers if t not in TRAINERS]
    if bad or not a.seeds or not a.sets or not a.trainers:
        ap.error(f"unknown or empty: {', '.join(bad) or 'sets/seeds/trainers'}")
    return a


def print_summary(a: argparse.Namespace, res: dict) -> None:
    """Median mAP50-95 per trainer and set, the ratios to ultralytics, then the median curves."""
    print("\n=== learn benchmark ===")
    print(f"machine: {res['machine']}")
    print(f"model {a.model}, {a.epochs} epochs, imgsz {a.imgsz}, batch {a.batch}, mosaic {a.mosaic}, "
          f"close_mosaic {a.close_mosaic}, seeds {a.seeds}")
    extra = [t for t in a.trainers if t == "plugin"]
    print(f"{'set':<10}" + "".join(f"{t + ' mAP50-95':>24}" for t in a.trainers) + f"{'ours/ultra':>12}"
          + "".join(f"{'plugin/ultra':>14}" for _ in extra))
    for name, r in res["sets"].items():
        print(f"{name:<10}" + "".join(f"{r.get(t + '_median', float('nan')):>24.4f}" for t in a.trainers)
              + f"{r.get('ratio', float('nan')):>12.3f}" + "".join(f"{r.get('plugin_ratio', float('nan')):>14.3f}"
                                                                 for _ in extra))
    print_pooled({name: {who: {int(k.split("/")[1]): v["val"][MAP] for k, v in r["runs"].items()
                               if _run_of(k, who, a.seeds)} for who in a.trainers}
                  for name, r in res["sets"].items()})
    ratios = [r["ratio"] for r in res["sets"].values() if "ratio" in r]
    if ratios:
        print(f"target ours/ultralytics >= 1.0 on every set: {'met' if min(ratios) >= 1.0 else 'NOT met'}")
    print("\nmedian curves over the seeds (train losses, val mAP50-95 by each trainer's own validation):")
    print(f"{'set':<8}{'trainer':<13}{'column':<22}" + "".join(f"{'ep ' + str(e):>9}" for e in CURVE_EPOCHS))
    for name, r in res["sets"].items():
        for who in a.trainers:
            curves = [v["curves"] for k, v in r["runs"].items() if _run_of(k, who, a.seeds) and v["curves"]]
            for col in CURVE_COLS:
                rows = [c[col] for c in curves if col in c]
                if not rows:
                    continue
                cells = [statistics.median(row[e - 1] for row in rows if len(row) >= e) if any(
                    len(row) >= e for row in rows) else float("nan") for e in CURVE_EPOCHS]
                print(f"{name:<8}{who:<13}{col:<22}" + "".join(f"{v:>9.3f}" for v in cells))


def main() -> None:
    a = _parse()
    if a.stats:
        return print_pooled(pool_runs(a.stats, MAP, SAME_RUN, OLD_DEFAULTS))
    setup_offline()  # before ultralytics is imported: nothing downloaded, no update check
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
                 "args": vars(a), "sets": {}}
    if a.aug_stats:
        for name in a.sets:
            res["sets"][name] = aug_stats(a, SETS[name], out / name)
            (out / "learn.json").write_text(json.dumps(res, indent=2) + "\n")
    else:
        run_all(a, out, res)
        print_summary(a, res)
    print(f"figures in {out / 'learn.json'}")


if __name__ == "__main__":
    main()
