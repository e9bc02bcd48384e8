"""RAM of a node where several ranks train from a decoded cache: ours (`cache="ram"`) vs ultralytics' `cache='ram'`.

    .venv/bin/python benchmarks/cache_ranks.py [--work DIR] [--ranks 2] [--images 1024] [--workers 2] [--json]

Each side runs as a real `torchrun --nproc_per_node=RANKS` job (gloo) on the same coco128 x8 set at
640 that `peers.py` uses (made under --work and reused):

- ours: every rank calls ``make_loader(shards, "train", cache="ram", rank=r, world_size=RANKS)``
  over the wds shards and reads one epoch of its share. The first rank builds the one decoded
  store in /dev/shm, the others wait for it and map it.
- ultralytics: every rank builds ``YOLODataset(cache="ram")`` on the raw YOLO folder and
  ``build_dataloader(..., rank=r)`` (a DistributedSampler) and reads one epoch, as each rank of an
  ultralytics DDP run does (every rank caches every image).

Both without augmentation, batch 16, `--workers` DataLoader workers per rank. After the epoch each
rank holds its loader (workers alive) while this script reads /proc/PID/smaps of every process of
the torchrun tree: node RAM = the PSS of every process (shared pages counted once) without the
mappings of our store, plus the store's file size (a /dev/shm file is RAM whether mapped or not).
Largest of three samples a second apart. Memory only: no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = ("ours", "ultralytics")


# ----------------------------------------------------------------------------- one rank (under torchrun)


def rank_main(a: argparse.Namespace) -> int:
    """One rank: build the side's loader, read one epoch, say ready, hold until released."""
    import torch.distributed as dist

    from trainer.offline import setup_offline

    setup_offline()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    ctl = Path(a.ctl)
    if a.role == "ours":
        from trainer.data import AugmentConfig, make_loader

        ld = make_loader(a.shards, "train", loader="torch", imgsz=a.imgsz, batch=a.batch, train=True, rank=rank,
                         world_size=world, workers=a.workers, device="cpu", augment=AugmentConfig.off(), cache="ram")
        ld.set_epoch(0)
    else:
        from ultralytics.utils.torch_utils import torch_distributed_zero_first

        with torch_distributed_zero_first(rank):  # as ultralytics' trainer: rank 0 writes labels.cache first
            ld = _ultralytics_loader(a, rank)
        ld.sampler.set_epoch(0)
    n = sum(int(b["img"].shape[0]) for b in ld)
    (ctl / f"ready-{rank}").write_text(str(n))
    while not (ctl / "release").exists():
        time.sleep(0.2)
    dist.barrier()
    if hasattr(ld, "close"):
        ld.close()
    dist.destroy_process_group()
    return 0


def _ultralytics_loader(a: argparse.Namespace, rank: int):  # noqa: ANN202 - ultralytics' InfiniteDataLoader
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import DEFAULT_CFG

    names = json.loads(a.names)
    ds = YOLODataset(img_path=str(Path(a.yolo) / "images" / "train"), imgsz=a.imgsz, batch_size=a.batch,
                     augment=False, hyp=get_cfg(DEFAULT_CFG, {"imgsz": a.imgsz}), rect=False, cache="ram",
                     single_cls=False, stride=32, pad=0.0, prefix="", task="detect", classes=None, fraction=1.0,
                     data={"names": dict(enumerate(names)), "nc": len(names), "channels": 3})
    return build_dataloader(ds, a.batch, a.workers, shuffle=True, rank=rank, pin_memory=False, device="cpu")


# ----------------------------------------------------------------------------- the measuring parent


def tree_memory(root: psutil.Process, store: Path | None) -> dict[str, int]:
    """PSS of every process under `root` (root included), split into the store's mappings and the rest."""
    procs = [root, *root.children(recursive=True)]
    pss = in_store = 0
    for p in procs:
        try:
            pss_p, store_p = _smaps_pss(p.pid, str(store) if store else None)
        except (OSError, psutil.Error):
            continue  # exited between listing and reading
        pss += pss_p
        in_store += store_p
    return {"processes": len(procs), "pss": pss, "pss_store": in_store}


def _smaps_pss(pid: int, prefix: str | None) -> tuple[int, int]:
    """(total PSS, PSS of mappings whose file is under `prefix`) of one process, in bytes."""
    total = mine = 0
    current_is_store = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's header line: "addr perms offset dev inode [path]"
                parts = line.split(maxsplit=5)
                current_is_store = bool(prefix) and len(parts) == 6 and parts[5].startswith(prefix)
            elif head == "Pss:":
                kb = int(line.split()[1]) * 1024
                total += kb
                mine += kb if current_is_store else 0
    return total, mine


def dir_bytes(path: Path | None) -> int:
    """Allocated bytes of the files under `path` (tmpfs: the RAM they hold)."""
    if path is None or not path.exists():
        return 0
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def run_side(a: argparse.Namespace, side: str, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """One torchrun job of `side`; its node memory once every rank has read its epoch."""
    store = _store(data["shards"]) if side == "ours" else None
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)  # the job builds it, as a first run on a node does
    ctl = Path(tempfile.mkdtemp(prefix=f"ranks-{side}-", dir=work))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.ranks}",
           str(Path(__file__).resolve()), "--role", side, "--ctl", str(ctl), "--shards", str(data["shards"]),
           "--yolo", str(data["yolo"]), "--names", json.dumps(data["names"]), "--imgsz", str(a.imgsz),
           "--batch", str(a.batch), "--workers", str(a.workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    log = open(work / f"ranks-{side}.log", "w")  # noqa: SIM115 - closed below, after the job ends
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        images = _wait_ready(proc, ctl, a.ranks, a.timeout)
        samples = []
        for _ in range(3):
            m = tree_memory(psutil.Process(proc.pid), store)
            m["store_file"] = dir_bytes(store)
            m["node"] = m["pss"] - m["pss_store"] + m["store_file"]
            samples.append(m)
            time.sleep(1.0)
        (ctl / "release").write_text("")
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"{side}: torchrun exited {proc.returncode}; see {work / f'ranks-{side}.log'}")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(ctl, ignore_errors=True)
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)  # this run built it: leave no RAM behind
    best = max(samples, key=lambda m: m["node"])
    return {"side": side, "ranks": a.ranks, "images_read": images, **best}


def _store(shards: Path) -> Path:
    from trainer.data.common import open_split
    from trainer.data.decoded_cache import store_dir

    return store_dir(open_split(shards, "train"), "ram")


def _wait_ready(proc: subprocess.Popen, ctl: Path, ranks: int, timeout: float) -> int:
    t0 = time.monotonic()
    while True:
        ready = list(ctl.glob("ready-*"))
        if len(ready) == ranks:
            return sum(int(p.read_text()) for p in ready)
        if proc.poll() is not None:
            raise RuntimeError(f"the torchrun job exited {proc.returncode} before every rank was ready")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"ranks not ready after {timeout:.0f} s")
        time.sleep(0.5)


def table(res: dict[str, Any]) -> str:
    mb = 2**20
    ref = next((r["node"] for r in res["sides"] if r["side"] == "ultralytics"), None)
    m = res["machine"]
    lines = [f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['ram_gb']} GB RAM, Python {m['python']}",
             f"{res['ranks']} ranks x {res['workers']} workers, {res['images']} images at {res['imgsz']} px, no aug",
             f"{'side':<13}{'processes':>10}{'PSS w/o store MB':>18}{'store MB':>10}{'node MB':>9}{'x ultralytics':>15}"]
    for r in res["sides"]:
        ratio = f"{r['node'] / ref:.2f}" if ref else "-"
        lines.append(f"{r['side']:<13}{r['processes']:>10}{(r['pss'] - r['pss_store']) / mb:>18.0f}"
                     f"{r['store_file'] / mb:>10.0f}{r['node'] / mb:>9.0f}{ratio:>15}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="data folder (kept and reused, as peers.py's); default: a temp dir")
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"))
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the ranks' epoch")
    ap.add_argument("--json", action="store_true")
    # the rank role (set by this script for torchrun)
    ap.add_argument("--role", choices=SIDES, help=argparse.SUPPRESS)
    for k in ("ctl", "shards", "yolo", "names"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if min(a.images, a.ranks, a.batch) < 1 or a.workers < 0:
        ap.error("--images, --ranks and --batch must be at least 1, --workers at least 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.role:
        return rank_main(a)
    from peers import machine, prepare

    own_tmp = a.work is None
    work = Path(tempfile.mkdtemp(prefix="ranks-bench-")) if own_tmp else Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from trainer.offline import setup_offline

    setup_offline()
    try:
        prep = argparse.Namespace(source=a.source, images=a.images, hires_images=0, imgsz=a.imgsz)
        data = prepare(prep, work, "x8", need_stream=False)
        sides = [run_side(a, s, data, work) for s in a.sides]
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    res = {"machine": machine(), "ranks": a.ranks, "workers": a.workers, "images": data["images"],
           "imgsz": a.imgsz, "sides": sides}
    print(json.dumps(res) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
