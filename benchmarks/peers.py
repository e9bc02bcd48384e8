"""Our loader against its peers, epoch by epoch in one process, as same-round ratios.

    .venv/bin/python benchmarks/peers.py [--work DIR] [--rounds 5] [--images 1024] [--hires-images 512]
        [--sets x8 hires] [--cases noaug aug] [--peers ...] [--imgsz 640] [--batch 16] [--workers 2] [--json]

Loaders (all fed coco128 images through cv2 decode + letterbox to imgsz, batch 16, 2 workers):
  ours / ours-ram        trainer.data.make_loader (torch loader) over our wds shards; -ram: cache="ram"
  ultralytics / -ram     YOLODataset + build_dataloader on the raw YOLO folder; -ram: cache="ram"
  streaming              MosaicML Streaming: MDSWriter + StreamingDataset (local) + DataLoader
  litdata                LitData: optimize + StreamingDataset + StreamingDataLoader (local)
  webdataset             plain webdataset over our tars (shuffle 256, batched in the workers)
  decode                 the ceiling: cv2.imdecode of the same packed JPEGs on `--workers` processes
The three streaming libraries get our packed JPEGs (same bytes as ours) and one shared
decode + letterbox + collate; they have no mosaic, so they run in the no-aug case only, and
only on the x8 set (on hires they would read the same 640-px packed JPEGs again).

Sets (made under --work, reused when present): x8 = coco128 x8 (1,024 symlinked images);
hires = coco128 upscaled to a 3000-px long side (JPEG q92, labels unchanged), ultralytics
reading the raw 3000-px files, ours the same images packed at imgsz; x1 = coco128 itself.
Cases: noaug (letterbox only) and aug (ultralytics' default training augmentation, mosaic
included, on both sides).

Method: all loaders of a set and case are built in one process, each runs one untimed
warm-up epoch, then `--rounds` rounds of one epoch each, the order rotated every round. An
epoch's time runs from its first request to its last batch or, if later, to the moment the
loader's own worker processes go idle (ultralytics' InfiniteDataLoader keeps preparing the
next epoch's batches after the last one: that work is counted where it is done). img/s is
the median over rounds; ratios are medians of same-round ratios. Peak RSS of a loader's
process tree = main-process RSS before any loader was built + what the main process grew
while building and running this loader + the RSS of its worker processes (sampled every
50 ms; RSS counts pages shared with the parent in every worker, as `top` does).
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

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _peers_data as pl  # noqa: E402

SETS = ("x8", "hires", "x1")
CASES = ("noaug", "aug")
STREAM_PEERS = ("streaming", "litdata", "webdataset")
PEERS = ("ours", "ours-ram", "ultralytics", "ultralytics-ram", *STREAM_PEERS, "decode")
HIRES_LONG_SIDE = 3000


class UsageError(Exception):
    """Bad command line (exit 2)."""


# ----------------------------------------------------------------------------- data


def prepare(a: argparse.Namespace, work: Path, set_name: str, need_stream: bool) -> dict[str, Any]:
    """Folders of one set: the raw YOLO folder, our packed shards and, if asked, the peers' copies."""
    coco = Path(a.source).resolve()
    ann = coco / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{coco}: no annotations/instances_train2017.json (coco128 in COCO layout)")
    originals = sorted((coco / "train2017").glob("*.jpg"))
    labels = pl.coco_labels(coco, work)
    names = pl.class_names(ann)
    if set_name == "hires":
        n = a.hires_images
        images = pl.upscaled_images(originals[:n], work, HIRES_LONG_SIDE)
    else:
        images, n = originals, (a.images if set_name == "x8" else len(originals))
    yolo = pl.yolo_set(f"{set_name}-{n}", images, labels, n, names, work)
    shards = pl.packed_set(yolo, a.imgsz, work)
    d = {"set": set_name, "images": n, "yolo": yolo, "shards": shards, "names": names,
         "members": pl.packed_members(shards)}
    if need_stream:
        d["mds"] = pl.write_mds(d["members"], work, f"{yolo.name}-wds{a.imgsz}-mds")
        d["litdata"] = pl.write_litdata(d["members"], work, f"{yolo.name}-wds{a.imgsz}-litdata")
    return d


# ----------------------------------------------------------------------------- measuring


class Monitor:
    """Samples the active loader's process-tree RSS every 50 ms (a thread) and tells when its
    worker processes go idle. Child processes belong to the loader active when first seen."""

    POLL_S, BUSY_CPU_S, QUIET_S, MAX_WAIT_S = 0.05, 0.02, 0.25, 120.0

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

    def reset_base(self) -> None:
        """Main-process RSS before a group's loaders are built: every loader's starting point."""
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

    def _cpu(self, name: str) -> dict[psutil.Process, float]:
        out = {}
        with self._lock:
            for k in self._kids(name):
                try:
                    t = k.cpu_times()
                    out[k] = t.user + t.system
                except psutil.Error:
                    pass
        return out

    def wait_idle(self, name: str, t_last: float) -> float:
        """When `name`'s workers last did work (>= t_last), after they stay quiet for QUIET_S."""
        prev, last_busy = self._cpu(name), t_last
        while True:
            time.sleep(self.POLL_S)
            now, cur = time.perf_counter(), self._cpu(name)
            if sum(c - prev.get(k, 0.0) for k, c in cur.items()) >= self.BUSY_CPU_S:
                last_busy = now
            elif now - last_busy >= self.QUIET_S or now - t_last > self.MAX_WAIT_S:
                return last_busy
            prev = cur

    def sample_pss(self, name: str) -> None:
        """Record the PSS of `name`'s tree now (main process + its workers; ~30 ms a process, so
        taken once per epoch, outside the timed region): shared pages counted once, not per process."""
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
        self._thread.join()


def timed_epoch(name: str, runner: pl.Loop, mon: Monitor, epoch: int) -> tuple[int, float]:
    """(images, seconds) of one epoch, the loader's trailing background work included."""
    mon.activate(name)
    try:
        t0 = time.perf_counter()
        n = runner.epoch(epoch)
        t_last = time.perf_counter()
        t_end = mon.wait_idle(name, t_last)
        mon.sample_pss(name)
    finally:
        mon.deactivate()
    return n, t_end - t0


def measure(runners: dict[str, pl.Loop], mon: Monitor, rounds: int) -> tuple[dict, dict]:
    """img/s and images per loader per round: one warm-up epoch each, then rounds in rotated order."""
    names = list(runners)
    for name in names:
        timed_epoch(name, runners[name], mon, 0)
    ips: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, list[int]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            n, dt = timed_epoch(name, runners[name], mon, k + 1)
            ips[name].append(n / dt)
            counts[name].append(n)
    return ips, counts


def summarize(ips: dict[str, list[float]], counts: dict[str, list[int]],
              mem: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Median img/s and medians of same-round ratios to ultralytics and to the decode ceiling."""

    def ratio(name: str, ref: str) -> float | None:
        if ref not in ips:
            return None
        return statistics.median(x / y for x, y in zip(ips[name], ips[ref], strict=True))

    return {name: {"img_per_s": statistics.median(v), "rounds": v, "images_per_epoch": counts[name],
                   "x_ultralytics": ratio(name, "ultralytics"), "x_decode": ratio(name, "decode"),
                   "peak_rss_mb": mem.get(name, (0, 0))[0] / 2**20, "pss_mb": mem.get(name, (0, 0))[1] / 2**20}
            for name, v in ips.items()}


def run_group(a: argparse.Namespace, data: dict[str, Any], case: str, peers: list[str],
              mon: Monitor) -> dict[str, Any]:
    """Build the loaders of one (set, case), measure them interleaved, close them."""
    cfg = pl.Config(imgsz=a.imgsz, batch=a.batch, workers=a.workers, augment=case == "aug", seed=0)
    mon.reset_base()
    runners: dict[str, pl.Loop] = {}
    try:
        for name in peers:
            mon.activate(name)
            try:
                runners[name] = pl.RUNNERS[name](name, data, cfg)
            finally:
                mon.deactivate(built=True)
        ips, counts = measure(runners, mon, a.rounds)
    finally:
        for r in runners.values():
            r.close()
    return {"set": data["set"], "images": data["images"], "case": case,
            "loaders": summarize(ips, counts, mon.peaks())}


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"cpu": cpu, "cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "versions": pl.versions()}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['cpus']} CPUs, {m['ram_gb']} GiB, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"imgsz {res['imgsz']}, batch {res['batch']}, {res['workers']} workers, {res['rounds']} rounds "
             "(medians; ratios are medians of same-round ratios)", "",
             f"| {'set':<11} | {'case':<5} | {'loader':<15} | {'img/s':>7} | {'x ultralytics':>13} | "
             f"{'x decode':>8} | {'peak RSS MB':>11} | {'PSS MB':>6} |",
             f"|{'-' * 13}|{'-' * 7}|{'-' * 17}|{'-' * 9}|{'-' * 15}|{'-' * 10}|{'-' * 13}|{'-' * 8}|"]
    for g in res["groups"]:
        for name, v in g["loaders"].items():
            lines.append(f"| {g['set'] + ' ' + str(g['images']):<11} | {g['case']:<5} | {name:<15} | "
                         f"{v['img_per_s']:>7.1f} | {fmt(v['x_ultralytics'], '>12.2f') + 'x':>13} | "
                         f"{fmt(v['x_decode'], '>8.2f'):>8} | {v['peak_rss_mb']:>11.0f} | {v['pss_mb']:>6.0f} |")
            if any(c != g["images"] for c in v["images_per_epoch"]):
                res["notes"].append(f"{name} on {g['set']}/{g['case']} gave {v['images_per_epoch']} images "
                                    f"per epoch, not {g['images']}")
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"),
                    help="coco128 in COCO layout (annotations/instances_train2017.json + train2017/)")
    ap.add_argument("--work", default=None, help="data folder (kept and reused); default: a temp dir, removed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=1024, help="images in the x8 set (symlinked coco128 copies)")
    ap.add_argument("--hires-images", type=int, default=512, help="images in the hires set")
    ap.add_argument("--sets", nargs="+", default=["x8", "hires"], choices=SETS)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    for k in ("rounds", "images", "hires_images", "batch", "workers"):
        if getattr(a, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1")
    if a.imgsz < 32 or a.imgsz % 32:
        raise UsageError("--imgsz must be a positive multiple of 32")
    if a.work is not None:
        w = Path(a.work).resolve()
        if w == ROOT or ROOT in w.parents:
            raise UsageError(f"--work {a.work} is inside the repository: pick a folder outside it")
    return a


def group_peers(a: argparse.Namespace, set_name: str, case: str, skips: dict[str, list[str]]) -> list[str]:
    """The loaders that run for one (set, case); each one left out is added to skips[why]."""
    out = []
    for p in a.peers:
        why = pl.unavailable(p)
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
                    print(f"[peers] {s} ({data['images']} images) {c}: {', '.join(peers)}", file=sys.stderr,
                          flush=True)
                    groups.append(run_group(a, data, c, peers, mon))
    finally:
        mon.stop()
    return {"machine": machine(), "imgsz": a.imgsz, "batch": a.batch, "workers": a.workers, "rounds": a.rounds,
            "groups": groups, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    own_tmp = a.work is None
    work = Path(tempfile.mkdtemp(prefix="peers-bench-")) if own_tmp else Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from trainer.offline import setup_offline

    setup_offline()  # before anything imports ultralytics
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the libraries' chatter; stdout gets the table/JSON
            res = run(a, work)
    except (FileNotFoundError, pl.PeerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, default=float) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
