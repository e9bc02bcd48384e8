"""`packer push` follows the output-folder rules at the destination: never into a URL that names no
folder, never over a file packer did not write, another dataset only with --overwrite (and then only
its files go). Real pushes of samples/coco (64 px) to file:// URLs, through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_guard_output import OPTS, SRC, _files, _one_line_error, _packer

from packer.build import build_dataset
from packer.convert import convert_dataset
from packer.format import MANIFEST_NAME
from packer.storage.push import push
from packer.storage.remote_target import JOURNAL_REL
from packer.verify import verify_dataset


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("push")
    a, b = d / "a", d / "b"
    build_dataset(SRC, a, fmt="tfrecord", **OPTS)
    convert_dataset(a, b, "wds")
    return a, b


def test_a_url_that_names_no_folder_is_refused(two, tmp_path):
    a, _ = two
    (tmp_path / "report.json").write_text("mine")
    for url in ("file://", "file:///", "s3://", "file://?x=1", "file://."):
        r = _packer("push", a, url, cwd=tmp_path)
        assert "names no folder" in _one_line_error(r, 2)
        r = _packer("build", SRC, "-o", url, "--size", "64", "--workers", "1", cwd=tmp_path)
        assert "names no folder" in _one_line_error(r, 2)
    assert (tmp_path / "report.json").read_text() == "mine" and _files(tmp_path) == {"report.json"}


def test_a_folder_that_is_not_a_dataset_is_refused(two, tmp_path):
    a, _ = two
    dest = tmp_path / "dest"
    (dest / "train2017").mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert "not a packed dataset" in _one_line_error(_packer("push", a, dest.as_uri(), *extra), 2)
    assert _files(dest) == {"notes.txt"}


def test_a_file_at_a_path_push_writes_is_never_replaced(two, tmp_path):
    a, _ = two
    dest = tmp_path / "dest"
    victim = dest / "train2017" / "train2017-00000.tfrecord"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"someone else's shard")
    assert "packer did not write it" in _one_line_error(_packer("push", a, dest.as_uri()), 2)
    assert victim.read_bytes() == b"someone else's shard" and _files(dest) == {"train2017/train2017-00000.tfrecord"}


def test_another_dataset_is_replaced_only_with_overwrite_and_only_its_files(two, tmp_path):
    a, b = two
    dest = tmp_path / "dest"
    assert _packer("push", a, dest.as_uri()).returncode == 0
    (dest / "notes.txt").write_text("mine")
    (dest / "train2017" / "mine.tfrecord").write_text("mine too")
    assert "pass --overwrite" in _one_line_error(_packer("push", b, dest.as_uri()), 2)
    assert verify_dataset(dest.as_uri()).ok  # untouched by the refusal
    r = _packer("push", b, dest.as_uri(), "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["removed"] and all(x.endswith((".tfrecord", ".tfrecord.idx")) for x in s["removed"])
    assert _files(dest) == _files(b) | {"notes.txt", "train2017/mine.tfrecord"}
    assert (dest / "train2017" / "mine.tfrecord").read_text() == "mine too"
    assert verify_dataset(dest.as_uri()).ok and not (dest / ".packer-state").exists()
    again = _packer("push", b, dest.as_uri(), "--json")  # the same dataset: nothing to send, no --overwrite needed
    assert again.returncode == 0 and json.loads(again.stdout)["copied"] == []


def test_an_unfinished_push_continues_without_overwrite(two, tmp_path):
    a, b = two
    dest = tmp_path / "dest"
    push(a, dest.as_uri())
    os.remove(dest / MANIFEST_NAME)  # as a push of `a` killed after its journal and files, before the manifest
    (dest / JOURNAL_REL).parent.mkdir(exist_ok=True)
    (dest / JOURNAL_REL).write_text(json.dumps({"manifest_sha256": _sha(a / MANIFEST_NAME), "files": []}))
    res = push(a, dest.as_uri())
    assert res.copied == [MANIFEST_NAME] and verify_dataset(dest.as_uri()).ok
    os.remove(dest / MANIFEST_NAME)  # now as an unfinished push of another dataset: b needs --overwrite
    (dest / JOURNAL_REL).parent.mkdir(exist_ok=True)
    (dest / JOURNAL_REL).write_text(json.dumps({"manifest_sha256": "0" * 64, "files": sorted(_files(a))}))
    assert "unfinished push of another dataset" in _one_line_error(_packer("push", b, dest.as_uri()), 2)
    assert _packer("push", b, dest.as_uri(), "--overwrite").returncode == 0
    assert _files(dest) == _files(b) and verify_dataset(dest.as_uri()).ok
    (dest / JOURNAL_REL).parent.mkdir()  # a push that died after its manifest, before removing its journal
    (dest / JOURNAL_REL).write_text(json.dumps({"manifest_sha256": _sha(b / MANIFEST_NAME), "files": []}))
    assert push(b, dest.as_uri()).copied == [] and not (dest / ".packer-state").exists()


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_report_json_of_the_users_is_never_taken_for_packers(two, tmp_path):
    """A dataset pushed without report.json, then a user's report.json beside it: --overwrite with a dataset
    that has a report refuses to replace the user's file; one without a report leaves it alone."""
    a, b = two
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(a, bare)
    (bare / "report.json").unlink()
    dest = tmp_path / "dest"
    assert _packer("push", bare, dest.as_uri()).returncode == 0
    (dest / "report.json").write_text("my notes")
    assert "packer did not write it" in _one_line_error(_packer("push", b, dest.as_uri(), "--overwrite"), 2)
    assert (dest / "report.json").read_text() == "my notes" and verify_dataset(dest.as_uri()).ok


def test_push_never_writes_through_a_symlinked_folder_of_a_file_url(two, tmp_path):
    a, b = two
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    assert _packer("push", a, dest.as_uri()).returncode == 0
    (dest / "train2017").rename(elsewhere)
    (dest / "train2017").symlink_to(elsewhere, target_is_directory=True)  # the split folder now leads out
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert "symlink leading out of" in _one_line_error(_packer("push", b, dest.as_uri(), "--overwrite"), 2)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
