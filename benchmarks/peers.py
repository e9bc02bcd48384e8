"""Our loader against its peers, epoch by epoch in one process, as same-round ratios.

    .venv/bin/python benchmarks/peers.py [--work DIR] [--rounds 5] [--images 1024] [--hires-images 512]
        [--sets x8 hires x1] [--cases noaug aug] [--peers ...] [--imgsz 640] [--batch 16] [--workers 2] [--json]

Loaders (coco128 images, cv2 decode + letterbox to imgsz, batch 16, 2 workers each):
  ours / ours-ram        trainer.data.make_loader (torch loader) over our wds shards; -ram: cache="ram"
  ultralytics / -ram     YOLODataset + build_dataloader on the raw YOLO folder; -ram: cache="ram"
  streaming              MosaicML Streaming: MDSWriter + StreamingDataset (local) + DataLoader
  litdata                LitData: optimize + StreamingDataset + StreamingDataLoader (local)
  webdataset             plain webdataset over our tars (shuffle 256, batched in the workers)
  decode                 the ceiling: cv2.imdecode of the same packed JPEGs on `--workers` processes
The streaming libraries read our packed JPEGs (the same bytes as ours) through one shared
decode + letterbox + collate; having no mosaic, they run without augmentation, on x8 and x1.

Sets (made under --work, reused): x8 = coco128 x8 (--images, symlinks); hires = coco128
upscaled to a 3000-px long side (JPEG q92, labels unchanged; ultralytics reads these files,
ours the same packed at imgsz); x1 = coco128 (epochs of 128). Cases: noaug (letterbox only),
aug (ultralytics' default training augmentation, mosaic included, on both sides).

Method: a set and case's loaders are all built in this process; each runs one untimed warm-up
epoch, then --rounds rounds of one epoch each, the order rotated every round. An epoch lasts
from its first request to its last batch or, if later, until the loader's own worker
processes go idle (ultralytics' InfiniteDataLoader goes on preparing the next epoch after the
last batch: that work counts where it is done). img/s: median over rounds; ratios: medians
of same-round ratios. --json adds build and warm-up-epoch times and tail_s (work after the last batch).
Peak RSS = main-process RSS before the group's loaders were built + the main process's growth
while this loader was built or ran + its workers' RSS (sampled every 50 ms; every forked
worker's RSS counts the pages it shares with the parent). PSS (largest at an epoch's end, out
of the timed region) counts shared pages once: the physical memory of the tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _peers_data as pdata
import psutil

ROOT = Path(__file__).resolve().parents[1]

SETS = ("x8", "hires", "x1")
CASES = ("noaug", "aug")
STREAM_PEERS = ("streaming", "litdata", "webdataset")
PEERS = ("ours", "ours-ram", "ultralytics", "ultralytics-ram", *STREAM_PEERS, "decode")


def prepare(a: argparse.Namespace, work: Path, set_name: str, need_stream: bool) -> dict[str, Any]:
    """Folders of one set: the raw YOLO folder, our packed shards and, if asked, the peers' copies."""
    coco = Path(a.source).resolve()
    ann = coco / "annotations" / "instances_train2017.json"
    originals = sorted((coco / "train2017").glob("*.jpg"))
    if not ann.is_file() or not originals:
        raise FileNotFoundError(f"{coco}: want coco128 in COCO layout (annotations/instances_train2017.json, "
                                "train2017/*.jpg)")
    labels = pdata.coco_labels(coco, work)
    names = pdata.class_names(ann)
    if set_name == "hires":
        n = a.hires_images
        images = pdata.upscaled_images(originals[:n], work, long_side=3000)
    else:
        images, n = originals, (a.images if set_name == "x8" else len(originals))
    yolo = pdata.yolo_set(f"{set_name}-{n}", images, labels, n, names, work)
    shards = pdata.packed_set(yolo, a.imgsz, work)
    d = {"set": set_name, "images": n, "yolo": yolo, "shards": shards, "names": names,
         "members": pdata.packed_members(shards)}
    if need_stream:
        d["mds"] = pdata.write_mds(d["members"], work, f"{pdata.packed_name(yolo, a.imgsz)}-mds")
        d["litdata"] = pdata.write_litdata(d["members"], work, f"{pdata.packed_name(yolo, a.imgsz)}-litdata")
    return d


class Monitor:
    """Samples the active loader's process-tree RSS every 50 ms (a thread) and tells when its
    worker processes go idle. Child processes belong to the loader active when first seen."""

    POLL_S, BUSY_CPU_S, QUIET_S, MAX_WAIT_S = 0.05, 0.01, 0.25, 120.0

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.owner: dict[psutil.Process, str] = {}
        self.active: str | None = None
        self._peak: dict[str, int] = {}
        self._pss: dict[str, int] = {}
        self._extra: dict[str, int] = {}  # main-process growth while each loader was built
        self._base = self._main0 = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            with self._lock:
                self._sample()

    def _kids(self, name: str) -> list[psutil.Process]:
        """`name`'s live child processes; unseen children go to the active loader."""
        try:
            kids = self.me.children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self.owner.setdefault(k, self.active or "-")
        return [k for k in kids if self.owner[k] == name]

    def _sample(self) -> None:
        if self.active is None:
            return
        rss = self.me.memory_info().rss
        total = self._base + self._extra.get(self.active, 0) + max(0, rss - self._main0)
        for k in self._kids(self.active):
            with contextlib.suppress(psutil.Error):
                total += k.memory_info().rss
        self._peak[self.active] = max(self._peak.get(self.active, 0), total)

    def reset_base(self) -> None:  # main-process RSS before a group's loaders are built
        self._base = self.me.memory_info().rss

    def activate(self, name: str) -> None:
        with self._lock:
            self.active, self._main0 = name, self.me.memory_info().rss
            self._sample()

    def deactivate(self, built: bool = False) -> None:
        with self._lock:
            self._sample()
            if built and self.active is not None:
                self._extra[self.active] = max(0, self.me.memory_info().rss - self._main0)
            self.active = None

    def _cpu(self, name: str) -> tuple[dict[psutil.Process, float], bool]:
        """CPU seconds of each of `name`'s workers, and whether one is running or waiting for a core."""
        out, running = {}, False
        with self._lock:
            for k in self._kids(name):
                with contextlib.suppress(psutil.Error):
                    out[k] = sum(k.cpu_times()[:2])  # user + system
                    running |= k.status() in (psutil.STATUS_RUNNING, psutil.STATUS_DISK_SLEEP)
        return out, running

    def wait_idle(self, name: str, t_last: float) -> float:
        """When `name`'s workers last did work (>= t_last), after they stay quiet for QUIET_S. Busy:
        a worker is runnable (on a loaded machine it may get little CPU) or used >= BUSY_CPU_S."""
        (prev, _), last_busy = self._cpu(name), t_last
        while True:
            time.sleep(self.POLL_S)
            now, (cur, running) = time.perf_counter(), self._cpu(name)
            if running or sum(c - prev.get(k, 0.0) for k, c in cur.items()) >= self.BUSY_CPU_S:
                last_busy = now
            elif now - last_busy >= self.QUIET_S or now - t_last > self.MAX_WAIT_S:
                return last_busy
            prev = cur

    def sample_pss(self, name: str) -> None:
        """Record the PSS of `name`'s tree (main + workers) now: ~30 ms a process, so once an epoch."""
        with self._lock:
            procs = [self.me, *self._kids(name)]
        total = 0
        for p in procs:
            with contextlib.suppress(OSError, ValueError, StopIteration), open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) * 1024
        self._pss[name] = max(self._pss.get(name, 0), total)

    def peaks(self) -> dict[str, tuple[int, int]]:
        """(peak RSS, largest end-of-epoch PSS) per loader of the group; resets for the next group."""
        out = {k: (v, self._pss.get(k, 0)) for k, v in self._peak.items()}
        self._peak, self._pss, self._extra = {}, {}, {}
        return out

    def stop(self) -> None:
        self._stop.set()


def timed_epoch(name: str, runner: pdata.Loop, mon: Monitor, epoch: int) -> tuple[int, float, float]:
    """(images, seconds, of which after the last batch) of one epoch, trailing background work included."""
    mon.activate(name)
    try:
        t0 = time.perf_counter()
        try:
            n = runner.epoch(epoch)
        except Exception as e:  # a peer library failing on our data: one line, exit 1
            raise pdata.PeerError(f"{name} failed in epoch {epoch}: {type(e).__name__}: {str(e)[:160]}") from e
        t_last = time.perf_counter()
        t_end = mon.wait_idle(name, t_last)
        mon.sample_pss(name)
    finally:
        mon.deactivate()
    return n, t_end - t0, t_end - t_last


def measure(runners: dict[str, pdata.Loop], mon: Monitor, rounds: int) -> dict[str, dict[str, list]]:
    """Per loader: its warm-up epoch's seconds, then img/s and images of each round (rotated order)."""
    names = list(runners)
    out: dict[str, dict[str, list]] = {name: {"warmup_s": [], "ips": [], "images": [], "tail_s": []} for name in names}
    for name in names:
        out[name]["warmup_s"].append(timed_epoch(name, runners[name], mon, 0)[1])
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            n, dt, tail = timed_epoch(name, runners[name], mon, k + 1)
            out[name]["ips"].append(n / dt)
            out[name]["tail_s"].append(tail)
            out[name]["images"].append(n)
    return out


def summarize(m: dict[str, dict[str, list]], build_s: dict[str, float],
              mem: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Median img/s and medians of same-round ratios to ultralytics and to the decode ceiling."""

    def ratio(name: str, ref: str) -> float | None:
        if ref not in m:
            return None
        return statistics.median(x / y for x, y in zip(m[name]["ips"], m[ref]["ips"], strict=True))

    return {name: {"img_per_s": statistics.median(v["ips"]), "rounds": v["ips"], "images_per_epoch": v["images"],
                   "x_ultralytics": ratio(name, "ultralytics"), "x_decode": ratio(name, "decode"),
                   "peak_rss_mb": mem.get(name, (0, 0))[0] / 2**20, "pss_mb": mem.get(name, (0, 0))[1] / 2**20,
                   "build_s": build_s[name], "warmup_epoch_s": v["warmup_s"][0], "tail_s": v["tail_s"]}
            for name, v in m.items()}


def run_group(a: argparse.Namespace, data: dict[str, Any], case: str, peers: list[str], mon: Monitor,
              notes: list[str]) -> dict[str, Any]:
    """Build the loaders of one (set, case), measure them interleaved, close them. A loader
    that cannot be built is left out with a note; one that fails mid-run stops the run."""
    cfg = pdata.Config(imgsz=a.imgsz, batch=a.batch, workers=a.workers, augment=case == "aug", seed=0)
    where = f"{data['set']}/{case}"
    mon.reset_base()
    runners: dict[str, pdata.Loop] = {}
    build_s: dict[str, float] = {}
    try:
        for name in peers:
            mon.activate(name)
            t0 = time.perf_counter()
            try:
                runners[name] = pdata.RUNNERS[name](name, data, cfg)
                build_s[name] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a peer library's own failure: report it, go on
                notes.append(f"{name} could not be built on {where}: {type(e).__name__}: {str(e)[:120]}")
            finally:
                mon.deactivate(built=True)
        m = measure(runners, mon, a.rounds)
    finally:
        for r in runners.values():
            r.close()
    loaders = summarize(m, build_s, mon.peaks())
    notes += [f"{name} on {where} gave {v['images_per_epoch']} images per epoch, not {data['images']}"
              for name, v in loaders.items() if any(c != data["images"] for c in v["images_per_epoch"])]
    return {"set": data["set"], "images": data["images"], "case": case, "loaders": loaders}


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"cpu": cpu, "cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "versions": pdata.versions()}


COLUMNS = (("set", 11), ("case", 5), ("loader", 15), ("img/s", 7), ("x ultralytics", 13), ("x decode", 8),
           ("peak RSS MB", 11), ("PSS MB", 6))


def table(res: dict[str, Any]) -> str:
    """The machine, the settings, one markdown row per (set, case, loader), then the notes."""
    m = res["machine"]

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, (_, w)) in
                                 enumerate(zip(cells, COLUMNS, strict=True))) + " |"

    lines = [f"{m['cpu']}, {m['cpus']} CPUs, {m['ram_gb']} GiB, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"imgsz {res['imgsz']}, batch {res['batch']}, {res['workers']} workers, {res['rounds']} rounds "
             "(medians; ratios are medians of same-round ratios)", "",
             row([c for c, _ in COLUMNS]), "|" + "|".join("-" * (w + 2) for _, w in COLUMNS) + "|"]
    for g in res["groups"]:
        for name, v in g["loaders"].items():
            xu, xd = v["x_ultralytics"], v["x_decode"]
            lines.append(row([f"{g['set']} {g['images']}", g["case"], name, f"{v['img_per_s']:.1f}",
                              "" if xu is None else f"{xu:.2f}x", "" if xd is None else f"{xd:.2f}",
                              f"{v['peak_rss_mb']:.0f}", f"{v['pss_mb']:.0f}"]))
    return "\n".join(lines + [f"note: {n}" for n in res["notes"]])


# ----------------------------------------------------------------------------- entry point


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"),
                    help="coco128 in COCO layout (annotations/instances_train2017.json + train2017/)")
    ap.add_argument("--work", default=None, help="data folder (kept and reused); default: a temp dir, removed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=1024, help="images in the x8 set (symlinked coco128 copies)")
    ap.add_argument("--hires-images", type=int, default=512, help="images in the hires set")
    ap.add_argument("--sets", nargs="+", default=["x8", "hires"], choices=SETS, metavar="SET",
                    help=f"of {', '.join(SETS)} (default: x8 hires)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE",
                    help=f"of {', '.join(CASES)} (default: both)")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, metavar="LOADER",
                    help=f"of {', '.join(PEERS)} (default: all)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    for k in ("rounds", "images", "hires_images", "batch", "workers"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")  # exits 2
    if a.imgsz < 32 or a.imgsz % 32:
        ap.error("--imgsz must be a positive multiple of 32")
    if a.work is not None and (Path(a.work).resolve() == ROOT or ROOT in Path(a.work).resolve().parents):
        ap.error(f"--work {a.work} is inside the repository: pick a folder outside it")
    return a


def group_peers(a: argparse.Namespace, set_name: str, case: str, skips: dict[str, list[str]]) -> list[str]:
    """The loaders that run for one (set, case); each one left out is added to skips[why]."""
    out = []
    for p in a.peers:
        why = pdata.unavailable(p)
        if not why and p in STREAM_PEERS and (case == "aug" or set_name == "hires"):
            why = ("no-aug on x8/x1 only: no mosaic in these libraries, and on hires they would read the same "
                   "640-px packed JPEGs as on x8")
        if why and p not in skips.setdefault(why, []):
            skips[why].append(p)
        elif not why:
            out.append(p)
    return out


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    skips: dict[str, list[str]] = {}
    plan = [(s, c, group_peers(a, s, c, skips)) for s in a.sets for c in a.cases]
    notes = [f"{', '.join(peers)} skipped: {why}" for why, peers in skips.items()]
    mon = Monitor()
    groups = []
    try:
        for s in a.sets:
            need_stream = any(set(p) & set(STREAM_PEERS) for ss, _, p in plan if ss == s)
            data = prepare(a, work, s, need_stream)
            for ss, c, peers in plan:
                if ss == s and peers:
                    t0 = time.perf_counter()
                    groups.append(run_group(a, data, c, peers, mon, notes))
                    print(f"[peers] {s} ({data['images']} images) {c}: {', '.join(peers)}: "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        mon.stop()
    return {"machine": machine(), "imgsz": a.imgsz, "batch": a.batch, "workers": a.workers, "rounds": a.rounds,
            "groups": groups, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    own_tmp = a.work is None
    work = Path(tempfile.mkdtemp(prefix="peers-bench-")) if own_tmp else Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from trainer.offline import setup_offline

    setup_offline()  # before anything imports ultralytics
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the libraries' chatter; stdout gets the table/JSON
            res = run(a, work)
    except (FileNotFoundError, pdata.PeerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, default=float) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
