"""`packer info`: what a packed dataset holds, from its manifest and label arrays only."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from packer.storage.location import DatasetLocation


def dataset_info(root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Splits, counts, per-class box/image counts and shard balance of a packed dataset in a
    folder or at a URL (its manifest and label arrays are read; shard files are only listed, and
    one missing or of another size is DamagedDataset, exit 1; over http they are not listed)."""
    loc = DatasetLocation(root, storage_options)
    m = loc.manifest()
    shards_checked = loc.check_shard_files()
    splits: dict[str, Any] = {}
    for name, s in m.splits.items():
        labels = loc.labels(name)
        per_image = np.diff(labels.offsets)
        # images containing each class: count unique (sample, class) pairs
        sample_of_box = np.repeat(np.arange(len(labels)), per_image)
        pairs = np.unique(np.stack([sample_of_box, labels.cls]), axis=1) if len(labels.cls) else np.zeros((2, 0), int)
        images_per_class = np.bincount(pairs[1], minlength=len(m.names))[: len(m.names)]
        samples = [sh.num_samples for sh in s.shards]
        sizes = [sh.bytes for sh in s.shards]
        splits[name] = {
            "num_samples": s.num_samples,
            "num_boxes": s.num_boxes,
            "background_images": int((per_image == 0).sum()),
            "boxes_per_image": round(float(per_image.mean()), 3) if len(per_image) else 0.0,
            "stored_long_side": [int(labels.hw.max(1).min()), int(labels.hw.max(1).max())] if len(labels) else [0, 0],
            "classes": [
                {"id": i, "name": n, "boxes": int(s.class_counts[i]), "images": int(images_per_class[i])}
                for i, n in enumerate(m.names)
            ],
            "shards": {
                "count": len(s.shards),
                "samples_min": min(samples, default=0),
                "samples_max": max(samples, default=0),
                "bytes_total": sum(sizes),
                "bytes_min": min(sizes, default=0),
                "bytes_max": max(sizes, default=0),
            },
        }
    return {
        "root": loc.display,
        "format": m.format,
        "format_version": m.format_version,
        "size": m.size,
        "num_classes": len(m.names),
        "source": m.source,
        "packer_version": m.packer_version,
        "options": m.options,
        "shard_files_checked": shards_checked,
        "splits": splits,
    }


def format_info(info: dict[str, Any], max_classes: int = 100) -> str:
    """Human-readable tables for `dataset_info` output."""
    lines = [
        f"{info['root']}: {info['format']} (format v{info['format_version']}), long side {info['size']} px, "
        f"{info['num_classes']} classes, from {info['source'].get('layout')} {info['source'].get('path')}",
        "",
        f"{'split':<10}{'images':>9}{'boxes':>9}{'backgr.':>9}{'shards':>8}{'samples/shard':>16}{'MB':>10}",
    ]
    for name, s in info["splits"].items():
        sh = s["shards"]
        lines.append(
            f"{name:<10}{s['num_samples']:>9}{s['num_boxes']:>9}{s['background_images']:>9}{sh['count']:>8}"
            f"{str(sh['samples_min']) + '-' + str(sh['samples_max']):>16}{sh['bytes_total'] / 1e6:>10.1f}"
        )
    split_names = list(info["splits"])
    lines += ["", f"{'id':>4}  {'class':<20}" + "".join(f"{n + ' boxes':>14}{'imgs':>6}" for n in split_names)]
    rows = []
    for i in range(info["num_classes"]):
        cells = [info["splits"][n]["classes"][i] for n in split_names]
        if not any(c["boxes"] for c in cells):
            continue
        rows.append(f"{i:>4}  {cells[0]['name'][:20]:<20}" + "".join(f"{c['boxes']:>14}{c['images']:>6}" for c in cells))
    lines += rows[:max_classes]
    if len(rows) > max_classes:
        lines.append(f"... {len(rows) - max_classes} more classes (--json for all)")
    empty = info["num_classes"] - len(rows)
    if empty:
        lines.append(f"({empty} classes have no boxes in any split)")
    return "\n".join(lines)
