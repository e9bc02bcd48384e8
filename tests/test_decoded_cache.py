"""The node-shared decoded cache: same batches as decoding, one store for concurrent ranks,
stale and damaged stores rebuilt, requests that do not fit refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_util import make_records, pack

from packer.format import LabelArrays
from trainer.data import AugmentConfig, LoaderError, make_loader
from trainer.data.common import open_split
from trainer.data.decoded_cache import CacheError, _reserve, check_fits, open_cache, store_dir

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 160


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cache")
    return pack(base / "wds", "wds", {"train": make_records(16, "train", seed=7)}, {"train": [9, 7]})


def _by_key(ld) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for b in ld:
        for i, k in enumerate(b["keys"]):
            out[k] = (b["img"][i].clone(), b["bboxes"][b["batch_idx"] == i].clone())
    return out


def test_cached_batches_equal_decoded_ones(packed, tmp_path):
    kw = dict(loader="torch", imgsz=IMGSZ, batch=4, workers=2, device="cpu", augment=AugmentConfig.off(), seed=1)
    plain = _by_key(make_loader(packed, "train", fast_decode=False, **kw))
    ld = make_loader(packed, "train", cache="disk", cache_dir=tmp_path, **kw)
    cached = _by_key(ld)
    assert ld.reason == "asked for" and sorted(cached) == sorted(plain)
    for k, (img, boxes) in plain.items():
        assert torch.equal(cached[k][0], img), k  # exact decode either way: identical pixels
        assert torch.equal(cached[k][1], boxes), k
    assert len(list((tmp_path / "decoded").iterdir())) == 1


def test_auto_picks_torch_for_a_cache_and_dali_is_refused(packed, tmp_path):
    ld = make_loader(packed, "train", imgsz=IMGSZ, batch=4, device="cpu", cache="disk", cache_dir=tmp_path)
    assert ld.kind == "torch" and "cache" in ld.reason
    with pytest.raises(LoaderError, match="torch loader"):
        make_loader(packed, "train", loader="dali", imgsz=IMGSZ, batch=4, device="cpu", cache="disk",
                    cache_dir=tmp_path)


def test_stale_and_damaged_stores_are_rebuilt(packed, tmp_path):
    data = open_split(packed, "train")
    first = open_cache(data, "disk", tmp_path, processes=1)
    assert first.built and not open_cache(data, "disk", tmp_path).built  # reused as is
    ref = first.image(3).copy()
    meta_path = first.root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0] = "0" * 64  # as if the shards had been re-packed since
    meta_path.write_text(json.dumps(meta))
    again = open_cache(data, "disk", tmp_path)
    assert again.built and np.array_equal(again.image(3), ref)
    with open(again.path, "r+b") as f:  # cut short
        f.truncate(again.path.stat().st_size // 2)
    third = open_cache(data, "disk", tmp_path)
    assert third.built and np.array_equal(third.image(3), ref)
    meta_path.write_text("{not json")
    assert open_cache(data, "disk", tmp_path).built


def test_a_build_killed_with_sigkill_leaves_nothing_behind_the_next_build(packed, tmp_path):
    """SIGKILL (the OOM killer filling /dev/shm) skips the builder's cleanup: its full-size temp store is
    removed by the next build, and counts as free space meanwhile."""
    code = ("import os, signal, sys; import trainer.data.decoded_cache as dc; from trainer.data.common import "
            "open_split; dc._decode_chunk = lambda span: os.kill(os.getpid(), signal.SIGKILL); "
            f"dc.open_cache(open_split({str(packed)!r}, 'train'), 'disk', {str(tmp_path)!r}, processes=1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    (root,) = (tmp_path / "decoded").iterdir()
    (dead,) = root.glob("store.u8.tmp-*")
    assert dead.stat().st_size > 0
    cache = open_cache(open_split(packed, "train"), "disk", tmp_path, processes=1)
    assert cache.built and sorted(p.name for p in root.iterdir()) == ["lock", "meta.json", "store.u8"]


def test_a_stop_signal_ends_a_build_under_the_trainers_stop_flag(packed, tmp_path):
    """The trainer's SIGTERM/Ctrl-C handler only sets a flag read at its first step: a build (minutes on a
    big split) used to run on to its end. Here the build itself gets SIGTERM and would then sleep 60 s."""
    code = ("import os, signal, sys, time; import trainer.data.decoded_cache as dc; from trainer.runtime import "
            "StopFlag; from trainer.data.common import open_split\n"
            "dc._decode_chunk = lambda span: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(60))\n"
            "with StopFlag():\n"
            "    try:\n"
            f"        dc.open_cache(open_split({str(packed)!r}, 'train'), 'disk', {str(tmp_path)!r}, processes=1)\n"
            "    except KeyboardInterrupt:\n"
            "        sys.exit(130)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == 130, r.stderr[-2000:]
    (root,) = (tmp_path / "decoded").iterdir()
    assert not list(root.glob("store.u8*")) and not (root / "meta.json").exists()  # temp store removed


def test_a_full_file_system_is_one_line_before_any_decoding(small_disk):
    """The temp store is allocated up front: a sparse one let workers die of SIGBUS at the first page
    without room, and the build waited for them forever."""
    with pytest.raises(CacheError, match="could not reserve .*No space left"):
        _reserve(small_disk / "store.u8.tmp-1", 10 << 20)
    assert not list(small_disk.iterdir())


def test_too_large_is_refused_with_one_line(packed, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(packed, big)
    labels = big / "train" / "labels.npz"
    la = LabelArrays.load(labels)
    la.hw[:] = (60000, 60000)  # 10 GB per image claimed by the label arrays: 16 of them fit nowhere here
    la.save(labels)
    for kind in ("ram", "disk"):
        with pytest.raises(LoaderError) as e:
            make_loader(big, "train", imgsz=IMGSZ, batch=4, device="cpu", cache=kind, cache_dir=tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and "GiB" in msg and "needs" in msg
        assert not store_dir(open_split(big, "train"), kind, tmp_path).exists()  # nothing written
    with pytest.raises(CacheError, match="margin"):
        check_fits(10 << 30, 10 << 30, "disk", tmp_path)
    check_fits(1 << 30, 10 << 30, "disk", tmp_path)


WORKER = r"""
import json, sys
import torch.distributed as dist
from trainer.data import make_loader, AugmentConfig

out, root = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ld = make_loader(root, "train", loader="torch", imgsz=64, batch=2, rank=rank, world_size=world, workers=1,
                 device="cpu", cache="ram", augment=AugmentConfig(mosaic=0.5))
steps = sum(1 for _ in ld)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"built": ld.dataset.cache.built, "store": str(ld.dataset.cache.path), "steps": steps}, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_at_once_build_one_store(packed, tmp_path):
    shm = store_dir(open_split(packed, "train"), "ram")
    shutil.rmtree(shm, ignore_errors=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), str(packed)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun timed out")
    try:
        assert proc.returncode == 0, err[-3000:]
        r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
        assert sorted(x["built"] for x in r) == [False, True]  # one built, the other waited and mapped it
        assert r[0]["store"] == r[1]["store"] and r[0]["steps"] == r[1]["steps"] == 4
        assert sorted(p.name for p in shm.iterdir()) == ["lock", "meta.json", "store.u8"]
    finally:
        shutil.rmtree(shm, ignore_errors=True)
