"""The one progress-bar factory (tqdm): packing, verify, convert, push/pull and the trainer's epochs."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar on stderr that follows the terminal's width; a silent no-op unless `enabled`.

    ``unit="B"`` counts bytes in KiB/MiB; `options` go to tqdm as they are (smoothing, leave,
    bar_format, ...). Use it as a context manager or close it.
    """
    from tqdm import tqdm  # imported on first use: importing packer stays fast

    if unit == "B":
        options = {"unit_scale": True, "unit_divisor": 1024, **options}
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, **options)
