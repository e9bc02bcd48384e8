"""Make ultralytics work with no network: entry points call `setup_offline()` once, before importing it.

ultralytics otherwise downloads fonts (even with plots off), checks for updates and
syncs settings; on a machine with no internet those calls stall or fail. Nothing runs at import:
`python -m trainer.run` calls it first thing in `main`, `trainer.loop.train` again (a no-op then) for
callers that import the library directly; those should call it themselves before importing
ultralytics so that its import-time connectivity check sees ``YOLO_OFFLINE`` too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_done = False


def setup_offline(config_dir: str | os.PathLike | None = None, *, users_ultralytics: bool = False) -> None:
    """Set ultralytics' offline environment and pre-place its fonts. Idempotent.

    `users_ultralytics` (the plug-in, inside the user's own `YOLO().train()`): only what keeps it
    offline (YOLO_OFFLINE also keeps its analytics off). Their console output, their settings
    file and its runs/weights folders stay theirs; the fonts go where ultralytics would have
    downloaded them. Otherwise (our own CLI and library) ultralytics is quiet and keeps its
    settings in ~/.config/packer-trainer."""
    global _done
    if _done:
        return
    os.environ.setdefault("YOLO_OFFLINE", "true")  # literal "true": older versions ignore "1"
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    if not users_ultralytics:
        os.environ.setdefault("YOLO_VERBOSE", "false")
        cfg = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".config" / "packer-trainer")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
        Path(os.environ["YOLO_CONFIG_DIR"], "Ultralytics").mkdir(parents=True, exist_ok=True)

    import matplotlib
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    if not users_ultralytics:
        SETTINGS.update({"sync": False})
    # check_det_dataset / plotting fetch Arial over HTTP unless the file is already there
    dejavu = Path(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans.ttf")
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (USER_CONFIG_DIR / name).exists():
            shutil.copy(dejavu, USER_CONFIG_DIR / name)
    _done = True
