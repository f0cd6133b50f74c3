"""Pure statistics of the comparison: Student-t and bootstrap CIs over seeds and items, paired differences."""

from __future__ import annotations

import math
from collections.abc import Collection

# Two-sided 95% Student-t quantiles t_{0.975, df}; larger df fall back to the closest smaller entry.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}


def ci95(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided 95% Student-t interval); half-width None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = T975[max(k for k in T975 if k <= df)] if df <= max(T975) else 1.960
    return mean, t * sd / math.sqrt(n)


def item_means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {i: sum(v) / len(v) for i, v in scores.items()}


def bootstrap_ci(values: list[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over ``n`` resamples of the values with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff(a: dict[str, list[float]], b: dict[str, list[float]], n: int, seed: int = 0) -> dict:
    """Mean over the common items of (a's seed-mean ROUGE-L - b's) with its 95% bootstrap CI over items.
    Both models were sampled with the same seeds on the same prompts, so each item is a pair."""
    ma, mb = item_means(a), item_means(b)
    items = sorted(set(ma) & set(mb), key=int)
    mean, lo, hi = bootstrap_ci([ma[i] - mb[i] for i in items], n, seed)
    return {"diff": mean, "ci95": [lo, hi], "n_items": len(items), "excludes_0": lo > 0 or hi < 0}


def statistics(summaries: dict[str, dict], n_bootstrap: int, ablations: Collection[str]) -> tuple[dict, dict]:
    """Item-bootstrap CIs per model and test set (``summaries[name]["item_scores"]``), and the paired
    differences: minillm - every other model, and every ablation (a name in ``ablations``) - minillm."""
    ci, paired = {}, {}
    for name, sm in summaries.items():
        for ds, sc in sm["item_scores"].items():
            mean, lo, hi = bootstrap_ci(list(item_means(sc).values()), n_bootstrap)
            ci.setdefault(name, {})[ds] = {"mean": mean, "ci95": [lo, hi]}
    if "minillm" in summaries:
        ref = summaries["minillm"]["item_scores"]
        for name, sm in summaries.items():
            if name == "minillm":
                continue
            a, b = (sm["item_scores"], ref) if name in ablations else (ref, sm["item_scores"])
            label = f"{name} - minillm" if name in ablations else f"minillm - {name}"
            paired[label] = {ds: paired_diff(a[ds], b[ds], n_bootstrap) for ds in a if ds in b}
    return ci, paired
