"""--cfg my.yaml in ultralytics' default.yaml names: keys that apply act and are recorded, the others are noted,
unknown ones are a one-line usage error with the closest name, and the command line overrides the file."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from _train_util import packed
from click.testing import CliRunner

from trainer.config import TrainConfig, TrainError
from trainer.data.transforms import AugmentConfig
from trainer.hyp import APPLIED_KEYS, augment_config, read_cfg_file, ultralytics_vocabulary
from trainer.run import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"
LOADER_AUG = {f.name for f in fields(AugmentConfig)}
# every key that applies, none at its default (augmentations the loaders lack yet stay at theirs)
EVERY = {
    "epochs": 1, "batch": 4, "imgsz": 64, "lr0": 0.02, "lrf": 0.2, "momentum": 0.9, "weight_decay": 0.001,
    "warmup_epochs": 0.0, "warmup_momentum": 0.7, "warmup_bias_lr": 0.05, "cos_lr": True, "close_mosaic": 0,
    "patience": 5, "nbs": 8, "optimizer": "SGD", "box": 5.0, "cls": 1.0, "dfl": 1.0,
    "hsv_h": 0.02, "hsv_s": 0.5, "hsv_v": 0.3, "degrees": 5.0, "translate": 0.2, "scale": 0.3, "shear": 2.0,
    "perspective": 0.0001, "flipud": 0.1, "fliplr": 0.4, "mosaic": 0.8, "mixup": 0.1,
    "seed": 3, "workers": 0, "fraction": 1.0,
}


def _cfg(tmp_path: Path, data: dict) -> str:
    p = tmp_path / "my.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]


def test_the_list_covers_every_applied_key():
    assert set(EVERY) == set(APPLIED_KEYS)
    assert set(APPLIED_KEYS) <= ultralytics_vocabulary()


def test_ultralytics_own_default_yaml_loads_and_its_defaults_are_ours():
    import ultralytics

    values, ignored = read_cfg_file(Path(ultralytics.__file__).parent / "cfg" / "default.yaml")
    assert set(APPLIED_KEYS) <= set(values) and "copy_paste" in ignored
    # the run options both trainers share act, read in ultralytics' spellings; null keeps our default
    assert values["amp"] == "auto" and values["cache"] is None and values["exist_ok"] is False
    assert values["max_det"] == 300 and "device" not in values and "model" not in values
    d = TrainConfig()
    differ = {k for k in APPLIED_KEYS if values[k] != getattr(d, k)}
    assert differ == {"imgsz", "workers"}  # ours: None = "640, or the packed size if smaller" / "choose for me"


def test_every_applied_key_acts_and_args_yaml_records_it(tmp_path):
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    shards, out = packed(SAMPLE, size=160), tmp_path / "run"
    r = CliRunner().invoke(main, [str(shards), "--cfg", _cfg(tmp_path, {**EVERY, "loader": "torch", "plots": False}),
                                  "--model", "yolov8n.yaml", "--device", "cpu", "--out", str(out), "--no-tensorboard"])
    assert r.exit_code == 0, r.output[-3000:]
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert {k: args[k] for k in EVERY} == EVERY
    assert args["optimizer_resolved"] == "SGD" and args["accumulate"] == 2  # nbs 8 / batch 4
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["lr/pg0"]) == pytest.approx(0.02)  # lr0, no warmup, cosine at 1.0
    assert not list(out.glob("*.jpg"))  # plots: false acted too

    again = tmp_path / "again"  # a run's own args.yaml reproduces it (SHARDS names the data)
    r = CliRunner().invoke(main, [str(shards), "--cfg", str(out / "args.yaml"), "--out", str(again)])
    assert r.exit_code == 0, r.output[-3000:]
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    head, _, records = notes[0].partition("; a run's records are ignored: ")
    assert len(notes) == 1 and set(head.split(": ")[-1].split(", ")) == {"data", "task", "mode", "resume"}
    assert set(records.split(", ")) == {
        "accumulate", "amp_resolved", "device_resolved", "loader_resolved", "lr0_resolved", "names",
        "optimizer_resolved", "momentum_resolved", "save_dir", "shards", "storage_options", "val_split_resolved",
        "warmup_bias_lr_resolved", "world_size"}
    args2 = yaml.safe_load((again / "args.yaml").read_text())
    assert {k: args2[k] for k in (*EVERY, "model", "device", "loader", "plots")} == {
        k: args[k] for k in (*EVERY, "model", "device", "loader", "plots")}

    cfg = TrainConfig(**{k: v for k, v in EVERY.items()})
    aug = augment_config(cfg)
    assert {k: getattr(aug, k) for k in LOADER_AUG} == {k: float(EVERY[k]) for k in LOADER_AUG}
    from trainer.model import prepare_model

    model = prepare_model(cfg, ["a", "b"], torch.device("cpu"), None, lambda s: None)
    assert (model.args.box, model.args.cls, model.args.dfl) == (5.0, 1.0, 1.0)  # the loss reads these


def test_unknown_key_is_exit_2_naming_the_closest_valid_key(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path), "--cfg", _cfg(tmp_path, {"lr0": 0.02, "hsv_hue": 0.1})])
    assert r.exit_code == 2
    assert _error_lines(r) == [f"Error: --cfg {tmp_path / 'my.yaml'}: unknown key 'hsv_hue'; did you mean 'hsv_h'?"]


def test_keys_that_do_not_apply_are_noted_once_and_ignored(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path / "none"), "--cfg",
                                  _cfg(tmp_path, {"copy_paste": 0.5, "project": "x", "close_mosaic": 2, "lr0": 0.02,
                                                  "single_cls": False, "cutmix": 0.0})])
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith(("note:", "warning:"))]
    assert notes == ["note: --cfg keys that do not apply to this trainer are ignored: copy_paste, cutmix, project, "
                     "single_cls",  # file order (safe_dump sorts)
                     # the ones set to other than ultralytics' defaults, apart: asked for, and not applied
                     "warning: --cfg sets copy_paste=0.5, project='x': this trainer does not apply them (they are "
                     "ultralytics options it lacks)"]
    assert "manifest.json not found" in r.stderr  # went on to the data: nothing else was wrong


@pytest.mark.parametrize("flag", ["--lrf", "--hsv_h", "--hsv-h"])
def test_command_line_overrides_the_file(tmp_path, flag):
    key = flag.lstrip("-").replace("-", "_")
    bad = {"lrf": 5.0, "hsv_h": 2.0}[key]  # out of range: reaching the data proves the file value lost
    path = _cfg(tmp_path, {key: bad})
    r = CliRunner().invoke(main, [str(tmp_path / "none"), "--cfg", path])
    assert r.exit_code == 2 and key in _error_lines(r)[0] and "manifest" not in r.stderr
    r = CliRunner().invoke(main, [str(tmp_path / "none"), "--cfg", path, flag, "0.5"])
    assert r.exit_code == 2 and "manifest.json not found" in _error_lines(r)[0]


def test_bad_files_are_one_line_usage_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- lr0\n")
    (tmp_path / "flag.yaml").write_text("cos_lr: maybe\n")
    (tmp_path / "twice.yaml").write_text("lr0: 0.01\nlrf: 0.1\nlr0: 0.02\n")  # plain YAML keeps the last silently
    for name, msg in (("list.yaml", "must be a mapping"), ("flag.yaml", "cos_lr must be true or false"),
                      ("twice.yaml", "key 'lr0' is given twice; keep one"),
                      ("missing.yaml", "cannot read it (no such file")):
        r = CliRunner().invoke(main, [str(tmp_path), "--cfg", str(tmp_path / name)])
        assert r.exit_code == 2 and len(_error_lines(r)) == 1 and msg in r.stderr, r.output


def test_shared_run_options_act_from_the_file(tmp_path):
    """model, device, amp, cache, exist_ok and max_det mean the same in both trainers: a file's value acts
    (a user who writes model: yolov8s.yaml must not train yolo11n); optimizer names in any case, as ultralytics."""
    path = _cfg(tmp_path, {"model": "yolov8s.yaml", "device": "cpu", "amp": False, "cache": True, "exist_ok": True,
                           "max_det": 100, "optimizer": "rmsprop"})
    values, ignored = read_cfg_file(path)
    assert not ignored and values == {"model": "yolov8s.yaml", "device": "cpu", "amp": "off", "cache": "ram",
                                        "exist_ok": True, "max_det": 100, "optimizer": "rmsprop"}
    cfg = TrainConfig(**values)
    cfg.validate()
    assert cfg.optimizer == "RMSprop"
    values, _ = read_cfg_file(_cfg(tmp_path, {"cache": "disk", "amp": "bf16"}))
    assert values == {"cache": "disk", "amp": "bf16"}
    assert read_cfg_file(_cfg(tmp_path, {"device": 0}))[0] == {"device": "cuda:0"}  # ultralytics' GPU index
    assert read_cfg_file(_cfg(tmp_path, {"device": "1"}))[0] == {"device": "cuda:1"}
    for several in ("0,1", [0, 1]):
        with pytest.raises(TrainError, match="torchrun"):
            read_cfg_file(_cfg(tmp_path, {"device": several}))
    r = CliRunner().invoke(main, ["x", "--cfg", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "no such file" in r.stderr
