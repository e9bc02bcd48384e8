"""Shared test set-up: offline ultralytics in a throw-away config dir, data paths."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
SAMPLES = ROOT / "samples"

if "YOLO_CONFIG_DIR" not in os.environ:
    # one throw-away dir per test session (subprocesses inherit it), removed when pytest exits
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="yolo-cfg-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)
os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"{COCO128} not present")
    return COCO128


def mount(args: list[str]) -> bool:
    """`mount ARGS` as root; False where that cannot be done here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 160 KB file system: writes past it fail with ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount(["-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)]):
        pytest.skip("mounting a tiny tmpfs needs root (test_file_size_limit covers the same path)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)
