"""Malformed manifests and hostile labels.npz files: every reader refuses them with one line.

Each malformed manifest is a real packed dataset's manifest.json with one thing broken (or
replaced by junk). `packer verify/info/convert/merge` (the real CLI, in process) and the
trainer CLI must exit 2 with one readable line and no traceback; the library raises FormatError.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packer.build import build_dataset
from packer.cli import main as packer_main
from packer.format import (
    LABEL_FIELDS,
    MANIFEST_MAX_BYTES,
    MANIFEST_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    parse_manifest,
    read_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "yolo"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "ds"
    build_dataset(SAMPLES, out, fmt="wds", size=64, workers=1, progress=False)
    return out


def _set(path: str, value):
    """A mutation of the manifest object: set the field at dotted `path` (split name '*' = the first)."""

    def apply(d: dict) -> None:
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            if k == "*":
                k = next(iter(node))
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


_DELETE = object()


def _rename_split(name: str):
    def apply(d: dict) -> None:
        first = next(iter(d["splits"]))
        d["splits"][name] = d["splits"].pop(first)

    return apply


def _splits_as_list(d: dict) -> None:
    d["splits"] = list(d["splits"].values())


# name -> a change to the real manifest object, or raw bytes that replace the file
CASES = {
    "not_utf8": b'{"format_version": 1, "names": ["caf\xe9"]}',
    "utf16": json.dumps({"format_version": 1}).encode("utf-16"),
    "deeply_nested": b"[" * 100_000 + b"]" * 100_000,
    "nested_options": None,  # built below: valid JSON, options 200 levels deep
    "not_json": b"\x00\x01garbage",
    "top_level_list": b"[1, 2, 3]",
    "duplicate_key": b'{"format_version": 1, "format_version": 1}',
    "huge_int": b'{"format_version": 1' + b"1" * 5000 + b"}",
    "splits_as_list": _splits_as_list,
    "count_as_string": _set("splits.*.num_samples", "12"),
    "count_negative": _set("splits.*.num_boxes", -1),
    "count_bool": _set("size", True),
    "count_float": _set("size", 64.0),
    "names_not_list": _set("names", "person"),
    "names_not_str": _set("names", [1, 2]),
    "shards_not_list": _set("splits.*.shards", {"path": "x"}),
    "shard_not_dict": _set("splits.*.shards", ["train/train-00000.tar"]),
    "shard_bytes_string": _set("splits.*.shards.0.bytes", "100"),
    "shard_sha_bad": _set("splits.*.shards.0.sha256", "x" * 64),
    "shard_path_escape": _set("splits.*.shards.0.path", "../../etc/passwd"),
    "shard_path_absolute": _set("splits.*.shards.0.path", "/etc/passwd"),
    "shard_path_nul": _set("splits.*.shards.0.path", "train/a\x00b.tar"),
    "shard_index_missing": _set("splits.*.shards.0.index", None),
    "labels_escape": _set("splits.*.labels", "../labels.npz"),
    "unknown_key": _set("extra", 1),
    "unknown_shard_key": _set("splits.*.shards.0.extra", 1),
    "missing_key": _set("names", _DELETE),
    "missing_split_key": _set("splits.*.shards", _DELETE),
    "split_name_dotdot": _rename_split(".."),
    "split_name_slash": _rename_split("../../x"),
    "split_name_absolute": _rename_split("/tmp/x"),
    "format_unknown": _set("format", "zip"),
    "format_version_string": _set("format_version", "1"),
    "source_not_dict": _set("source", []),
    "options_not_dict": _set("options", "fast"),
    "class_counts_strings": _set("splits.*.class_counts", ["1"]),
    # control characters in a path could forge `verify` output lines ("OK: ...", terminal escapes)
    "shard_path_newline": _set("splits.*.shards.0.path", "train/x\nOK: ds: 10 shards\x1b[2K.tar"),
    "shard_bytes_huge": _set("splits.*.shards.0.bytes", 10**4000),  # overflowed float() in info
    "shard_listed_twice": None,  # built below: verify read it once per entry
    "shard_path_dot": _set("splits.*.shards.0.path", "train/./train-00000.tar"),  # one file, two spellings
    "shard_path_c1": _set("splits.*.shards.0.path", "train/x\x9b2K.tar"),  # 8-bit CSI
    "shard_path_bidi": _set("splits.*.shards.0.path", "train/\u202erat.tar"),
}


def _shard_listed_twice(d: dict) -> None:
    split = d["splits"][next(iter(d["splits"]))]
    split["shards"].append(dict(split["shards"][0]))
    split["num_samples"] += split["shards"][0]["num_samples"]  # the totals agree: only the repeat is wrong


CASES["shard_listed_twice"] = _shard_listed_twice


def _nested_options(d: dict) -> None:
    deep: dict = {}
    for _ in range(200):
        deep = {"a": deep}
    d["options"] = deep


CASES["nested_options"] = _nested_options


def _malformed(packed: Path, dest: Path, case: str) -> Path:
    """A copy of the packed dataset whose manifest.json is broken as `case` says."""
    shutil.copytree(packed, dest)
    change = CASES[case]
    if isinstance(change, bytes):
        data = change
    else:
        obj = copy.deepcopy(json.loads((packed / MANIFEST_NAME).read_text()))
        change(obj)
        data = json.dumps(obj).encode()
    (dest / MANIFEST_NAME).write_bytes(data)
    return dest


def _packer(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of the real `packer` CLI run in this process."""
    try:
        packer_main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_unbroken_manifest_passes_every_command(packed, tmp_path, capsys):
    """The control: the same commands accept the real manifest, so the refusals below are about the damage."""
    assert Manifest.from_dict(json.loads((packed / MANIFEST_NAME).read_text())).format == "wds"
    for args in (["verify", str(packed)], ["info", str(packed)],
                 ["convert", str(packed), "-o", str(tmp_path / "c"), "--format", "tfrecord", "--no-progress"]):
        code, err = _packer(capsys, *args)
        assert code == 0, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_packer_commands_refuse_a_malformed_manifest(packed, tmp_path, capsys, case):
    bad = _malformed(packed, tmp_path / "bad", case)
    with pytest.raises(FormatError):
        read_manifest(bad)
    for args in (["verify", str(bad)], ["info", str(bad)],
                 ["convert", str(bad), "-o", str(tmp_path / "out"), "--format", "lmdb"]):
        code, err = _packer(capsys, *args)
        assert code == 2, (args[0], err)
        assert "manifest" in _one_line(err) or str(bad) in err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    # merge reads each part's manifest: the broken one is part 0 of 1
    dest = tmp_path / "merge"
    shutil.copytree(bad, dest / "parts" / "part-00000-of-00001")
    code, err = _packer(capsys, "merge", str(dest))
    assert code == 2 and "part 0 of 1" in _one_line(err)
    assert not (dest / MANIFEST_NAME).exists()


def test_messages_name_the_field_not_the_content(packed, tmp_path):
    cases = {"splits_as_list": "splits must be a JSON object", "count_as_string": "num_samples must be an integer",
             "count_bool": "size must be an integer >= 1, got a boolean", "names_not_str": "names must be a list of str",
             "shard_not_dict": "shards[0] must be a JSON object", "split_name_dotdot": "invalid split name '..'",
             "not_utf8": "is not UTF-8", "deeply_nested": "nested too deeply", "unknown_key": "unknown field 'extra'",
             "missing_key": "lacks the field 'names'", "shard_path_escape": "unsafe path",
             "nested_options": "nested deeper than", "duplicate_key": "'format_version' occurs twice",
             "shard_listed_twice": "lists the file 'train/train-00000.tar' twice", "shard_path_dot": "unsafe path",
             "shard_bytes_huge": "bytes must be below 2^63", "shard_path_newline": "unsafe path"}
    for case, words in cases.items():
        bad = _malformed(packed, tmp_path / case, case)
        with pytest.raises(FormatError, match=re.escape(words)) as e:
            read_manifest(bad)
        assert "\n" not in str(e.value) and "caf" not in str(e.value)


def test_parse_manifest_refuses_oversized_input(packed):
    data = (packed / MANIFEST_NAME).read_bytes()
    assert parse_manifest(data, "here").format == "wds"
    with pytest.raises(FormatError, match=r"^there: larger than 64 MiB"):
        parse_manifest(data + b" " * MANIFEST_MAX_BYTES, "there")


def test_trainer_cli_refuses_a_malformed_manifest(packed, tmp_path, capsys):
    from trainer.run import main as train_main

    for case in sorted(CASES):
        bad = _malformed(packed, tmp_path / case, case)
        with pytest.raises(SystemExit) as e:
            train_main([str(bad), "--epochs", "1", "--out", str(tmp_path / "runs"), "--device", "cpu"])
        assert e.value.code == 2, case
        assert "manifest" in _one_line(capsys.readouterr().err) or case.startswith("split_name")
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made


def test_trainer_subprocess_refuses_a_malformed_manifest(packed, tmp_path):
    bad = _malformed(packed, tmp_path / "bad", "splits_as_list")
    r = subprocess.run([sys.executable, "-m", "trainer.run", str(bad), "--out", str(tmp_path / "runs")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "splits must be a JSON object" in _one_line(r.stderr), r.stderr


# ----------------------------------------------------------------------------- labels.npz


def _arrays(packed: Path) -> tuple[dict[str, np.ndarray], Path, int]:
    """The first split's label arrays, their file and the split's shard count."""
    m = read_manifest(packed)
    split = next(iter(m.splits.values()))
    la = LabelArrays.load(packed / split.labels, num_classes=len(m.names))
    return {k: getattr(la, k) for k in LABEL_FIELDS}, packed / split.labels, len(split.shards)


def _npz(arrays: dict[str, np.ndarray]) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return buf


LABEL_CASES = {
    "object_keys": lambda a: a.update(keys=a["keys"].astype(object)),
    "float_cls": lambda a: a.update(cls=a["cls"].astype(np.float64)),
    "int64_cls": lambda a: a.update(cls=a["cls"].astype(np.int64)),
    "boxes_2d_wrong": lambda a: a.update(boxes=a["boxes"].reshape(-1)),
    "offsets_short": lambda a: a.update(offsets=a["offsets"][:-1]),
    "offsets_not_monotonic": lambda a: a.update(offsets=np.r_[a["offsets"][:1], a["offsets"][1:][::-1]]),
    "offsets_not_from_zero": lambda a: a.update(offsets=a["offsets"] + 1),
    "cls_negative": lambda a: a["cls"].__setitem__(0, -1),
    "cls_out_of_range": lambda a: a["cls"].__setitem__(0, 80),
    "boxes_nan": lambda a: a["boxes"].__setitem__((0, 0), np.nan),
    "hw_zero": lambda a: a["hw"].__setitem__((0, 0), 0),
    "shard_out_of_range": lambda a: a["shard"].__setitem__(0, 99),
    "pos_negative": lambda a: a["pos"].__setitem__(0, -5),
    "missing_field": lambda a: a.pop("sources"),
    "keys_2d": lambda a: a.update(keys=a["keys"].reshape(1, -1)),
    "boxes_outside": lambda a: a["boxes"].__setitem__((0, 2), 1e30),  # drew a traceback in preview
    "boxes_negative_size": lambda a: a["boxes"].__setitem__((0, 3), -0.1),
    "keys_twice": lambda a: a["keys"].__setitem__(1, a["keys"][0]),  # convert copied it on
    "sources_huge": lambda a: a.update(sources=a["sources"].astype("<U70000")),  # past the download bound
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_hostile_label_arrays_are_refused(packed, case):
    arrays, _, nshards = _arrays(packed)
    assert len(arrays["cls"]) > 0 and nshards < 99
    LabelArrays.load(_npz(arrays), num_classes=80, num_shards=nshards)  # the control loads
    arrays = {k: v.copy() for k, v in arrays.items()}
    LABEL_CASES[case](arrays)
    with pytest.raises(FormatError) as e:
        LabelArrays.load(_npz(arrays), num_classes=80, num_shards=nshards)
    assert "\n" not in str(e.value)


def test_label_junk_files_are_refused(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "text.npz").write_text("hello")
    for p in (tmp_path / "one.npy", tmp_path / "junk.npz", tmp_path / "text.npz", tmp_path / "absent.npz", tmp_path):
        with pytest.raises(FormatError):
            LabelArrays.load(p)


def test_packer_info_refuses_labels_with_unknown_classes(packed, tmp_path, capsys):
    bad = tmp_path / "ds"
    shutil.copytree(packed, bad)
    arrays, path, _ = _arrays(packed)
    arrays["cls"][0] = 80  # names has 80 entries: ids 0..79
    (bad / path.relative_to(packed)).write_bytes(_npz(arrays).getvalue())
    code, err = _packer(capsys, "info", str(bad))
    assert code == 1 and "class ids outside 0..79" in _one_line(err)  # a finished dataset whose data failed
    (bad / path.relative_to(packed)).unlink()
    code, err = _packer(capsys, "info", str(bad))
    assert code == 1 and "labels.npz" in _one_line(err)  # a file the manifest names is missing: the same


def test_packer_info_refuses_a_missing_or_resized_shard_or_index(packed, tmp_path, capsys):
    """info read the manifest and labels only, so a dataset with a shard gone printed its table (exit 0)."""
    shard = next(iter(json.loads((packed / MANIFEST_NAME).read_text())["splits"].values()))["shards"][1]
    for rel, change, words in ((shard["path"], "unlink", "missing"), (shard["index"], "unlink", "missing"),
                               (shard["path"], "append", f"{shard['bytes'] + 1} bytes, the manifest says {shard['bytes']}")):
        bad = tmp_path / f"{change}{len(rel)}"
        shutil.copytree(packed, bad)
        (bad / rel).unlink() if change == "unlink" else (bad / rel).open("ab").write(b"x")
        code, err = _packer(capsys, "info", str(bad))
        assert code == 1 and f"{rel}: {words}" in _one_line(err), err


def test_trainer_refuses_hostile_label_arrays(packed, tmp_path, capsys):
    from trainer.run import main as train_main

    bad = tmp_path / "ds"
    shutil.copytree(packed, bad)
    arrays, path, _ = _arrays(packed)
    arrays["boxes"][0, 0] = np.nan
    (bad / path.relative_to(packed)).write_bytes(_npz(arrays).getvalue())
    with pytest.raises(SystemExit) as e:
        train_main([str(bad), "--epochs", "1", "--out", str(tmp_path / "runs"), "--device", "cpu", "--loader", "torch"])
    assert e.value.code == 1 and "boxes hold NaN" in _one_line(capsys.readouterr().err)  # the data failed, as in packer
