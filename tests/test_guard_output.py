"""Output safety: packer never touches what it did not write, one writer at a time, split
names never leave -o. Real builds of samples/coco (64 px), real processes for the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from packer.build import BuildError, build_dataset
from packer.convert import convert_dataset
from packer.format import MANIFEST_NAME, read_manifest
from packer.output import LOCK_NAME, STATE_DIR
from packer.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "samples" / "coco"
BIN = Path(sys.executable).parent
OPTS = {"size": 64, "workers": 1, "min_shards": 2}
# a user's files with every suffix the packer writes, at paths that are not packer's own
USER_FILES = [f"{d}mine{sfx}" for d in ("", "train2017/", "val2017/", "extra/", "train2017/notes/")
              for sfx in (".tar", ".idx", ".tfrecord", ".lmdb", ".tar.idx")] + [
    "extra/labels.npz", "extra/report.json", "train2017/notes/labels.npz", "train2017/notes/report.json",
    "extra/data.lmdb", "extra/manifest.json", "notes.txt",
    # hidden temp-like names of the user's (an editor's backup, the old packer temp pattern)
    ".draft.1.tmp", "train2017/.thesis.20240101.tmp", "val2017/.val2017-00000.tar.abcdefgh.tmp"]


def _packer(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "packer"), *map(str, args)], capture_output=True, text=True, **kw)


def _one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("packer: note:")]
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


def _plant(out: Path) -> dict[str, bytes]:
    files = {}
    for rel in USER_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        files[rel] = f"user data {rel}".encode()
        (out / rel).write_bytes(files[rel])
    return files


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("old,new", [("tfrecord", "wds"), ("wds", "lmdb"), ("lmdb", "tfrecord")])
def test_overwrite_removes_exactly_what_packer_wrote(tmp_path, old, new):
    out = tmp_path / "out"
    build_dataset(SRC, out, fmt=old, **OPTS)
    before = _files(out)
    mine = _plant(out)
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(SRC, out, fmt=new, **OPTS)
    build_dataset(SRC, out, fmt=new, overwrite=True, **OPTS)
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine  # every user file survives, untouched
    assert verify_dataset(out).ok and read_manifest(out).format == new
    after = _files(out) - set(mine)
    assert not (before - {MANIFEST_NAME, "report.json", "train2017/labels.npz", "val2017/labels.npz"}) & after
    assert not set(p.relative_to(out).as_posix() for p in out.rglob(".*")) - set(mine)  # no lock, journal or temp left


def test_overwrite_of_an_unfinished_build_removes_only_journal_listed_files(tmp_path):
    out = tmp_path / "out"

    def stop(split, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(SRC, out, fmt="tfrecord", shard_size=2, on_shard=stop, **OPTS)
    assert (out / STATE_DIR).is_dir() and not (out / MANIFEST_NAME).exists()
    mine = _plant(out)
    build_dataset(SRC, out, fmt="wds", overwrite=True, **OPTS)
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert not list(out.rglob("*.tfrecord.idx")) and verify_dataset(out).ok


def test_foreign_manifest_and_user_folders_are_refused(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / MANIFEST_NAME).write_text(json.dumps({"name": "my web app", "icons": []}))
    (web / "index.html").write_text("<html></html>")
    r = _packer("build", SRC, "-o", web, "--size", "64", "--overwrite")
    assert "not a packer manifest" in _one_line_error(r, 2)
    assert sorted(p.name for p in web.iterdir()) == ["index.html", MANIFEST_NAME]
    user = tmp_path / "user"
    user.mkdir()
    _plant(user)
    ds = tmp_path / "ds"
    build_dataset(SRC, ds, fmt="wds", **OPTS)
    for args in (["build", SRC, "-o", user, "--overwrite"], ["convert", ds, "-o", user, "--format", "lmdb", "--overwrite"]):
        assert "not empty and is not a packed dataset" in _one_line_error(_packer(*args), 2)
    assert set(_files(user)) == set(USER_FILES)


def test_packer_never_writes_over_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    build_dataset(SRC, out, fmt="wds", splits=["val2017"], **OPTS)
    (out / "train2017").mkdir()
    (out / "train2017" / "train2017-00000.tar").write_bytes(b"someone else's tar")
    (out / "train2017" / "train2017-00003.tar").write_bytes(b"a tar the new build may not reach")
    with pytest.raises(BuildError, match="packer did not write it.*nothing was removed"):
        build_dataset(SRC, out, fmt="wds", overwrite=True, **OPTS)
    assert (out / "train2017" / "train2017-00000.tar").read_bytes() == b"someone else's tar"
    assert verify_dataset(out).ok  # refused before --overwrite removed the old dataset


def test_overwrite_never_deletes_or_writes_through_a_symlinked_folder(tmp_path):
    """A journal entry or a split folder that leads through a symlink out of -o: nothing outside is
    deleted, nothing is written there, and the run says which link is in the way."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    build_dataset(SRC, out, fmt="wds", **OPTS)
    outside.mkdir()
    (outside / "f.jpg").write_bytes(b"precious")
    (out / "lnk").symlink_to(outside, target_is_directory=True)
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "written.txt").write_text("lnk/f.jpg\n")  # an edited journal
    build_dataset(SRC, out, fmt="wds", overwrite=True, **OPTS)
    assert (outside / "f.jpg").read_bytes() == b"precious" and verify_dataset(out).ok

    val = out / "val2017"
    for f in val.iterdir():
        f.rename(outside / f.name)
    val.rmdir()
    val.symlink_to(outside, target_is_directory=True)  # the split folder now leads out of -o
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with pytest.raises(BuildError, match="symlink leading out of"):
        build_dataset(SRC, out, fmt="wds", overwrite=True, **OPTS)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def _push_file_url(tmp_path: Path, out: Path) -> str:
    from packer.storage.push import push

    url = (tmp_path / "store" / "ds").as_uri()
    push(out, url)
    return url


def test_pull_follows_the_build_rules(tmp_path):
    from packer.storage.fs import RemoteError
    from packer.storage.pull import pull

    a, b = tmp_path / "a", tmp_path / "b"
    build_dataset(SRC, a, fmt="wds", **OPTS)
    build_dataset(SRC, b, fmt="tfrecord", **OPTS)
    url = _push_file_url(tmp_path, a)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    r = _packer("pull", url, user)
    assert "not a packed dataset" in _one_line_error(r, 2)
    assert _files(user) == {"notes.txt"}
    r = _packer("pull", url, b)  # another packed dataset
    assert "--overwrite" in _one_line_error(r, 2) and read_manifest(b).format == "tfrecord"
    mine = _plant(b)
    assert _packer("pull", url, b, "--overwrite").returncode == 0
    assert {rel: (b / rel).read_bytes() for rel in mine} == mine and verify_dataset(b).ok
    assert not list(b.rglob("*-0000?.tfrecord"))  # the old dataset's shards are gone
    again = pull(url, b)  # the same dataset: kept, nothing copied but the manifest
    assert again.copied == [MANIFEST_NAME]
    with pytest.raises((RemoteError, BuildError)):
        pull(url, b / "notes.txt")


# ----------------------------------------------------------------------------- the lock


def _wait_for_lock(out: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((out / LOCK_NAME).read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    pytest.fail("the first run never held the lock (finished too fast?)")


def test_two_concurrent_overwrite_runs_never_both_succeed(tmp_path):
    """Two real `packer build --overwrite` processes on one folder: while the first holds the
    lock (stopped with SIGSTOP so the overlap is certain), the second exits 2 naming it."""
    out = tmp_path / "out"
    build_dataset(SRC, out, fmt="wds", **OPTS)
    mine = _plant(out)
    cmd = [str(BIN / "packer"), "build", str(SRC), "-o", str(out), "--size", "640", "--workers", "1",
           "--overwrite", "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)
        second = _packer(*cmd[1:])
        line = _one_line_error(second, 2)
        assert f"pid {first.pid}" in line and socket.gethostname() in line
        from packer.storage.pull import pull

        src = tmp_path / "conv-src"
        build_dataset(SRC, src, fmt="wds", **OPTS)
        url = _push_file_url(tmp_path, src)
        for run in (lambda: convert_dataset(src, out, "lmdb", overwrite=True), lambda: pull(url, out, overwrite=True)):
            with pytest.raises(BuildError, match=f"another packer run \\(pid {first.pid} on host"):
                run()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert read_manifest(out).size == 640 and verify_dataset(out).ok
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert not (out / LOCK_NAME).exists()


def test_merge_takes_the_lock(tmp_path):
    dest = tmp_path / "dest"
    for i in range(2):
        build_dataset(SRC, dest, fmt="tfrecord", num_parts=2, part=i, **OPTS)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom packer.output import output_folder\n"
        f"with output_folder({str(dest)!r}):\n    print('held', flush=True)\n    sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in _one_line_error(_packer("merge", dest), 2)
    finally:
        holder.communicate("", timeout=30)
    assert _packer("merge", dest).returncode == 0 and verify_dataset(dest).ok


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))
    r = _packer("build", SRC, "-o", out, "--size", "64", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of an interrupted run (pid {pid}" in r.stderr
    assert not (out / LOCK_NAME).exists() and verify_dataset(out).ok

    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "another-machine", "since": "then"}))
    line = _one_line_error(_packer("build", SRC, "-o", other, "--size", "64"), 2)
    assert "another-machine" in line and str(other / LOCK_NAME) in line
    assert (other / LOCK_NAME).exists()  # not ours to remove


# ------------------------------------------------------------------------- split names


def test_split_names_never_leave_the_output_folder(tmp_path):
    from packer.parts import merge_parts
    from packer.storage.pull import pull

    r = _packer("build", SRC, "-o", tmp_path / "o1", "--splits", "../../x")
    assert "invalid split name" in _one_line_error(r, 2) and not (tmp_path / "o1").exists()

    good = tmp_path / "good"
    build_dataset(SRC, good, fmt="wds", **OPTS)
    url = _push_file_url(tmp_path, good)
    for name in ("../../evil", "/tmp/evil-abs"):
        bad = tmp_path / f"bad{len(name)}"
        bad.mkdir()
        m = json.loads((good / MANIFEST_NAME).read_text())
        m["splits"] = {name: m["splits"]["val2017"]}
        os.symlink(good / "val2017", bad / "val2017")
        (bad / MANIFEST_NAME).write_text(json.dumps(m))
        out = tmp_path / "conv" / "deep" / "out"
        for fmt in ("tfrecord", "lmdb"):
            with pytest.raises(ValueError):
                convert_dataset(bad, out, fmt)
        (tmp_path / "store" / "ds" / MANIFEST_NAME).write_text(json.dumps(m))
        with pytest.raises(ValueError):
            pull(url, tmp_path / "pulled")
        assert not out.exists() and not (tmp_path / "pulled").exists()
        assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-abs").exists()
    _one_line_error(_packer("convert", bad, "-o", out, "--format", "wds"), 2)

    dest = tmp_path / "parts"
    for i in range(2):
        build_dataset(SRC, dest, fmt="wds", num_parts=2, part=i, **OPTS)
    for i in range(2):
        mp = dest / "parts" / f"part-0000{i}-of-00002" / MANIFEST_NAME
        m = json.loads(mp.read_text())
        m["splits"]["../../evil"] = m["splits"].pop("val2017")
        m["options"]["parts"]["splits"]["../../evil"] = m["options"]["parts"]["splits"].pop("val2017")
        mp.write_text(json.dumps(m))
    with pytest.raises(ValueError):
        merge_parts(dest)
    assert not (dest / MANIFEST_NAME).exists() and not list(tmp_path.rglob("evil*"))
