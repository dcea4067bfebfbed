"""nano inference: the context encoded once (its members' keys and values, views and calibration map).

The shipped weights and settings (64 members over three views, calibration on), a numeric table of
``N_FEATURES`` features and three classes, ``N_CONTEXT`` context rows. nano has no estimator of its
own to compare with: the comparison is tabtune with its context cache (``adapter.cache_context``,
on by default) against tabtune with it off, which encodes the context, fits the views and the
calibration map again in every predict, as every predict did before the cache. CPU, one torch
thread, repeats interleaved, medians.

(a) One predict of ``N_QUERY`` rows: without the cache, and with it once the context is encoded
    (a fitted pipeline's second and later predicts); max |difference| of the probabilities.
(b) One fit, then ``N_PREDICTS`` predicts of ``SMALL`` rows: with the cache (counted from the fit,
    so its first predict encodes the context), and without it, timed on ``UNCACHED_PREDICTS``
    predicts and scaled to ``N_PREDICTS``.

Run alone: ``python benchmarks/inference_nano.py [--quick] [--out bench]``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench import timed

FULL = dict(n_context=2048, n_query=1000, repeats=3, n_predicts=10, small=10, uncached_predicts=2, n_features=10,
            n_estimators=64)
# --quick: checks the benchmark runs (under a minute); not figures to quote
QUICK = dict(n_context=512, n_query=200, repeats=1, n_predicts=5, small=10, uncached_predicts=1, n_features=10,
             n_estimators=16)
COMMAND = ".venv/bin/python benchmarks/bench.py --only inference_nano --out bench"


def table(n: int, n_features: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, n_features)), columns=[f"x{i}" for i in range(n_features)])
    score = X["x0"] + 0.5 * X["x1"] - 0.3 * X["x2"] + rng.normal(scale=0.5, size=n)
    y = pd.Series(np.select([score < -0.5, score < 0.5], ["low", "mid"], "high"), name="label")
    return X, y


def process_peak_mb() -> float:
    import torch

    from tabtune_cli.memory import peak_mb

    return peak_mb(torch.device("cpu"))


def measure(quick: bool) -> dict:
    import torch

    size = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(size)
    finally:
        torch.set_num_threads(threads)


def _measure(size: dict) -> dict:
    from tabtune_cli import TabularPipeline

    n_context, n_query, small = size["n_context"], size["n_query"], size["small"]
    X, y = table(n_context + n_query, size["n_features"])
    X_context, y_context, X_query = X.iloc[:n_context], y.iloc[:n_context], X.iloc[n_context:]

    def pipeline():
        return TabularPipeline("nano", model_params={"n_estimators": size["n_estimators"]},
                               tuning_params={"show_progress": False}, device="cpu").fit(X_context, y_context)

    # (a) one predict of n_query rows, the cache off and on (warm)
    pipe = pipeline()
    adapter = pipe.adapter_
    cached = pipe.predict_proba(X_query)  # encodes the context
    uncached_a, cached_a, difference = [], [], 0.0
    for _ in range(size["repeats"]):
        adapter.cache_context = False
        seconds, before = timed(lambda: pipe.predict_proba(X_query))
        uncached_a.append(seconds)
        adapter.cache_context = True
        seconds, after = timed(lambda: pipe.predict_proba(X_query))
        cached_a.append(seconds)
        difference = max(difference, float(np.abs(before - after).max()), float(np.abs(after - cached).max()))
    cache_mb = sum(t.numel() * t.element_size() for kv in next(iter(adapter.context_cache.entries.values()))
                   .ensemble[1] for t in kv) / 2**20
    pipe = adapter = None  # one pipeline's context at a time in this process

    # (b) one fit, then small predicts
    batches = [X_query.iloc[i * small % n_query:][:small] for i in range(size["n_predicts"])]
    cached_b, steady_b, uncached_b, difference_b = [], [], [], 0.0
    pipe_b = None
    for repeat in range(size["repeats"]):
        pipe_b = calls = None  # the last repeat's pipeline and its context go first
        started = time.perf_counter()
        pipe_b = pipeline()
        calls = [timed(lambda b=b: pipe_b.predict_proba(b)) for b in batches]
        cached_b.append(time.perf_counter() - started)
        steady_b.append(statistics.median(s for s, _ in calls[1:]))
        if repeat < size["uncached_predicts"]:  # interleaved: one uncached predict a repeat
            pipe_b.adapter_.cache_context = False
            seconds, answer = timed(lambda: pipe_b.predict_proba(batches[repeat]))
            uncached_b.append(seconds)
            pipe_b.adapter_.cache_context = True
            difference_b = max(difference_b, float(np.abs(answer - calls[repeat][1]).max()))
    while len(uncached_b) < size["uncached_predicts"]:
        pipe_b.adapter_.cache_context = False
        uncached_b.append(timed(lambda: pipe_b.predict_proba(batches[len(uncached_b)]))[0])
    cache = pipe_b.adapter_.context_cache

    median = statistics.median
    per_uncached = median(uncached_b)
    return {
        "sizes": size, "weights": "the shipped nano.safetensors",
        "single": {"uncached_s": median(uncached_a), "cached_s": median(cached_a),
                   "speedup": median(uncached_a) / median(cached_a), "max_abs_diff": difference,
                   "cache_mb": cache_mb, "runs_uncached_s": uncached_a, "runs_cached_s": cached_a},
        "repeated": {"cached_s": median(cached_b), "cached_per_predict_s": median(steady_b),
                     "uncached_per_predict_s": per_uncached, "uncached_s": per_uncached * size["n_predicts"],
                     "speedup": per_uncached * size["n_predicts"] / median(cached_b),
                     "per_predict_speedup": per_uncached / median(steady_b), "max_abs_diff": difference_b,
                     "cache_hits": cache.hits, "cache_misses": cache.misses,
                     "runs_cached_s": cached_b, "runs_uncached_s": uncached_b},
        # the whole process's peak, earlier topics of the same bench run included
        "process_peak_rss_mb": process_peak_mb(),
    }


def markdown(data: dict) -> str:
    size, a, b = data["sizes"], data["single"], data["repeated"]
    n = size["n_predicts"]
    return f"""
The shipped nano, {size['n_estimators']} members over the three views, calibration on; {size['n_context']:,}
context rows of {size['n_features']} numeric features and three classes; CPU, one thread,
{size['repeats']} interleaved repeat(s), medians. "Cache off" (`adapter.cache_context = False`)
encodes the context, fits the views and the calibration map in every predict, as nano's every
predict did before (same operations, so the same answers).

| what | cache off | context cache | ratio | max \\|diff\\| of probabilities |
|---|---|---|---|---|
| one predict of {size['n_query']:,} rows | {a['uncached_s']:.1f} s | {a['cached_s']:.1f} s (context already encoded) | {a['speedup']:.1f}x | {a['max_abs_diff']:.1e} |
| fit + {n} predicts of {size['small']} rows | {b['uncached_s']:.1f} s ({b['uncached_per_predict_s']:.1f} s a predict x {n}) | {b['cached_s']:.1f} s (the first predict encodes the context) | {b['speedup']:.1f}x | {b['max_abs_diff']:.1e} |
| one of those predicts, after the first | {b['uncached_per_predict_s']:.2f} s | {b['cached_per_predict_s'] * 1000:.0f} ms | {b['per_predict_speedup']:.0f}x | |

Target (issue #15): repeated small predicts at least 10x faster than before, the same predictions
(the cache's are those of the uncached path bit for bit; both within 1e-6 of nano's predict before
the cache, `tests/test_nano.py`). What is kept: every member's per-layer context keys and values
({a['cache_mb']:.0f} MiB here: {size['n_estimators']} members x 8 layers x 2 x {size['n_context']:,} rows x 128 x
4 bytes), the views fitted on the context and the calibration map; one context per pipeline, rebuilt
when the weights, the context or a setting change ({b['cache_misses']} miss and {b['cache_hits']} hits in
the last repeat). Counted from the fit, {n} predicts cannot be more than {n}x faster, since the first
encodes the context either way; each predict after it is the ratio in the third row. The cached predict of
{size['n_query']:,} rows is the query pass alone: every query row still attends to the
{size['n_context']:,} context rows in each of the {size['n_estimators']} members and 8 layers.
"""


def run(out_dir: Path, quick: bool) -> dict:
    data = measure(quick)
    (Path(out_dir) / "inference_nano.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"title": "nano inference: the context encoded once",
            "markdown": markdown(data), "data": data,
            "commands": [COMMAND + (" --quick" if quick else ""),
                         ".venv/bin/python -m pytest -q tests/test_nano.py -k 'forward or recipe or reused or once'"]}


if __name__ == "__main__":
    from bench import standalone

    standalone(__doc__, run)
