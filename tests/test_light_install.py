"""The base `packer` install: packing must not pull in the training stack.

A data-pipeline job that only packs installs `pip install packer-trainer` (no extras); if
any packer command imported torch, TensorFlow, DALI or ultralytics it would fail there.
`make check-light` goes further and installs the base package into a fresh venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorflow", "nvidia.dali", "ultralytics", "webdataset")

# Runs packer build/info/verify in a fresh interpreter, then lists heavy modules it loaded.
_PROBE = """
import json, sys
from packer.cli import main
out = sys.argv[1]
for fmt in ("tfrecord", "wds", "lmdb"):
    dest = f"{out}/{fmt}"
    for argv in (["build", "samples/coco", "-o", dest, "--format", fmt, "--size", "64", "--workers", "1"],
                 ["info", dest], ["verify", dest, "--deep"]):
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code, (argv, e.code)
heavy = sorted({m.split(".")[0] if not m.startswith("nvidia.dali") else "nvidia.dali"
                for m in sys.modules if m.split(".")[0] in {"torch", "tensorflow", "ultralytics", "webdataset"}
                or m.startswith("nvidia.dali")})
print(json.dumps(heavy))
"""


def test_packer_commands_import_no_training_stack(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == [], f"packer imported {loaded}: they belong to the [train] extra"
    assert all((out / fmt / "manifest.json").is_file() for fmt in ("tfrecord", "wds", "lmdb"))
