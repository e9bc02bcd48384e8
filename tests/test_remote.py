"""Network storage: build/push/pull/verify/info against a real S3 server (moto) and a real
HTTP file server on 127.0.0.1, the trainer's shard cache and streaming, and secrets hygiene."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from packer.build import build_dataset
from packer.cli import main
from packer.format import MANIFEST_NAME, LabelArrays, read_manifest
from packer.storage.files import open_stream
from packer.storage.fs import ChecksumError, RemoteError, get_fs, is_transient, redact, retry
from packer.storage.location import fetch_labels, open_manifest
from packer.storage.pull import pull
from packer.storage.push import push
from packer.verify import verify_dataset
from tests import _servers
from tests._servers import http_files
from trainer.data.shard_cache import CacheFullError, cache_shards

s3_server = _servers.s3_server  # fixtures: a moto S3 server for the module's tests, its env credentials
s3_env = _servers.s3_env

SECRET = "S3CRET-do-not-print-7f3a9c"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".packer-state" not in p.parts}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def packed(coco128, tmp_path_factory) -> Path:
    """A small WebDataset build: 128 images at 64 px in 8 shards."""
    out = tmp_path_factory.mktemp("remote") / "ds"
    build_dataset(coco128, out, fmt="wds", size=64, shard_size=16, workers=2)
    return out


class _Faulty:
    """The real filesystem with put_file instrumented: counts uploads, and can fail the
    n-th one (after writing half of it, as a killed upload to a non-atomic store would)."""

    def __init__(self, fs, fail_at: int | None = None, exc: type[BaseException] = KeyboardInterrupt):  # noqa: ANN001
        self.fs, self.fail_at, self.exc = fs, fail_at, exc
        self.sent: list[str] = []
        self.calls = 0
        real = fs.put_file

        def put_file(lpath, rpath, **kw):  # noqa: ANN001, ANN202
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                self.fail_at = None if exc is not KeyboardInterrupt else self.fail_at
                data = Path(lpath).read_bytes()
                fs.pipe_file(rpath, data[: len(data) // 2])
                raise self.exc("injected")
            real(lpath, rpath, **kw)
            self.sent.append(rpath.rsplit("/", 1)[-1])

        fs.put_file = put_file


# ------------------------------------------------------------------------------ S3


def test_build_to_s3_info_verify_pull(coco128, s3_env, tmp_path, capsys):
    url = s3_env.make_bucket("built") + "/coco/v1"
    stage = tmp_path / "stage"
    code, out, err = _cli(capsys, "build", str(coco128), "-o", url, "--format", "tfrecord", "--size", "64",
                          "--shard-size", "32", "--workers", "2", "--staging", str(stage), "--json")
    assert code == 0, err
    assert json.loads(out)["out"] == url
    fs, root = get_fs(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root))[:3] == ["labels.npz", "manifest.json", "report.json"]

    code, out, _ = _cli(capsys, "info", url, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["root"] == url and info["splits"]["train2017"]["num_samples"] == 128
    assert info["splits"]["train2017"]["shards"]["count"] == 4
    assert info["shard_files_checked"] is True  # listed once: every shard there with its size

    code, out, err = _cli(capsys, "verify", url)
    assert code == 0, err
    assert out.startswith(f"OK: {url}: 4 shards, 128 records")

    # a second build to the same URL needs --overwrite
    code, _, err = _cli(capsys, "build", str(coco128), "-o", url, "--size", "64", "--workers", "1")
    assert code == 2 and "--overwrite" in err

    res = pull(url, tmp_path / "back")
    assert _tree(tmp_path / "back") == _tree(stage)
    assert len(res.copied) == res.files and res.files == 1 + 2 * 4 + 1 + 1  # labels, shards+idx, report, manifest
    again = pull(url, tmp_path / "back")  # everything already there and verified
    assert again.copied == [MANIFEST_NAME] and len(again.skipped) == again.files - 1
    # a file broken locally is detected and fetched again
    shard = next((tmp_path / "back" / "train2017").glob("*.tfrecord"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    fixed = pull(url, tmp_path / "back")
    assert fixed.copied == [str(shard.relative_to(tmp_path / "back")), MANIFEST_NAME]
    assert verify_dataset(tmp_path / "back").ok


def test_interrupted_push_finishes_on_rerun(packed, s3_server):
    so = s3_server.options()
    url = s3_server.make_bucket("pushed") + "/ds"
    files = [p for p in _tree(packed)]

    fs, _ = get_fs(url, so)
    first = _Faulty(fs, fail_at=5)  # the journal, 3 files, then the 5th upload is cut off half-way
    with pytest.raises(KeyboardInterrupt):
        push(packed, url, storage_options=so, filesystem=fs)
    assert len(first.sent) == 4 and first.sent[0] == "push.json"
    check, root = get_fs(url, so)
    assert not check.exists(f"{root}/{MANIFEST_NAME}")  # never looks complete
    with pytest.raises(Exception, match="not found"):
        open_manifest(url, so)

    fs2, _ = get_fs(url, so)
    second = _Faulty(fs2, fail_at=2, exc=ConnectionResetError)  # one transient error: retried
    res = push(packed, url, storage_options=so, filesystem=fs2)
    assert res.retries == 1
    assert set(res.skipped) == {f for f in files if f.rsplit("/", 1)[-1] in first.sent}
    assert len(res.copied) == len(files) - 3 and res.copied[-1] == MANIFEST_NAME
    assert not set(first.sent) & set(second.sent) - {"push.json"}  # nothing sent twice but the journal
    assert not get_fs(url, so)[0].exists(f"{root}/.packer-state/push.json")  # the journal goes once the manifest is there
    assert verify_dataset(url, storage_options=so).ok

    third = _Faulty(get_fs(url, so)[0])
    res = push(packed, url, storage_options=so, filesystem=third.fs)
    assert res.copied == [] and third.calls == 0 and res.skipped[-1] == MANIFEST_NAME


def test_corrupted_remote_shard_is_detected_and_repaired(packed, s3_server, tmp_path):
    so = s3_server.options()
    url = s3_server.make_bucket("corrupt") + "/ds"
    push(packed, url, storage_options=so)
    m = read_manifest(packed)
    victim = m.splits["train2017"].shards[2].path
    fs, root = get_fs(url, so)
    data = bytearray(fs.cat_file(f"{root}/{victim}"))
    data[len(data) // 2] ^= 0x40  # one flipped bit, same size
    fs.pipe_file(f"{root}/{victim}", bytes(data))

    res = verify_dataset(url, storage_options=so)
    assert not res.ok and any(victim in e and "sha256" in e for e in res.errors)
    with pytest.raises(ChecksumError, match=victim.rsplit("/", 1)[-1]):
        pull(url, tmp_path / "copy", storage_options=so, attempts=1)
    assert not (tmp_path / "copy" / MANIFEST_NAME).exists()
    fixed = push(packed, url, storage_options=so)  # only the broken shard is sent again
    assert fixed.copied == [victim, MANIFEST_NAME]
    assert verify_dataset(url, storage_options=so).ok


def test_secrets_never_printed_or_stored(packed, s3_server, tmp_path, capsys, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    so = {**s3_server.options(), "secret": SECRET}
    opts = tmp_path / "so.json"
    opts.write_text(json.dumps(so))
    url = s3_server.make_bucket("secret") + "/ds"
    outputs = []
    for argv in (["push", str(packed), url, "--json"], ["info", url], ["verify", url, "--json"],
                 ["pull", url, str(tmp_path / "copy")],
                 ["push", str(packed), "s3://no-such-bucket/x", "--retries", "0"]):
        code, out, err = _cli(capsys, *argv, "--storage-options", f"@{opts}")
        outputs.append(out + err)
    assert code == 2 and "no-such-bucket" in outputs[-1]
    code, out, err = _cli(capsys, "info", url, "--storage-options", json.dumps(so))  # inline JSON too
    outputs.append(out + err)
    assert all(SECRET not in o for o in outputs)
    assert all(SECRET.encode() not in b for b in _tree(tmp_path / "copy").values())
    fs, root = get_fs(url, so)
    assert all(SECRET.encode() not in fs.cat_file(p) for p in fs.find(root) if not p.endswith((".tar", ".npz")))
    # messages built from library errors are scrubbed too
    assert SECRET not in redact(f"bad request signed with {SECRET}", so)
    assert redact("https://user:pw@host/x") == "https://***@host/x"
    code, _, err = _cli(capsys, "info", url, "--storage-options", '{"secret": ')
    assert code == 2 and "JSON" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- HTTP


def test_http_info_verify_pull_stream(packed, tmp_path, capsys):
    with http_files(packed.parent) as base:
        url = f"{base}/{packed.name}"
        code, out, _ = _cli(capsys, "info", url, "--json")
        assert code == 0 and json.loads(out)["splits"]["train2017"]["num_samples"] == 128
        code, out, err = _cli(capsys, "verify", url)
        assert code == 0, err
        res = pull(url, tmp_path / "copy")
        assert _tree(tmp_path / "copy") == _tree(packed) and res.bytes_copied == sum(map(len, _tree(packed).values()))

        m = open_manifest(url)
        sh = m.splits["train2017"].shards[0]
        with open_stream(f"{url}/{sh.path}") as f:
            assert f.read() == (packed / sh.path).read_bytes()
        la, local = fetch_labels(url, "train2017", manifest=m), LabelArrays.load(packed / "train2017/labels.npz")
        assert np.array_equal(la.keys, local.keys) and np.array_equal(la.boxes, local.boxes)

        code, _, err = _cli(capsys, "push", str(packed), url)  # http is read-only
        assert code == 2 and "read-only" in err
        with pytest.raises(Exception, match="not found"):
            open_manifest(f"{base}/nothing-here")


# ------------------------------------------------------------------------- shard cache


def test_cache_shards(packed, tmp_path):
    m = read_manifest(packed)
    shards = m.splits["train2017"].shards
    with http_files(packed.parent) as base:
        url = f"{base}/{packed.name}"
        got: list[int] = []
        cache = tmp_path / "cache"
        paths = cache_shards(url, [shards[0].path, shards[1].path], cache, on_bytes=got.append)
        assert sum(got) == shards[0].bytes + shards[1].bytes  # only the requested shards
        for sh in shards[:2]:
            local = paths[sh.path]
            assert local.read_bytes() == (packed / sh.path).read_bytes()
            assert local.with_name(local.name + ".idx").read_bytes() == (packed / sh.index).read_bytes()
        assert len([p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts]) == 4

        got.clear()
        assert cache_shards(url, [shards[0].path, shards[1].path], cache, on_bytes=got.append) == paths
        assert got == []  # reused

        broken = paths[shards[1].path]
        broken.write_bytes(broken.read_bytes()[:100])
        cache_shards(url, [shards[0].path, shards[1].path], cache, on_bytes=got.append)
        assert sum(got) == shards[1].bytes and broken.read_bytes() == (packed / shards[1].path).read_bytes()

        # size bound: shards 2 and 3 fit only if the least recently used one (shard 0) goes
        limit = sum(sh.bytes for sh in shards[1:4]) + sum((packed / sh.index).stat().st_size for sh in shards[1:4])
        cache_shards(url, [shards[1].path], cache)  # shard 1 is now the most recently used
        # the user's own files and a decoded store in --cache-dir, older than any shard: never evicted
        mine = [cache / "thesis.pdf", cache / "decoded" / "train2017-0123" / "store.u8",
                paths[shards[0].path].parent / "notes.txt"]
        for p in mine:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"mine" * 1000)
            os.utime(p, (0, 0))
        new = cache_shards(url, [shards[2].path, shards[3].path], cache, max_bytes=limit)
        assert all(p.read_bytes() == b"mine" * 1000 for p in mine)
        cached = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts
                     and p not in mine)
        assert cached <= limit and not paths[shards[0].path].exists() and paths[shards[1].path].exists()
        assert all(p.exists() for p in new.values())
        with pytest.raises(CacheFullError):
            cache_shards(url, [sh.path for sh in shards], cache, max_bytes=limit)
        with pytest.raises(RemoteError, match="not shards"):
            cache_shards(url, ["train2017/nope.tar"], cache)

        # several ranks at once: each file is fetched under a lock and renamed into place
        results, errors = [], []

        def rank() -> None:
            try:
                results.append(cache_shards(url, [shards[4].path, shards[5].path], tmp_path / "shared"))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=rank) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(results) == 3 and all(r == results[0] for r in results)
        assert all(p.read_bytes() == (packed / k).read_bytes() for k, p in results[0].items())


# ----------------------------------------------------------------------------- units


def test_retry_is_bounded_and_selective():
    calls = []

    def fails_with(exc: BaseException, times: int):  # noqa: ANN202
        def fn() -> str:
            calls.append(1)
            if len(calls) <= times:
                raise exc
            return "ok"

        calls.clear()
        return fn

    assert retry(fails_with(ConnectionResetError("reset"), 2), attempts=3, base_delay=0.001) == "ok"
    assert len(calls) == 3
    with pytest.raises(ConnectionResetError):
        retry(fails_with(ConnectionResetError("reset"), 5), attempts=3, base_delay=0.001)
    assert len(calls) == 3
    with pytest.raises(FileNotFoundError):
        retry(fails_with(FileNotFoundError("gone"), 5), attempts=5, base_delay=0.001)
    assert len(calls) == 1  # not transient: no second try
    assert not is_transient(PermissionError()) and is_transient(TimeoutError()) and not is_transient(ValueError())


def test_file_url_push_pull(packed, tmp_path, capsys):
    url = (tmp_path / "store" / "ds").as_uri()
    code, out, err = _cli(capsys, "push", str(packed), url, "--json")
    assert code == 0, err
    assert json.loads(out)["copied"][-1] == MANIFEST_NAME
    assert _tree(tmp_path / "store" / "ds") == _tree(packed)
    assert not list((tmp_path / "store").rglob(".*.tmp"))  # temp names renamed into place
    code, out, _ = _cli(capsys, "verify", url, "--json")
    assert code == 0 and json.loads(out)["ok"]
    res = pull(url, tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(packed) and res.retries == 0
    bad = tmp_path / "copy" / read_manifest(packed).splits["train2017"].shards[0].path
    bad.write_bytes(b"x" + bad.read_bytes()[1:])  # a corrupt local copy is never uploaded
    code, _, err = _cli(capsys, "push", str(tmp_path / "copy"), (tmp_path / "store2").as_uri())
    assert code == 1 and "sha256" in err and not (tmp_path / "store2" / MANIFEST_NAME).exists()


def test_killed_push_process_finishes_on_rerun(coco128, s3_server, tmp_path):
    """A real `packer push` process SIGKILLed mid-upload: no remote manifest; the rerun sends only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import fsspec

    src = tmp_path / "many"
    build_dataset(coco128, src, fmt="wds", size=64, shard_size=1, workers=2)  # 128 shards + 128 indexes
    url = s3_server.make_bucket("killed-push") + "/ds"
    env = {**os.environ, **s3_server.env()}
    cmd = [str(Path(sys.executable).parent / "packer"), "push", str(src), url, "--no-progress", "--json"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.options())
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None and seen < 40:
        time.sleep(0.02)
        fs.invalidate_cache()
        seen = len(fs.find(url.removeprefix("s3://")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen >= 40, f"push finished or stalled before it could be killed ({seen} objects)"
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.find(url.removeprefix("s3://"))} - {"push.json"}
    assert MANIFEST_NAME not in names  # an interrupted push never looks complete
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert len(s["skipped"]) >= len(names) - 1 and 0 < len(s["copied"]) < s["files"], s
    assert not set(s["copied"]) & {n for n in s["skipped"]}
    assert verify_dataset(url, storage_options=s3_server.options()).ok


def test_push_into_a_folder_made_in_an_s3_console(packed, s3_server):
    """Consoles create zero-byte "folder/" marker objects; they are not files of anyone's: the push goes ahead."""
    so = s3_server.options()
    url = s3_server.make_bucket("markers") + "/team/ds"
    fs, root = get_fs(url, so)
    fs.pipe_file(root + "/", b"")
    fs.pipe_file(root + "/train2017/", b"")
    fs.invalidate_cache()
    assert any(k.endswith("/") or fs.info(k)["size"] == 0 for k in fs.find(root, withdirs=False))  # markers listed
    res = push(packed, url, storage_options=so)
    assert res.copied[-1] == MANIFEST_NAME and verify_dataset(url, storage_options=so).ok
