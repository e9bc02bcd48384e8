"""Run TensorFlow in its own process for the tests.

TensorFlow and torch loaded into one process crash it (a segfault in torch's optimizer
set-up after TF was imported), so tests that need TF call this script through `tf_read` /
`tf_write` and compare plain JSON.

    python tests/_tf_tool.py read  OUT.json SHARD [SHARD ...]   # tf.data + parse_single_example
    python tests/_tf_tool.py write OUT.tfrecord IN.json         # tf.io.TFRecordWriter
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from packer.format import (
    TF_BBOX,
    TF_CLASS,
    TF_HEIGHT,
    TF_IMAGE,
    TF_KEY,
    TF_ORIG_HEIGHT,
    TF_ORIG_WIDTH,
    TF_SOURCE,
    TF_WIDTH,
    Record,
)


def _run(*args: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"TensorFlow subprocess failed:\n{r.stderr[-3000:]}")


def tf_read(paths: list[Path], tmp: Path) -> list[dict]:
    """Every record of `paths` as read by tf.data and parsed by tf.io.parse_single_example."""
    out = tmp / "tf_read.json"
    _run("read", str(out), *map(str, paths))
    return json.loads(out.read_text())


def tf_write(path: Path, records: list[Record], drop: dict[int, str] | None = None) -> None:
    """Write `records` with tf.io.TFRecordWriter (record i without feature drop[i])."""
    spec = path.with_suffix(".json")
    spec.write_text(json.dumps([
        {"jpeg": base64.b64encode(r.jpeg).decode(), "key": r.key, "source": r.source, "height": r.height,
         "width": r.width, "orig_height": r.orig_height, "orig_width": r.orig_width, "cls": r.cls.tolist(),
         "boxes": r.boxes.reshape(-1).tolist(), "drop": (drop or {}).get(i)}
        for i, r in enumerate(records)
    ]))
    _run("write", str(path), str(spec))


def _read(out: str, paths: list[str]) -> None:
    import tensorflow as tf

    s, i = tf.io.FixedLenFeature([], tf.string), tf.io.FixedLenFeature([], tf.int64)
    spec = {
        TF_IMAGE: s, TF_KEY: s, TF_SOURCE: s, TF_HEIGHT: i, TF_WIDTH: i, TF_ORIG_HEIGHT: i, TF_ORIG_WIDTH: i,
        TF_CLASS: tf.io.VarLenFeature(tf.int64), TF_BBOX: tf.io.VarLenFeature(tf.float32),
    }
    rows = []
    for raw in tf.data.TFRecordDataset(paths):
        raw = raw.numpy()
        ex = tf.io.parse_single_example(raw, spec)
        rows.append({
            "canonical": tf.train.Example.FromString(raw).SerializeToString(deterministic=True) == raw,
            "jpeg_sha1": hashlib.sha1(ex[TF_IMAGE].numpy()).hexdigest(),
            "key": ex[TF_KEY].numpy().decode(),
            "source": ex[TF_SOURCE].numpy().decode(),
            "sizes": [int(ex[k]) for k in (TF_HEIGHT, TF_WIDTH, TF_ORIG_HEIGHT, TF_ORIG_WIDTH)],
            "cls": tf.sparse.to_dense(ex[TF_CLASS]).numpy().tolist(),
            "boxes": tf.sparse.to_dense(ex[TF_BBOX]).numpy().tolist(),
        })
    Path(out).write_text(json.dumps(rows))


def _write(out: str, spec_path: str) -> None:
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    with tf.io.TFRecordWriter(out) as w:
        for r in json.loads(Path(spec_path).read_text()):
            feats = {
                TF_IMAGE: b([base64.b64decode(r["jpeg"])]), TF_KEY: b([r["key"].encode()]),
                TF_SOURCE: b([r["source"].encode()]), TF_HEIGHT: i([r["height"]]), TF_WIDTH: i([r["width"]]),
                TF_ORIG_HEIGHT: i([r["orig_height"]]), TF_ORIG_WIDTH: i([r["orig_width"]]), TF_CLASS: i(r["cls"]),
                TF_BBOX: tf.train.Feature(float_list=tf.train.FloatList(value=r["boxes"])),
            }
            feats.pop(r["drop"], None)
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


if __name__ == "__main__":
    cmd, out, *rest = sys.argv[1:]
    if cmd == "read":
        _read(out, rest)
    else:
        _write(out, rest[0])
