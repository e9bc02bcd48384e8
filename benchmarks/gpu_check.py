"""GPU check: the `gpu`-marked tests, then DALI (GPU decoding) and the torch loader feeding yolov8n at 640.

    .venv/bin/python benchmarks/gpu_check.py [--source COCO_FOLDER] [--steps 200] [--batch 32]
        [--workers N] [--no-tests] [--json]

Data: the COCO source (default ../shared/data/coco128, else the repo's samples/coco) copied by
symlinks to at least 1,024 images and packed as WebDataset at 640 (once, under out/gpu-check).
Training: yolov8n (random init), SGD, bf16 autocast where supported (fp16 + GradScaler otherwise),
channels-last, ultralytics' loss, train augmentation on. Per loader: one warm-up epoch's worth of
steps untimed, then `--steps` steps timed; img/s over the timed wall clock and data stall % = the
share of it the training loop spent waiting for the next batch (host time in ``next()``; the GPU
is synchronised only at the ends of the timed window, never per step). Prints one summary table;
about 3-5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare_data(source: Path, out: Path, min_images: int = 1024) -> Path:
    """`source` replicated (symlinks) to >= min_images and packed as wds at 640; reused when present."""
    import json as _json

    from loader import replicate_coco

    from packer.build import build_dataset

    shards = out / "wds640"
    if (shards / "manifest.json").is_file():
        return shards
    ann = next((source / "annotations").glob("instances_train*.json"))
    n = len(_json.loads(ann.read_text())["images"])
    k = max(1, -(-min_images // max(n, 1)))
    src = replicate_coco(source, out / f"src-x{k}", k)
    build_dataset(src, shards, fmt="wds", size=640, overwrite=True, progress=False, follow_symlinks=True)
    return shards


def train_throughput(shards: Path, loader: str, *, steps: int, batch: int, workers: int | None) -> dict:
    """img/s and data stall % of yolov8n training steps fed by `loader` (see the module doc)."""
    import torch

    from trainer.data import make_loader
    from trainer.model import attach_hyp, build_model

    dev = torch.device("cuda")
    ld = make_loader(shards, "train", loader=loader, imgsz=640, batch=batch, workers=workers, device=dev)
    model = build_model("yolov8n.yaml", list(ld.names)).to(dev).to(memory_format=torch.channels_last)
    attach_hyp(model, {"imgsz": 640, "batch": batch})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
    bf16 = torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=not bf16)
    warm, done, wait, epoch = len(ld), 0, 0.0, 0
    t0 = None
    while done < warm + steps:
        ld.set_epoch(epoch)
        it = iter(ld)
        while done < warm + steps:
            if done == warm:  # start of the timed window
                torch.cuda.synchronize()
                t0, wait = time.perf_counter(), 0.0
            tw = time.perf_counter()
            b = next(it, None)
            wait += time.perf_counter() - tw
            if b is None:
                break
            b["img"] = b["img"].float().div_(255)
            with torch.autocast("cuda", dtype=dtype):
                loss, _ = model.loss(b)
            scaler.scale(loss.sum()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            done += 1
        epoch += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kind = ld.kind
    ld.close()
    return {"loader": kind, "img_per_s": steps * batch / wall, "stall_pct": 100 * wait / wall, "steps": steps,
            "batch": batch, "amp": "bf16" if bf16 else "fp16"}


def run_tests() -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], cwd=ROOT,
                       capture_output=True, text=True)
    tail = (p.stdout.strip().splitlines() or [""])[-1]
    print(p.stdout[-4000:], p.stderr[-2000:], sep="\n", flush=True)
    return {"returncode": p.returncode, "summary": tail, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_src = ROOT.parent / "shared" / "data" / "coco128"
    ap.add_argument("--source", default=str(default_src if default_src.is_dir() else ROOT / "samples" / "coco"))
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu-check"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here", file=sys.stderr)
        return 2
    tests = None if a.no_tests else run_tests()
    shards = prepare_data(Path(a.source), Path(a.out))
    rows = [train_throughput(shards, ld, steps=a.steps, batch=a.batch, workers=a.workers) for ld in ("dali", "torch")]
    print(f"\ngpu-check on {torch.cuda.get_device_name(0)}: yolov8n, imgsz 640, batch {a.batch}, "
          f"{rows[0]['amp']}, {a.steps} timed steps, data {shards}")
    print(f"{'loader':<10} {'img/s':>8} {'data stall':>11}")
    for r in rows:
        print(f"{r['loader']:<10} {r['img_per_s']:>8.1f} {r['stall_pct']:>10.1f}%")
    if tests is not None:
        print(f"gpu tests: {tests['summary']} ({tests['seconds']:.0f} s)")
    if a.json:
        print(json.dumps({"tests": tests, "throughput": rows}))
    return 0 if tests is None or tests["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
