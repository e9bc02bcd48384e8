"""`packer.preview.write_preview`: boxes drawn where the labels are, in every format, local and by URL.

The synthetic set has one solid-colour rectangle per image on a plain grey background; the
rectangle colours are far from ultralytics' class colours, so a pixel of a class colour can only
be a drawn box outline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from packer.build import build_dataset
from packer.format import LabelArrays, read_manifest
from packer.preview import GAP, PALETTE, PreviewDataError, PreviewError, tile_layout, write_preview
from tests._servers import http_files

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["yellow", "magenta", "green"]
FILL = [(230, 230, 30), (200, 30, 200), (20, 120, 20)]  # RGB, none near PALETTE[0..2]
# (width, height, class, x0, y0, box w, box h) in original pixels; one box per image
SHAPES = [(240, 160, 0, 30, 40, 120, 80), (160, 200, 1, 20, 60, 100, 110),
          (200, 200, 2, 50, 30, 90, 140), (256, 128, 0, 100, 20, 120, 90)]


def _synthetic(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (w, h, c, x0, y0, bw, bh) in enumerate(SHAPES):
        img = np.full((h, w, 3), 128, np.uint8)
        img[y0:y0 + bh, x0:x0 + bw] = FILL[c]
        cv2.imwrite(str(root / "images" / f"im{i}.png"), img[:, :, ::-1])
        (root / "labels" / f"im{i}.txt").write_text(
            f"{c} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("preview-src") / "yolo")


def _pack(src: Path, out: Path, fmt: str) -> Path:
    build_dataset(src, out, fmt=fmt, size=256, workers=1, shard_size=2, progress=False)
    return out


def _near(px: np.ndarray, rgb: tuple[int, int, int], tol: int = 45) -> bool:
    return bool(np.all(np.abs(px.astype(int) - np.array(rgb[::-1])) <= tol))  # px is BGR


def _check_outlines(grid: np.ndarray, shards: Path, imgsz: int) -> None:
    """Each sample's box outline is drawn in its class colour at the labelled place; its inside keeps the fill."""
    m = read_manifest(shards)
    la = LabelArrays.load(shards / m.splits["train"].labels)  # tiles follow shard order = labels.npz order
    cols, rows, t = tile_layout(len(la), imgsz)
    assert grid.shape[:2] == (rows * t + (rows - 1) * GAP, cols * t + (cols - 1) * GAP)
    for i, src in enumerate(la.sources.tolist()):
        w, h, c, x0, y0, bw, bh = SHAPES[int(Path(src).stem[2:])]
        r = t / max(w, h)
        ox = (i % cols) * (t + GAP) + (t - round(w * r)) // 2  # letterbox origin of this tile's image
        oy = (i // cols) * (t + GAP) + (t - round(h * r)) // 2
        left, right = round(ox + x0 * r), round(ox + (x0 + bw) * r)
        top, bottom = round(oy + y0 * r), round(oy + (y0 + bh) * r)
        mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
        colour = PALETTE[c]
        for y, x in ((mid_y, left), (mid_y, right), (bottom, mid_x)):
            assert _near(grid[y, x], colour), (src, (y, x), grid[y, x], colour)
        assert _near(grid[mid_y, mid_x], FILL[c], tol=30), (src, "inside", grid[mid_y, mid_x])
        assert _near(grid[mid_y, left - 8], (128, 128, 128), tol=30), (src, "outside", grid[mid_y, left - 8])


@pytest.mark.parametrize("fmt", ["tfrecord", "wds", "lmdb"])
def test_boxes_drawn_where_labels_are(synthetic: Path, tmp_path: Path, fmt: str) -> None:
    shards = _pack(synthetic, tmp_path / "shards", fmt)
    out = write_preview(str(shards), str(tmp_path / "p.jpg"), n=16, imgsz=320)
    assert out == tmp_path / "p.jpg"
    assert not list(tmp_path.glob(".p.jpg*")), "temp file left behind"
    _check_outlines(cv2.imread(str(out)), shards, 320)


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_url_draws_the_same_as_the_folder(synthetic: Path, tmp_path: Path, fmt: str) -> None:
    shards = _pack(synthetic, tmp_path / "shards", fmt)
    local = write_preview(str(shards), str(tmp_path / "a.jpg"), n=16, imgsz=320)
    with http_files(tmp_path) as base:
        remote = write_preview(f"{base}/shards", str(tmp_path / "b.jpg"), n=16, imgsz=320)
    file_url = write_preview(shards.resolve().as_uri(), str(tmp_path / "c.jpg"), n=16, imgsz=320)
    assert local.read_bytes() == remote.read_bytes() == file_url.read_bytes()
    _check_outlines(cv2.imread(str(remote)), shards, 320)


def test_seed_and_n_pick_samples(synthetic: Path, tmp_path: Path) -> None:
    shards = _pack(synthetic, tmp_path / "shards", "tfrecord")
    a = cv2.imread(str(write_preview(str(shards), str(tmp_path / "a.jpg"), n=1, seed=0, imgsz=64)))
    assert a.shape == (64, 64, 3)
    shots = {cv2.imread(str(write_preview(str(shards), str(tmp_path / "x.jpg"), n=1, seed=s, imgsz=64))).tobytes()
             for s in range(6)}
    assert len(shots) > 1, "the seed does not change the samples"


def test_bad_requests_are_one_line_errors(synthetic: Path, tmp_path: Path) -> None:
    shards = _pack(synthetic, tmp_path / "shards", "tfrecord")
    for kwargs, words in (({"split": "val"}, "no split 'val'"), ({"n": 0}, "-n"), ({"imgsz": 100}, "--imgsz")):
        with pytest.raises(PreviewError, match=words):
            write_preview(str(shards), str(tmp_path / "p.jpg"), **kwargs)
    with pytest.raises(PreviewError, match=r"\.jpg"):
        write_preview(str(shards), str(tmp_path / "p.png"))
    with pytest.raises(PreviewError, match="manifest"):
        write_preview(str(tmp_path), str(tmp_path / "p.jpg"))
    assert not (tmp_path / "p.jpg").exists()


def test_a_damaged_lmdb_record_is_a_data_error_not_a_garbled_picture(synthetic: Path, tmp_path: Path) -> None:
    """LMDB has no per-record checksum: the strict decode catches the damage (exit 1 on the CLI)."""
    shards = _pack(synthetic, tmp_path / "shards", "lmdb")
    env = shards / read_manifest(shards).splits["train"].shards[0].path
    data = bytearray(env.read_bytes())
    soi = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    for i in soi:
        at = i + 2000  # inside each stored JPEG's entropy-coded data
        data[at:at + 64] = bytes(64)
    env.write_bytes(bytes(data))
    r = subprocess.run([str(Path(sys.executable).parent / "packer"), "preview", str(shards), "-o",
                        str(tmp_path / "p.jpg"), "-n", "4"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Corrupt JPEG" not in ln]
    assert r.returncode == 1 and len(lines) == 1 and "verify --deep" in lines[0], r.stderr
    assert not (tmp_path / "p.jpg").exists()


def test_corrupt_shard_is_a_data_error(synthetic: Path, tmp_path: Path) -> None:
    shards = _pack(synthetic, tmp_path / "shards", "tfrecord")
    shard = shards / read_manifest(shards).splits["train"].shards[0].path
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first record: its CRC no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(PreviewDataError, match="CRC"):
        write_preview(str(shards), str(tmp_path / "p.jpg"), n=16)
    assert not (tmp_path / "p.jpg").exists()


def test_missing_or_junk_label_arrays_are_a_data_error(synthetic: Path, tmp_path: Path) -> None:
    """The stored grid draws the records' boxes, but a split the trainer would refuse is refused here too."""
    shards = _pack(synthetic, tmp_path / "shards", "tfrecord")
    labels = shards / read_manifest(shards).splits["train"].labels
    labels.write_bytes(b"not an npz")
    with pytest.raises(PreviewDataError, match="labels.npz"):
        write_preview(str(shards), str(tmp_path / "p.jpg"), n=4)
    labels.unlink()
    with pytest.raises(PreviewDataError, match="labels.npz"):
        write_preview(str(shards), str(tmp_path / "p.jpg"), n=4)
    assert not (tmp_path / "p.jpg").exists()


def test_cli_writes_the_grid_and_maps_errors_to_exit_codes(synthetic: Path, tmp_path: Path) -> None:
    shards = _pack(synthetic, tmp_path / "shards", "wds")
    run = [sys.executable, "-m", "packer.cli", "preview", str(shards)]
    ok = subprocess.run([*run, "-n", "4", "--imgsz", "64", "-o", str(tmp_path / "g.jpg")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "g.jpg") and cv2.imread(ok.stdout.strip()) is not None
    usage = subprocess.run([*run, "--split", "nope", "-o", str(tmp_path / "u.jpg")], capture_output=True, text=True)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr
    shard = shards / read_manifest(shards).splits["train"].shards[0].path
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # the manifest's sha256 no longer matches: a data error
    shard.write_bytes(bytes(data))
    bad = subprocess.run([*run, "-n", "16", "-o", str(tmp_path / "b.jpg")], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "u.jpg").exists() and not (tmp_path / "b.jpg").exists()


_PROBE = """
import json, sys
from packer.preview import write_preview
write_preview(sys.argv[1], sys.argv[2], n=4, imgsz=64)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ultralytics", "tensorflow", "nvidia"})))
"""


def test_stored_preview_imports_no_training_stack(synthetic: Path, tmp_path: Path) -> None:
    shards = _pack(synthetic, tmp_path / "shards", "lmdb")
    r = subprocess.run([sys.executable, "-c", _PROBE, str(shards), str(tmp_path / "p.jpg")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert cv2.imread(str(tmp_path / "p.jpg")).shape == (64 * 2 + GAP, 64 * 2 + GAP, 3)


def test_augmented_preview_is_the_loaders_batch_drawn_by_ultralytics(synthetic: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    shards = _pack(synthetic, tmp_path / "shards", "wds")
    out = write_preview(str(shards), str(tmp_path / "aug.jpg"), n=4, imgsz=128, augment=True, seed=1)
    grid = cv2.imread(str(out))
    assert grid.shape == (256, 256, 3)  # plot_images: ceil(sqrt(4)) x 128 px
    # the images hold no class colour: pixels of one are box outlines (ultralytics draws them in PALETTE)
    drawn = sum(int(np.all(np.abs(grid.astype(int) - np.array(PALETTE[c][::-1])) <= 30, axis=2).sum())
                for c in range(len(NAMES)))
    assert drawn > 50
