"""One line, never a traceback: a full disk, a file size limit and a read-only output during
build/convert/pull in every format, and an unreachable storage endpoint for push and
`build -o s3://`. Real failures: a tiny tmpfs (root only), RLIMIT_FSIZE, a read-only bind
mount or mode, a closed port on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from packer.build import build_dataset
from packer.convert import convert_dataset
from packer.format import FORMATS, MANIFEST_NAME
from packer.output import WriteFailed
from packer.storage.pull import pull

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "samples" / "coco"
BIN = Path(sys.executable).parent
BIG = {"size": 256, "workers": 1, "shard_size": 16}  # ~0.5 MB, one shard per split
MARKER = "MARKER-s3cret-9d1e"


def _packer(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "packer"), *map(str, args)], capture_output=True, text=True, **kw)


def _one_line(r: subprocess.CompletedProcess, code: int) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


def _nothing_published(out: Path) -> None:
    assert not list(out.rglob(MANIFEST_NAME)), "a manifest was written"
    assert not [p for p in out.rglob(".*.tmp")], "temp files were left"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "ds"
    build_dataset(SRC, out, fmt="wds", **BIG)
    return out


@pytest.fixture(scope="module")
def url(dataset, tmp_path_factory) -> str:
    u = (tmp_path_factory.mktemp("store") / "ds").as_uri()
    assert _packer("push", dataset, u).returncode == 0
    return u


from conftest import mount as _mount  # noqa: E402


@pytest.fixture
def read_only(tmp_path):
    """An existing, empty, read-only folder (a read-only bind mount as root, mode 0555 otherwise)."""
    d = tmp_path / "ro"
    d.mkdir()
    mounted = os.geteuid() == 0 and _mount(["--bind", "-o", "ro", str(d), str(d)])
    if os.geteuid() != 0:
        d.chmod(0o555)
    try:
        (d / "probe").write_bytes(b"")
        (d / "probe").unlink()
        pytest.skip("cannot make a read-only folder here")
    except OSError:
        pass
    yield d
    if mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)
    d.chmod(0o755)


@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full_during_build_and_convert(small_disk, dataset, fmt):
    out = small_disk / f"build-{fmt}"
    with pytest.raises(WriteFailed, match=r"disk is full|I/O error") as e:
        build_dataset(SRC, out, fmt=fmt, **BIG)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    _nothing_published(small_disk)
    shutil.rmtree(out)
    conv = small_disk / f"convert-{fmt}"
    with pytest.raises(WriteFailed, match=r"disk is full|I/O error"):
        convert_dataset(dataset, conv, fmt)
    _nothing_published(small_disk)


def test_disk_full_during_pull_and_on_the_command_line(small_disk, url):
    with pytest.raises(WriteFailed, match="disk is full"):
        pull(url, small_disk / "pulled")
    _nothing_published(small_disk)
    shutil.rmtree(small_disk / "pulled")
    line = _one_line(_packer("build", SRC, "-o", small_disk / "cli", "--size", "256", "--shard-size", "16",
                             "--workers", "1"), 1)
    assert "disk is full" in line and "--resume" in line
    _nothing_published(small_disk)
    shutil.rmtree(small_disk / "cli")
    assert "disk is full" in _one_line(_packer("pull", url, small_disk / "cli-pull"), 1)
    _nothing_published(small_disk)


def _limited() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


_EVERY_FORMAT = """
import json, sys
from pathlib import Path
from packer.build import build_dataset
from packer.convert import convert_dataset
from packer.output import WriteFailed
from packer.storage.pull import pull
src, dataset, url, tmp = sys.argv[1:]
got = []
for fmt in ("tfrecord", "wds", "lmdb"):
    for run in (lambda: build_dataset(src, Path(tmp) / ("b-" + fmt), fmt=fmt, size=256, shard_size=16, workers=1),
                lambda: convert_dataset(dataset, Path(tmp) / ("c-" + fmt), fmt)):
        try:
            run()
            got.append("no error")
        except WriteFailed as e:
            got.append(str(e))
try:
    pull(url, Path(tmp) / "p")
    got.append("no error")
except WriteFailed as e:
    got.append(str(e))
print(json.dumps(got))
"""


def test_file_size_limit(tmp_path, dataset, url):
    """RLIMIT_FSIZE (works without root): every file write past 100 KB fails with EFBIG."""
    r = subprocess.run([sys.executable, "-c", _EVERY_FORMAT, str(SRC), str(dataset), url, str(tmp_path)],
                       capture_output=True, text=True, preexec_fn=_limited)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got) == 7 and all("EFBIG" in m or "I/O error" in m for m in got), got
    _nothing_published(tmp_path)
    r = subprocess.run([str(BIN / "packer"), "build", str(SRC), "-o", str(tmp_path / "cli"), "--size", "256",
                        "--shard-size", "16", "--workers", "1"], capture_output=True, text=True, preexec_fn=_limited)
    assert "EFBIG" in _one_line(r, 1)
    _nothing_published(tmp_path)


def test_read_only_output(read_only, dataset, url):
    from packer.output import OutputError

    for run in (lambda: build_dataset(SRC, read_only, size=64, workers=1),
                lambda: build_dataset(SRC, read_only / "new", size=64, workers=1),
                lambda: convert_dataset(dataset, read_only, "lmdb"),
                lambda: pull(url, read_only / "pulled")):
        with pytest.raises((OutputError, ValueError), match=r"cannot write to output folder .*(Read-only|Permission)"):
            run()
    line = _one_line(_packer("build", SRC, "-o", read_only, "--size", "64"), 2)
    assert "cannot write to output folder" in line
    assert list(read_only.iterdir()) == []


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connections are refused at once
    return port


def test_unreachable_endpoint_is_one_line_without_secrets(dataset, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    from packer.storage.fs import RemoteError
    from packer.storage.push import push

    port = _closed_port()
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIATESTKEY123", "secret": MARKER,
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    with pytest.raises(RemoteError) as e:
        push(dataset, "s3://bucket/ds", storage_options=so, attempts=2)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "unreachable after 2 attempt(s)" in msg and MARKER not in msg, msg
    opts = tmp_path / "so.json"
    opts.write_text(json.dumps(so))
    r = _packer("build", SRC, "-o", "s3://bucket/built", "--size", "64", "--retries", "0", "--staging",
                tmp_path / "stage", "--storage-options", f"@{opts}", env=dict(os.environ), timeout=120)
    line = _one_line(r, 2)
    assert f"127.0.0.1:{port}" in line and "unreachable" in line, line
    assert MARKER not in r.stdout + r.stderr and "AKIATESTKEY123" not in r.stderr
    assert not (tmp_path / "stage").exists()  # it failed before building anything


def test_missing_credentials_and_a_bad_endpoint_are_one_line(dataset, tmp_path):
    """The most common real failures against S3: no credentials anywhere, a typo in endpoint_url."""
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    for args in (["push", dataset, "s3://bucket/ds"], ["build", SRC, "-o", "s3://bucket/ds", "--size", "64"]):
        line = _one_line(_packer(*args, "--retries", "0", env=env, timeout=120, cwd=tmp_path), 2)
        assert "no usable credentials" in line and "AWS_PROFILE" in line, line
    bad = '{"client_kwargs": {"endpoint_url": "not a url"}, "key": "k", "secret": "' + MARKER + '"}'
    r = _packer("push", dataset, "s3://bucket/ds", "--retries", "0", "--storage-options", bad, env=env, timeout=120)
    assert "not a valid URL" in _one_line(r, 2) and MARKER not in r.stderr
    assert os.listdir(tmp_path) == []  # nothing staged or written


def test_an_unreachable_http_server_is_named_not_taken_for_a_missing_dataset(tmp_path):
    """fsspec's http turns a refused connection into FileNotFoundError: packer still says what happened."""
    port = _closed_port()
    for args in (["pull", f"http://127.0.0.1:{port}/ds", tmp_path / "copy", "--retries", "1"],
                 ["info", f"http://127.0.0.1:{port}/ds"]):
        line = _one_line(_packer(*args, timeout=120), 2)
        assert f"127.0.0.1:{port} is unreachable" in line and "not found" not in line, line
    assert not (tmp_path / "copy").exists()


def test_json_failures_print_one_object_on_stdout(tmp_path):
    """A pipeline parsing stdout gets one object on failure too, with the exit status; stderr keeps
    the one line for people. Usage errors (2) and data failures (1) of several commands."""
    (tmp_path / "empty").mkdir()
    packed = tmp_path / "packed"
    build_dataset(SRC, packed, size=64, workers=1)
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    shard = next(bad.rglob("*.tfrecord"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: a data failure when copied
    noidx = tmp_path / "noidx"
    shutil.copytree(packed, noidx)
    next(noidx.rglob("*.idx")).unlink()  # a file the manifest names is missing: the data failed (1)
    parts = tmp_path / "parts"
    for i in range(2):
        build_dataset(SRC, parts, size=64, workers=1, num_parts=2, part=i)
    part_shard = next((parts / "parts").rglob("*.tfrecord"))
    part_shard.write_bytes(part_shard.read_bytes()[:-10])
    cases = [
        (("pull", noidx.as_uri(), tmp_path / "got2", "--retries", "0", "--json"), 1),
        (("merge", parts, "--json"), 1),
        (("build", SRC, "-o", packed, "--json"), 2),  # occupied output folder
        (("info", tmp_path / "empty", "--json"), 2),
        (("verify", tmp_path / "empty", "--json"), 2),
        (("convert", packed, "-o", packed, "--format", "wds", "--json"), 2),
        (("merge", tmp_path / "empty", "--json"), 2),
        (("pull", bad.as_uri(), tmp_path / "got", "--retries", "0", "--json"), 1),
        (("build", SRC, "--size", "8", "--json"), 2),  # refused by click itself
    ]
    for args, code in cases:
        r = _packer(*args)
        line = _one_line(r, code)
        obj = json.loads(r.stdout)  # exactly one JSON document
        assert obj == {"ok": False, "exit_code": code, "error": line.removeprefix("packer: error: ")}, args


def test_local_only_commands_given_a_url_and_an_unfinished_pull_say_what_they_are(tmp_path):
    packed = tmp_path / "packed"
    build_dataset(SRC, packed, size=64, workers=1)
    for cmd in (("convert", packed.as_uri(), "-o", tmp_path / "c", "--format", "wds"),
                ("push", packed.as_uri(), (tmp_path / "p").as_uri()), ("merge", packed.as_uri())):
        line = _one_line(_packer(*cmd), 2)
        assert f"is a URL; {cmd[0]} works on a local folder (packer pull URL DIR first)" in line
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    next(broken.rglob("*.idx")).unlink()
    _one_line(_packer("pull", broken.as_uri(), tmp_path / "got", "--retries", "0"), 1)  # leaves an unfinished pull
    line = _one_line(_packer("pull", packed.as_uri(), tmp_path / "got"), 2)
    assert f"already holds an unfinished pull of {broken.as_uri()}; pass --overwrite" in line


@pytest.mark.parametrize("command, advice", [
    (["build", str(SRC), "-o", "{out}"], "rerun with --resume to continue"),
    (["convert", "{packed}", "-o", "{out}", "--format", "wds"], "rerun with --overwrite"),
    (["pull", "{url}", "{out}"], "rerun it to finish: what was copied is kept"),
])
def test_ctrl_c_advice_names_what_the_command_has(tmp_path, capsys, monkeypatch, command, advice):
    """pull and convert have no --resume: the Ctrl-C line must not send a user to it. The library
    call is made to see the Ctrl-C (a real signal's timing is not repeatable); the CLI is real."""
    import packer.build
    import packer.convert
    import packer.storage.pull
    from packer.cli import main

    packed = tmp_path / "packed"
    build_dataset(SRC, packed, size=64, workers=1)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    for mod, name in ((packer.build, "build_dataset"), (packer.convert, "convert_dataset"),
                      (packer.storage.pull, "pull")):
        monkeypatch.setattr(mod, name, interrupted)
    args = [a.format(out=tmp_path / "out", packed=packed, url=packed.as_uri()) for a in command]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"packer: interrupted; no manifest was written ({advice})"
