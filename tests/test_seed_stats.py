"""The learn benchmark's seed statistics (benchmarks/_seed_stats.py) on cases whose answer is known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _seed_stats import compare_seeds, pool_runs  # noqa: E402


def test_same_scores_are_indistinguishable():
    s = compare_seeds([0.10, 0.12, 0.09, 0.11], [0.10, 0.12, 0.09, 0.11], paired=4, rounds=2000)
    assert s["mean_ratio"] == 1.0 and s["permutation_p"] == 1.0 and s["wins"] == 0
    assert s["ci95_low"] < 1.0 < s["ci95_high"]


def test_separated_scores_are_told_apart():
    ours, theirs = [0.20, 0.21, 0.19, 0.22, 0.20, 0.21], [0.10, 0.11, 0.09, 0.12, 0.10, 0.11]
    s = compare_seeds(ours, theirs, paired=6, rounds=4000)
    assert s["permutation_p"] < 0.01 and s["ci95_low"] > 1.5 and s["wins"] == 6


def test_identical_trainer_draws_match_counting():
    """Pooled 0.1 x3 and 0.2 x3: a 3-vs-3 split has the lower median first in 10 of the 20
    equally likely splits (two or three 0.1s drawn first), so the ratio is 0.5 half the time."""
    s = compare_seeds([0.1] * 3, [0.2] * 3, rounds=4000)
    assert abs(s["null_3seed_below"] - 0.5) < 0.04 and abs(s["null_3seed_at_least_1"] - 0.5) < 0.04
    same = compare_seeds([0.1] * 4, [0.1] * 4, rounds=500)
    assert same["null_3seed_below"] == 0.0 and same["null_3seed_at_least_1"] == 1.0


def _learn_json(path: Path, epochs: int, runs: dict[str, float]) -> str:
    res = {"args": {"epochs": epochs, "imgsz": 256}, "sets": {"dense": {"runs": {
        k: {"val": {"map": v}} for k, v in runs.items()}}}}
    path.write_text(json.dumps(res))
    return str(path)


def test_pool_runs_joins_files_of_the_same_settings_only(tmp_path):
    a = _learn_json(tmp_path / "a.json", 15, {"ours/0": 0.1, "ultralytics/0": 0.2})
    b = _learn_json(tmp_path / "b.json", 15, {"ours/5": 0.3, "ours/0": 0.9})
    same = ("epochs", "imgsz", "pack_chroma")
    pooled = pool_runs([a, b], "map", same)
    assert pooled == {"dense": {"ours": {0: 0.1, 5: 0.3}, "ultralytics": {0: 0.2}}}  # first file wins a seed
    c = _learn_json(tmp_path / "c.json", 30, {"ours/1": 0.1})
    with pytest.raises(SystemExit, match="epochs"):
        pool_runs([a, c], "map", same)
    d = tmp_path / "d.json"  # a newer file that records the setting the older ones left out
    d.write_text(json.dumps({"args": {"epochs": 15, "imgsz": 256, "pack_chroma": "420"}, "sets": {}}))
    with pytest.raises(SystemExit, match="pack_chroma"):
        pool_runs([a, str(d)], "map", same)
    assert pool_runs([a, str(d)], "map", same, {"pack_chroma": "420"}) == pool_runs([a], "map", same)
