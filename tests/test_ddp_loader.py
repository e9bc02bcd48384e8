"""A real `torchrun --nproc_per_node=2` (gloo, CPU): both ranks step the same number of times.

Every step does an all_reduce, as DDP's backward does: if one rank had a batch more than the
other, the run would hang (caught by the timeout) instead of finishing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _data_util import make_records, pack

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from trainer.data import make_loader, AugmentConfig

out, cases = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = {}
for name, (root, loader, train, *cache) in cases.items():
    kw = {"cache": "disk", "cache_dir": cache[0]} if cache else {}
    ld = make_loader(root, "train" if train else "val", loader=loader, imgsz=64, batch=4, train=train, rank=rank,
                     world_size=world, workers=1, device="cpu", seed=11,
                     augment=AugmentConfig(mosaic=0.5) if train else None, **kw)
    steps, keys = 0, []
    for epoch in range(2):
        ld.set_epoch(epoch)
        for b in ld:
            t = torch.ones(1)
            dist.all_reduce(t)  # a collective per step, like DDP's gradient all-reduce
            steps += 1
            keys.append([k for k, v in zip(b["keys"], b["valid"].tolist()) if v])
    result[name] = {"len": len(ld), "steps": steps, "keys": keys}
    ld.close()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_step_equally(tmp_path):
    # 22 train samples in uneven shards -> 11 per rank -> 2 batches of 4 each (remainder dropped);
    # 9 val samples -> ranks of 5 and 4 -> 2 batches each, the short rank padded (valid=False)
    recs = {"train": make_records(22, "train", seed=4), "val": make_records(9, "val", seed=5)}
    sizes = {"train": [9, 2, 6, 5], "val": [5, 3, 1]}
    data = {fmt: str(pack(tmp_path / fmt, fmt, recs, sizes)) for fmt in ("tfrecord", "wds", "lmdb")}
    cases = {
        "torch-wds-train": (data["wds"], "torch", True),
        "torch-wds-train-cache": (data["wds"], "torch", True, str(tmp_path / "decoded-cache")),
        "torch-tfrecord-cache-val": (data["tfrecord"], "torch", False, str(tmp_path / "decoded-cache")),
        "torch-lmdb-val": (data["lmdb"], "torch", False),
        "dali-tfrecord-train": (data["tfrecord"], "dali", True),
        "dali-tfrecord-val": (data["tfrecord"], "dali", False),
    }
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path), json.dumps(cases)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        pytest.fail("torchrun timed out: the ranks did not step the same number of times (hang)")
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in cases:
        a, b = r0[name], r1[name]
        assert a["len"] == b["len"] == 2, name
        assert a["steps"] == b["steps"] == 2 * a["len"], name
        for epoch in range(2):
            ka = [k for batch in a["keys"][epoch * 2 : epoch * 2 + 2] for k in batch]
            kb = [k for batch in b["keys"][epoch * 2 : epoch * 2 + 2] for k in batch]
            assert not set(ka) & set(kb), f"{name}: ranks overlap in epoch {epoch}"
            if name.endswith("val"):  # every sample exactly once over both ranks
                assert sorted(ka + kb) == sorted(r.key for r in recs["val"]), name
            else:
                assert len(ka) == len(kb) == 8, name
