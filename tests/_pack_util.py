"""Reading packed datasets back in tests (shared by the build, parts and convert tests)."""

from __future__ import annotations

from pathlib import Path

from packer.format import read_manifest
from packer.writers import open_reader


def read_samples(root: Path) -> dict[str, list[tuple]]:
    """split -> every record's fields (JPEG bytes included) in manifest shard order, read from the shards."""
    m = read_manifest(root)
    out = {}
    for split, info in m.splits.items():
        rows = []
        for sh in info.shards:
            with open_reader(m.format, root / sh.path) as r:
                rows += [(x.key, x.source, x.height, x.width, x.orig_height, x.orig_width, x.cls.tolist(),
                          x.boxes.tobytes(), x.jpeg) for x in r]
        out[split] = rows
    return out
