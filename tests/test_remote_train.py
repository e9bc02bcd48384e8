"""Training from network storage: a real S3 server (moto) and a real HTTP file server on 127.0.0.1.

The WebDataset (torch) loader streams tar shards; DALI and the torch loader over tfrecord fetch
each rank's own shard files into the shard cache first. Secrets never reach logs or outputs.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from packer.build import build_dataset
from packer.format import INDEX_SUFFIX, read_manifest
from packer.storage.push import push
from tests import _servers
from tests._servers import _RangeHandler, _serving, _wait_ready, http_files
from trainer.data import DataError, make_loader
from trainer.data.shard_cache import url_key
from trainer.data.split import batches_per_rank, epoch_shards, rank_segments
from trainer.engine import TrainConfig, TrainError, train

s3_server = _servers.s3_server  # fixtures: a moto S3 server for the module, its credentials in the env
s3_env = _servers.s3_env

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "coco"  # 12 train + 4 val images
SECRET = "S3CRET-marker-do-not-leak-41c9"


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """samples/coco at 160 px as wds and tfrecord, 5 samples per shard (train: 3 shards)."""
    root = tmp_path_factory.mktemp("remote-train")
    out = {}
    for fmt in ("wds", "tfrecord", "lmdb"):
        build_dataset(SAMPLE, root / fmt, fmt=fmt, size=160, shard_size=5, workers=1)
        out[fmt] = root / fmt
    return out


@pytest.fixture(scope="module")
def http_root(packs) -> str:
    with http_files(packs["wds"].parent) as base:
        yield base


@pytest.fixture(scope="module")
def s3_data(packs, s3_server) -> dict[str, str]:
    bucket = s3_server.make_bucket("train-data")
    urls = {}
    for fmt in ("wds", "tfrecord"):
        local = packs[fmt]
        urls[fmt] = f"{bucket}/coco/{fmt}"
        push(local, urls[fmt], storage_options=s3_server.options())
    return urls


def _cfg(shards: str, out: Path, loader: str, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(shards=shards, model="yolov8n.yaml", epochs=1, batch=4, imgsz=128, device="cpu", loader=loader,
                       workers=1, out=str(out), cache_dir=str(cache), **kw)


def _cached(cache: Path) -> set[str]:
    """Shard files (not index files) in the cache, relative to the dataset's cache folder."""
    return {str(p.relative_to(p.parents[1])) for p in cache.rglob("*")
            if p.is_file() and ".locks" not in p.parts and not p.name.endswith(INDEX_SUFFIX)}


def _valid_keys(loader) -> list[str]:  # noqa: ANN001
    out: list[str] = []
    for b in loader:
        out += [k for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
    return out


def _assert_run(res, out: Path) -> None:  # noqa: ANN001
    assert res.epochs_done == 1 and not res.interrupted
    assert (out / "weights" / "last.pt").is_file() and (out / "weights" / "best.pt").is_file()
    assert (out / "results.csv").is_file()


# ----------------------------------------------------------------------- loader level


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_dali_rank_fetches_only_its_files_and_reads_its_range(packs, http_root, tmp_path, fmt):
    """Every rank downloads only the files overlapping its DALI sample range, reads exactly the
    samples the local all-files reader gives it, and yields batches_per_rank batches (padding included)."""
    local, url = packs[fmt], f"{http_root}/{fmt}"
    m = read_manifest(local)
    info = m.splits["train2017"]
    sizes = [s.num_samples for s in info.shards]
    for world, is_train in ((2, True), (5, False)):  # 5 ranks of 12 samples, batch 2: short ranks get a padding batch
        for rank in range(world):
            cache = tmp_path / f"c{fmt}{world}{rank}"
            kw = dict(loader="dali", imgsz=128, batch=2, train=is_train, rank=rank, world_size=world, device="cpu",
                      workers=1)
            rem = make_loader(url, "train", cache_dir=cache, **kw)
            want = {info.shards[s.shard].path for s in rank_segments(sizes, rank, world)}
            assert _cached(cache) == want and set(rem.fetched) == want
            assert len(want) < len(sizes)
            ref = make_loader(local, "train", **kw)
            n = batches_per_rank(12, world, 2, train=is_train)
            assert len(rem) == len(ref) == n
            got = [b for b in rem]
            assert len(got) == n
            keys = [k for b in got for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
            assert sorted(keys) == sorted(_valid_keys(ref))
            if not is_train:
                assert len(keys) == len(set(keys)) == len(range(*_range(12, rank, world)))


def _range(n: int, rank: int, world: int) -> tuple[int, int]:
    return (rank * n) // world, ((rank + 1) * n) // world


class _Logged(_RangeHandler):
    """The test HTTP handler, recording which files were requested."""

    seen: list[str]

    def send_head(self):  # noqa: ANN201
        self.seen.append(self.path)
        return super().send_head()


def test_torch_wds_streams_only_assigned_shards(packs, tmp_path):
    """Torch loader over wds on HTTP: no cache, no shard scan; each rank's workers request only
    the tars split.py gives that rank, and read the same samples as from local disk."""
    seen: list[str] = []
    handler = type("H", (_Logged,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(packs["wds"])))
    server.daemon_threads = True
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with _serving(server):
        _wait_ready(base + "/manifest.json")
        for rank in range(2):
            seen.clear()
            kw = dict(loader="torch", imgsz=128, batch=2, train=False, rank=rank, world_size=2, device="cpu",
                      workers=2)
            rem = make_loader(base, "val", cache_dir=tmp_path / "cache", **kw)
            keys = _valid_keys(rem)
            rem.close()
            assert keys == _valid_keys(make_loader(packs["wds"], "val", **kw))
            tars = {p for p in seen if p.endswith(".tar")}
            assert tars == {"/val2017/val2017-00000.tar"}
            seen.clear()
            rem = make_loader(base, "train", cache_dir=tmp_path / "cache", **kw)
            keys = _valid_keys(rem)
            rem.close()
            assert keys == _valid_keys(make_loader(packs["wds"], "train", **kw))
            m = read_manifest(packs["wds"])
            sizes = [s.num_samples for s in m.splits["train2017"].shards]
            want = {"/" + m.splits["train2017"].shards[s.shard].path for s in rank_segments(sizes, rank, 2)}
            assert {p for p in seen if p.endswith(".tar")} == want
    assert not (tmp_path / "cache").exists()  # streaming: nothing cached


def test_torch_lmdb_fetches_each_epochs_shards(packs, http_root, tmp_path):
    """LMDB needs random access: the torch loader caches the files this rank reads in each epoch
    (the shard order changes per epoch in training) and reads what it reads from local disk."""
    m = read_manifest(packs["lmdb"])
    sizes = [s.num_samples for s in m.splits["train2017"].shards]
    kw = dict(loader="torch", imgsz=128, batch=2, train=True, rank=1, world_size=2, device="cpu", workers=0)
    rem = make_loader(f"{http_root}/lmdb", "train", cache_dir=tmp_path / "cache", **kw)
    ref = make_loader(packs["lmdb"], "train", **kw)
    want: set[str] = set()
    for epoch in range(2):
        rem.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert _valid_keys(rem) == _valid_keys(ref)
        ids = epoch_shards(sizes, rank=1, world_size=2, batch=2, train=True, seed=0, epoch=epoch)
        want |= {m.splits["train2017"].shards[i].path for i in ids}
        assert _cached(tmp_path / "cache") == want == rem.fetched


# ----------------------------------------------------------------------- training runs


def test_train_from_http_dali_cached_then_reused(packs, http_root, tmp_path):
    cache = tmp_path / "cache"
    url = f"{http_root}/tfrecord"
    res = train(_cfg(url, tmp_path / "r1", "dali", cache), log=lambda s: None)
    _assert_run(res, tmp_path / "r1")
    m = read_manifest(packs["tfrecord"])
    assert _cached(cache) == {sh.path for s in m.splits.values() for sh in s.shards}  # 1 rank reads all
    files = {p: p.stat().st_ino for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts}
    args = yaml.safe_load((tmp_path / "r1" / "args.yaml").read_text())
    assert args["loader_resolved"] == "dali-cpu" and args["shards"] == url

    res = train(_cfg(url, tmp_path / "r2", "dali", cache), log=lambda s: None)
    _assert_run(res, tmp_path / "r2")
    again = {p: p.stat().st_ino for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert again == files  # same files, same inodes: nothing downloaded again


def test_train_from_http_wds_streaming(http_root, tmp_path):
    cache = tmp_path / "cache"
    res = train(_cfg(f"{http_root}/wds", tmp_path / "r", "torch", cache), log=lambda s: None)
    _assert_run(res, tmp_path / "r")
    assert not cache.exists()


def test_train_from_s3_dali_cached(packs, s3_data, s3_server, tmp_path):
    """Credentials as storage options; the secret is masked in args.yaml and checkpoints."""
    so = {**s3_server.options(), "secret": SECRET}  # moto accepts any secret
    cache = tmp_path / "cache"
    lines: list[str] = []
    res = train(_cfg(s3_data["tfrecord"], tmp_path / "r", "dali", cache, storage_options=so), log=lines.append)
    _assert_run(res, tmp_path / "r")
    m = read_manifest(packs["tfrecord"])
    assert _cached(cache) == {sh.path for s in m.splits.values() for sh in s.shards}
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [url_key(s3_data["tfrecord"], so)]
    _assert_no_secret(tmp_path / "r", "\n".join(lines))
    ck = torch.load(tmp_path / "r" / "weights" / "last.pt", weights_only=False)
    assert ck["train_args"]["storage_options"]["secret"] == "***"


def test_cli_train_from_s3_wds_streaming_keeps_secret(s3_data, s3_server, tmp_path):
    """python -m trainer.run s3://... with --storage-options @file (endpoint from AWS_ENDPOINT_URL)."""
    opts = tmp_path / "so.json"
    opts.write_text(json.dumps({"key": s3_server.key, "secret": SECRET}))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null", PYTHONPATH=str(ROOT))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "trainer.run", s3_data["wds"], "--storage-options", f"@{opts}", "--epochs", "1",
           "--batch", "4", "--imgsz", "128", "--model", "yolov8n.yaml", "--device", "cpu", "--workers", "1",
           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--cache-max-bytes", "1GB"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "loader: torch" in p.stdout
    _assert_no_secret(out, p.stdout + p.stderr)
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["storage_options"] == {"key": "***", "secret": "***"} and args["cache_max_bytes"] == 10**9
    # an error message (a missing prefix) names the place, never the secret
    bad = subprocess.run(cmd[:3] + [s3_data["wds"] + "-missing"] + cmd[4:], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "manifest.json not found" in bad.stderr
    assert SECRET not in bad.stdout + bad.stderr


def _assert_no_secret(out: Path, logs: str) -> None:
    assert SECRET not in logs
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


# ----------------------------------------------------------------------- corruption


def test_corrupt_remote_shard_is_refused(packs, s3_server, tmp_path, monkeypatch):
    """A remote shard whose bytes differ from the manifest: the cached path refuses to train on it
    (clear message, nothing cached); --verify catches it on the streaming path too."""
    import time

    monkeypatch.setattr(time, "sleep", lambda s: None)  # skip the retry backoff, not the retries
    src = tmp_path / "srv"
    for fmt in ("tfrecord", "wds"):
        shutil.copytree(packs[fmt], src / fmt)
        shard = src / fmt / read_manifest(packs[fmt]).splits["train2017"].shards[1].path
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes
        shard.write_bytes(bytes(data))
    with http_files(src) as base:
        cache = tmp_path / "cache"
        with pytest.raises(TrainError, match="does not match the manifest's sha256"):
            train(_cfg(f"{base}/tfrecord", tmp_path / "r", "dali", cache), log=lambda s: None)
        bad = read_manifest(packs["tfrecord"]).splits["train2017"].shards[1].path
        assert bad not in _cached(cache)
        with pytest.raises(DataError, match="checksum mismatch"):
            make_loader(f"{base}/wds", "train", loader="torch", batch=2, imgsz=128, verify=True, device="cpu")


def test_bad_url_and_options_are_one_line_errors(tmp_path, monkeypatch):
    import time

    from click.testing import CliRunner

    from trainer.run import main

    monkeypatch.setattr(time, "sleep", lambda s: None)  # the refused connection is retried
    r = CliRunner().invoke(main, ["s3://b/p", "--storage-options", "{not json"])
    assert r.exit_code == 2 and "--storage-options must be a JSON object" in r.output
    r = CliRunner().invoke(main, ["http://127.0.0.1:9/ds", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "127.0.0.1:9 is unreachable" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt,loader", [("tfrecord", "dali"), ("wds", "torch")])
def test_torchrun_two_ranks_from_http(http_root, tmp_path, fmt, loader):
    """Real DDP (gloo) from a URL: each rank caches (DALI) or streams (wds) its own shards; equal steps."""
    import re
    import subprocess

    from _train_util import PY, subprocess_env

    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.run",
           f"{http_root}/{fmt}", "--epochs", "1", "--imgsz", "128", "--batch", "4", "--model", "yolov8n.yaml",
           "--out", str(out), "--device", "cpu", "--loader", loader, "--workers", "1", "--cache-dir", str(cache)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    steps = re.search(r"steps per rank: (\d+), (\d+)", p.stdout)
    assert steps and steps.group(1) == steps.group(2) and int(steps.group(1)) > 0
    assert (out / "weights" / "last.pt").is_file()
    if loader == "dali":
        assert _cached(cache)  # shards were fetched into the cache, verified against the manifest
    else:
        assert not cache.exists()  # streamed
