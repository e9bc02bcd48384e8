"""Fuzz the LMDB reader's guard: random bytes in page headers and node pointers of a packed LMDB
shard, checksums resealed (as an attacker would), then `packer verify` in a child process.

Every run must end with exit 0 (a change LMDB never reads) or 1 (refused in one line); a signal
(-7 SIGBUS, -11 SIGSEGV) or a traceback is a failure. Not a test (minutes, random); README's
figure comes from it:

    .venv/bin/python benchmarks/fuzz_lmdb.py --seeds 200 [--first 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packer.build import build_dataset
from packer.format import MANIFEST_NAME, sha256_file

ROOT = Path(__file__).resolve().parents[1]
PACKER = Path(sys.executable).parent / "packer"


def _reseal(ds: Path) -> None:
    doc = json.loads((ds / MANIFEST_NAME).read_text())
    for split in doc["splits"].values():
        for sh in split["shards"]:
            sh["bytes"], sh["sha256"] = (ds / sh["path"]).stat().st_size, sha256_file(ds / sh["path"])
    (ds / MANIFEST_NAME).write_text(json.dumps(doc))


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    """Half the time 1, 2 or 4 random bytes, mostly in the first 64 bytes of a page; half the time
    one pointer or size field of a branch/leaf page (a node pointer, a node's sizes) set large:
    random bytes alone rarely reach a read past the file."""
    d = bytearray(data)
    psize = int.from_bytes(d[40:44], "little")
    node_pages = [p for p in range(2, len(d) // psize) if d[p * psize + 10] in (1, 2)]
    if rnd.random() < 0.5 or not node_pages:
        for _ in range(rnd.choice([1, 2, 4])):
            page = rnd.randrange(len(d) // psize)
            d[page * psize + rnd.randrange(64 if rnd.random() < 0.7 else psize)] = rnd.randrange(256)
        return bytes(d)
    base = rnd.choice(node_pages) * psize
    lower = int.from_bytes(d[base + 12 : base + 14], "little")
    slot = base + 16 + 2 * rnd.randrange(max(1, (lower - 16) // 2))
    node = base + int.from_bytes(d[slot : slot + 2], "little")
    field = rnd.choice([slot, node, node + 2, node + 6])  # pointer, data size lo/hi, key size
    value = rnd.randrange(psize - 64, 1 << 16)
    if field + 2 <= len(d):
        d[field : field + 2] = value.to_bytes(2, "little")
    return bytes(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--first", type=int, default=0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fuzz-lmdb-"))
    try:
        base = work / "base"
        build_dataset(ROOT / "samples" / "coco", base, fmt="lmdb", size=128, workers=1)
        shard = "val2017/data.lmdb"
        good = (base / shard).read_bytes()
        codes: collections.Counter = collections.Counter()
        bad: list[tuple[int, int, str]] = []
        for seed in range(a.first, a.first + a.seeds):
            ds = work / "f"
            shutil.rmtree(ds, ignore_errors=True)
            shutil.copytree(base, ds)
            (ds / shard).write_bytes(_mutate(good, random.Random(seed)))
            _reseal(ds)
            r = subprocess.run([str(PACKER), "verify", str(ds)], capture_output=True, text=True, timeout=120)
            codes[r.returncode] += 1
            if r.returncode not in (0, 1) or "Traceback" in r.stderr:
                bad.append((seed, r.returncode, r.stderr.strip()[-200:]))
        print(f"{a.seeds} mutated shards: exit codes {dict(sorted(codes.items()))}")
        for seed, rc, tail in bad:
            print(f"  seed {seed}: exit {rc} {tail}")
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
