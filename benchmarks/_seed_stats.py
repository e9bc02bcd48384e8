"""How much a seed-to-seed spread lets a few training runs say: two trainers' scores over seeds.

At the learn benchmark's budget one trainer's mAP50-95 spreads ±25 % across seeds, so a
three-seed median ratio moves by more than the gaps we look for. These figures say how far.
Resampling (numpy only) rather than a t-test: scipy is not a dependency, and with 5-10 runs
per side a permutation p makes no normality assumption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def compare_seeds(ours: list[float], theirs: list[float], *, paired: int = 0, small: int = 3,
                  below: float = 0.93, rounds: int = 20000, seed: int = 0) -> dict[str, float]:
    """Mean and median ratio ours/theirs, a bootstrap 95 % interval of the mean ratio, a two-sided
    permutation p of the mean difference, and, if both trainers drew from one pooled
    distribution, how often a `small`-seed median ratio falls below `below` or reaches 1.0.
    The first `paired` runs of both lists share their training seeds (counted as wins)."""
    a, b = np.asarray(ours, float), np.asarray(theirs, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two runs per trainer")
    rng = np.random.default_rng(seed)
    boot = [rng.choice(a, len(a)).mean() / rng.choice(b, len(b)).mean() for _ in range(rounds)]
    pool, diff = np.concatenate([a, b]), abs(a.mean() - b.mean())
    perm, small_ratio = np.empty(rounds), np.empty(rounds)
    for i in range(rounds):
        p = rng.permutation(pool)
        perm[i] = abs(p[:len(a)].mean() - p[len(a):].mean())
        small_ratio[i] = np.median(p[:small]) / np.median(p[small:2 * small])
    return {
        "n_ours": len(a), "n_theirs": len(b),
        "mean_ours": float(a.mean()), "mean_theirs": float(b.mean()),
        "mean_ratio": float(a.mean() / b.mean()), "median_ratio": float(np.median(a) / np.median(b)),
        "ci95_low": float(np.percentile(boot, 2.5)), "ci95_high": float(np.percentile(boot, 97.5)),
        "permutation_p": float(np.mean(perm >= diff - 1e-12)),
        "wins": int(np.sum(a[:paired] > b[:paired])), "paired": paired,
        f"null_{small}seed_below": float(np.mean(small_ratio < below)),
        f"null_{small}seed_at_least_1": float(np.mean(small_ratio >= 1.0)),
    }


def format_comparison(name: str, s: dict[str, float], small: int = 3, below: float = 0.93) -> str:
    """One paragraph a person reads: what the runs show and what they cannot."""
    return (f"{name}: {s['n_ours']} vs {s['n_theirs']} seeds, means {s['mean_ours']:.4f} vs {s['mean_theirs']:.4f} "
            f"(ratio {s['mean_ratio']:.3f}, bootstrap 95 % {s['ci95_low']:.2f}-{s['ci95_high']:.2f}; "
            f"median ratio {s['median_ratio']:.3f}), permutation p {s['permutation_p']:.2f}, "
            f"ours ahead on {s['wins']} of {s['paired']} same seeds; if the two were one trainer, a {small}-seed "
            f"median ratio would be < {below} in {100 * s[f'null_{small}seed_below']:.0f} % of draws "
            f"and >= 1.0 in {100 * s[f'null_{small}seed_at_least_1']:.0f} %")


def pool_runs(files: list[str], key: str, same: tuple[str, ...],
              defaults: dict[str, object] | None = None) -> dict[str, dict[str, dict[int, float]]]:
    """{set: {trainer: {seed: score}}} from several learn.json files whose args agree on `same`
    (`defaults`: the values of settings that older files did not record); refuses the rest, since
    a pooled figure must compare like with like. The first file to hold a seed wins."""
    defaults = defaults or {}
    pooled: dict[str, dict[str, dict[int, float]]] = {}
    first: dict | None = None
    for f in files:
        res = json.loads(Path(f).read_text())
        args = {k: res.get("args", {}).get(k, defaults.get(k)) for k in same}
        if first is not None and args != first:
            diff = [k for k in same if args[k] != first[k]]
            raise SystemExit(f"--stats: {f} was made with other settings ({', '.join(diff)})")
        first = args
        for name, r in res.get("sets", {}).items():
            for run, v in r.get("runs", {}).items():
                who, seed = run.split("/")
                pooled.setdefault(name, {}).setdefault(who, {}).setdefault(int(seed), v["val"][key])
    return pooled


def print_pooled(pooled: dict[str, dict[str, dict[int, float]]]) -> None:
    """The seed statistics of every set and trainer against ultralytics, in seed order."""
    for name, by_who in pooled.items():
        theirs = by_who.get("ultralytics", {})
        for who, scores in by_who.items():
            if who == "ultralytics" or len(scores) < 2 or len(theirs) < 2:
                continue
            shared = sorted(set(scores) & set(theirs))
            a = [scores[s] for s in shared + sorted(set(scores) - set(shared))]
            b = [theirs[s] for s in shared + sorted(set(theirs) - set(shared))]
            print(format_comparison(f"{name}, {who} / ultralytics", compare_seeds(a, b, paired=len(shared))))
