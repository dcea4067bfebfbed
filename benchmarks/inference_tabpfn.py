"""TabPFN: tabtune's inference against the tabpfn package's own estimator, same checkpoint file both sides.

(a) fit + predict of 1k context rows and 1k queries: seconds both sides, their ratio, the largest
    difference in probabilities and how often the argmax agrees (and the regressor's largest difference);
(b) one fit, then 10 predicts of 10 rows: tabtune (its context cache, ``model.kv_cache=true``) against the estimator's
    ``fit_mode="fit_with_cache"``, tabtune with its cache off, and tabtune's adapter as it was before
    issue #15 (raw forward per ensemble member, no cache).

Random weights at TabPFN v2's default size (emsize 192, 12 layers, 6 heads; noise on every weight, since the
package zero-initialises the output projections), written in the official format by tabtune's
``write_checkpoint`` and loaded by both sides from that one file. CPU, one torch thread, one preprocessing
job; runs interleaved, medians reported. The estimator is handed the float matrix tabtune's shared
preprocessor makes of the table (the boundary: tabtune turns categoricals, dates and text into numbers
first); tabtune's side is the user's path, ``TabularPipeline`` on the DataFrame.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

N_FEATURES = 10
N_CLASSES = 3


def _default_size_checkpoint(folder: Path, task) -> Path:
    """A random-weight TabPFN v2 checkpoint of the default size, in the official format (tabtune's writer)."""
    from tabpfn.architectures import tabpfn_v2

    from tabtune_cli.models.registry import get_adapter

    adapter = get_adapter("tabpfn")
    regression = not task.is_classification
    config = tabpfn_v2.TabPFNV2Config(max_num_classes=0 if regression else 10, num_buckets=5000 if regression else -1)
    architecture = {"architecture_name": "tabpfn_v2", "config": dataclasses.asdict(config),
                    "estimator": "regressor" if regression else "classifier"}
    torch.manual_seed(0)
    module = adapter.from_architecture(architecture)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name == "regression_borders":
                levels = torch.linspace(0.0005, 0.9995, len(tensor), dtype=torch.float64)
                tensor.copy_(torch.distributions.Normal(0.0, 1.0).icdf(levels).float())
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    return adapter.write_checkpoint(module, architecture, task, folder)


def _table(n: int, regression: bool, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, N_FEATURES)), columns=[f"f{i}" for i in range(N_FEATURES)])
    X["colour"] = rng.choice(["red", "green", "blue", "grey"], size=n)
    score = X["f0"] + 0.5 * X["f1"] - 0.3 * X["f2"] + np.where(X["colour"] == "red", 0.7, 0.0)
    if regression:
        return X, pd.Series(score + 0.1 * rng.normal(size=n), name="target")
    return X, pd.Series(np.digitize(score, [-0.5, 0.5]).astype(str), name="label")


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _pipeline(path: Path, n_estimators: int, task_type: str, kv_cache: bool = False):
    from tabtune_cli import TabularPipeline

    return TabularPipeline(model_name="tabpfn", task_type=task_type, tuning_strategy="inference",
                           tuning_params={"show_progress": False}, device="cpu", seed=0,
                           model_params={"checkpoint": str(path), "n_estimators": n_estimators, "kv_cache": kv_cache})


def _estimator(path: Path, n_estimators: int, regression: bool, fit_mode: str = "fit_preprocessors"):
    from tabpfn import TabPFNClassifier, TabPFNRegressor

    kwargs = dict(model_path=str(path), n_estimators=n_estimators, random_state=0, device="cpu",
                  fit_mode=fit_mode, ignore_pretraining_limits=True, n_preprocessing_jobs=1)
    return TabPFNRegressor(**kwargs) if regression else TabPFNClassifier(softmax_temperature=0.9, **kwargs)


def _before_issue_15(pipe, X_query: pd.DataFrame) -> np.ndarray:
    """tabtune's TabPFN predict before #15: each member a feature order x class shift of tabtune's own
    columns, fed to the raw forward (no per-member preprocessing, nothing cached between calls)."""
    from tabtune_cli.models.base import ensemble_predict

    adapter, module, task, config = pipe.adapter_, pipe.module_, pipe.task_, pipe.model_config_
    Xc, yc, Xq = pipe.context_X_, pipe.context_y_, pipe.preprocessor_.transform(X_query)

    @torch.no_grad()
    def forward(Xc, yc, Xq):
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)[None]  # noqa: E731
        out = adapter._forward(module, as_tensor(Xc), as_tensor(yc), as_tensor(Xq))[0].float()
        return torch.softmax(out[:, : task.n_classes] / config.softmax_temperature, dim=-1).numpy()

    return ensemble_predict(Xc, yc, Xq, task, config.n_estimators, forward, chunk=max(256, 8192 - len(Xc)))


def run(out_dir: Path, quick: bool) -> dict:
    from tabtune_cli.models.base import Task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n_context, n_query = (128, 128) if quick else (1000, 1000)
    n_estimators = 2 if quick else 4
    repeats = 1 if quick else 3
    small, n_small = 10, 10
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tabpfn-") as folder:
            clf_path = _default_size_checkpoint(Path(folder) / "clf", Task("classification", N_CLASSES))
            X, y = _table(n_context + n_query, regression=False)
            X_train, y_train, X_test = X.iloc[:n_context], y.iloc[:n_context], X.iloc[n_context:]
            probe = _pipeline(clf_path, n_estimators, "classification").fit(X_train, y_train)
            M_train, M_test = probe.preprocessor_.transform(X_train), probe.preprocessor_.transform(X_test)
            y_codes = probe.label_encoder_.transform(y_train)
            n_params = sum(p.numel() for p in probe.module_.parameters())

            # (a) fit + predict 1k x 1k, interleaved
            a_ours, a_theirs = [], []
            for r in range(repeats):
                sides = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
                for side in sides:
                    if side == "ours":
                        seconds, p_ours = _timed(lambda: _pipeline(clf_path, n_estimators, "classification")
                                                 .fit(X_train, y_train).predict_proba(X_test))
                        a_ours.append(seconds)
                    else:
                        seconds, p_theirs = _timed(lambda: _estimator(clf_path, n_estimators, False)
                                                   .fit(M_train, y_codes).predict_proba(M_test))
                        a_theirs.append(seconds)
            diff = float(np.abs(p_ours - p_theirs).max())
            agree = float((p_ours.argmax(1) == p_theirs.argmax(1)).mean())

            # the regressor's answers (one run each side, smaller: its equality, not its speed)
            reg_path = _default_size_checkpoint(Path(folder) / "reg", Task("regression"))
            n_reg = 128 if quick else 256
            Xr, yr = _table(2 * n_reg, regression=True, seed=1)
            reg = _pipeline(reg_path, n_estimators, "regression").fit(Xr.iloc[:n_reg], yr.iloc[:n_reg])
            pred_ours = reg.predict(Xr.iloc[n_reg:])
            pred_theirs = _estimator(reg_path, n_estimators, True).fit(
                reg.preprocessor_.transform(Xr.iloc[:n_reg]), yr.iloc[:n_reg].to_numpy(np.float32)
            ).predict(reg.preprocessor_.transform(Xr.iloc[n_reg:]))
            # tabtune standardises the target and maps back; compare in the target's units, relative to its spread
            reg_diff = float(np.abs(pred_ours - pred_theirs).max() / yr.std())

            # (b) one fit, then 10 predicts of 10 rows
            batches = [X_test.iloc[i * n_small:(i + 1) * n_small] for i in range(small)]
            m_batches = [M_test[i * n_small:(i + 1) * n_small] for i in range(small)]

            hit_ours, hit_theirs = [], []  # each predict after the context is encoded (tabtune: after the first)

            def ours_cached():
                pipe = _pipeline(clf_path, n_estimators, "classification", kv_cache=True).fit(X_train, y_train)
                out = []
                for i, b in enumerate(batches):
                    seconds, proba = _timed(lambda: pipe.predict_proba(b))
                    out.append(proba)
                    hit_ours.extend([seconds] if i > 0 else [])
                return out, pipe.adapter_.context_cache

            def theirs_cached():
                est = _estimator(clf_path, n_estimators, False, "fit_with_cache").fit(M_train, y_codes)
                out = []
                for b in m_batches:
                    seconds, proba = _timed(lambda: est.predict_proba(b))
                    out.append(proba)
                    hit_theirs.append(seconds)
                return out

            b_ours, b_theirs = [], []
            for r in range(repeats):
                sides = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
                for side in sides:
                    if side == "ours":
                        seconds, (cached_out, cache) = _timed(ours_cached)
                        b_ours.append(seconds)
                    else:
                        seconds, theirs_out = _timed(theirs_cached)
                        b_theirs.append(seconds)
            cached_diff = float(max(np.abs(a - b).max() for a, b in zip(cached_out, theirs_out)))

            # without the cache, and before #15: each predict pays for the context again. Too slow to repeat
            # 10 x 3 times on a shared CPU, so n_slow predicts once, and the 10-predict time scaled from them
            n_slow = 2 if quick else 3
            pipe = _pipeline(clf_path, n_estimators, "classification").fit(X_train, y_train)
            fit_seconds = pipe.fit_seconds_
            cache_size, pipe.adapter_.context_cache.size = pipe.adapter_.context_cache.size, 0
            uncached = [_timed(lambda: pipe.predict_proba(b))[0] for b in batches[:n_slow]]
            pipe.adapter_.context_cache.size = cache_size
            before = [_timed(lambda: _before_issue_15(pipe, b))[0] for b in batches[:n_slow]]
            uncached_10 = fit_seconds + small * statistics.median(uncached)
            before_10 = fit_seconds + small * statistics.median(before)
    finally:
        torch.set_num_threads(threads)

    med = statistics.median
    data = {
        "settings": {"context_rows": n_context, "query_rows": n_query, "features": N_FEATURES + 1,
                     "classes": N_CLASSES, "n_estimators": n_estimators, "repeats": repeats, "threads": 1,
                     "model": "TabPFN v2 default size (random weights), one checkpoint file both sides"},
        "predict": {"tabtune_s": med(a_ours), "estimator_s": med(a_theirs), "ratio": med(a_ours) / med(a_theirs),
                    "max_abs_diff_proba": diff, "argmax_agreement": agree,
                    "regression_max_abs_diff_over_std": reg_diff, "runs": {"tabtune": a_ours, "estimator": a_theirs}},
        "repeated": {"tabtune_cached_s": med(b_ours), "estimator_fit_with_cache_s": med(b_theirs),
                     "ratio": med(b_ours) / med(b_theirs), "max_abs_diff_proba": cached_diff,
                     "cache_hits": cache.hits, "cache_misses": cache.misses,
                     "tabtune_uncached_per_predict_s": med(uncached), "tabtune_uncached_10_s_scaled": uncached_10,
                     "before_15_per_predict_s": med(before), "before_15_10_s_scaled": before_10,
                     "speedup_vs_uncached": uncached_10 / med(b_ours), "speedup_vs_before_15": before_10 / med(b_ours),
                     "tabtune_cached_predict_s": med(hit_ours), "estimator_cached_predict_s": med(hit_theirs),
                     "per_predict_speedup_vs_before_15": med(before) / med(hit_ours),
                     "runs": {"tabtune": b_ours, "estimator": b_theirs, "uncached": uncached, "before_15": before}},
    }
    p, b = data["predict"], data["repeated"]
    markdown = f"""
TabPFN v2 at its default size (random weights, {n_params / 1e6:.1f}M parameters), one official-format
checkpoint file loaded by both sides; CPU, one thread; {n_estimators} ensemble members, softmax temperature 0.9,
random_state 0; {N_FEATURES} numeric features + 1 categorical, {N_CLASSES} classes; medians of {repeats}
interleaved runs. tabtune runs `TabularPipeline` on the DataFrame; the estimator gets the matrix tabtune's
preprocessor made of it (the boundary: categoricals, dates and text become numbers in tabtune first).

**(a) fit + predict, {n_context} context rows, {n_query} queries**

| | tabtune | `TabPFNClassifier` (default `fit_preprocessors`) | ratio |
|---|---|---|---|
| seconds | {p['tabtune_s']:.1f} | {p['estimator_s']:.1f} | {p['ratio']:.2f} |

Same answers: max \\|difference\\| in probabilities {p['max_abs_diff_proba']:.1e}, argmax agreement
{p['argmax_agreement']:.1%} (before #15: 38%). Regressor ({n_reg} + {n_reg} rows): max \\|difference\\| of the
predicted means {p['regression_max_abs_diff_over_std']:.1e} target standard deviations.

**(b) one fit, then {small} predicts of {n_small} rows** (fit included on both sides)

| | seconds | vs the estimator's `fit_with_cache` |
|---|---|---|
| tabtune (context cache: {b['cache_misses']} miss, {b['cache_hits']} hits) | {b['tabtune_cached_s']:.1f} | {b['ratio']:.2f}x |
| `TabPFNClassifier(fit_mode="fit_with_cache")` | {b['estimator_fit_with_cache_s']:.1f} | 1.00x |
| tabtune, cache off (scaled from {n_slow} predicts: {b['tabtune_uncached_per_predict_s']:.1f} s each) | {b['tabtune_uncached_10_s_scaled']:.1f} | {b['tabtune_uncached_10_s_scaled'] / b['estimator_fit_with_cache_s']:.1f}x |
| tabtune before #15 (raw forward per member; scaled from {n_slow} predicts: {b['before_15_per_predict_s']:.1f} s each) | {b['before_15_10_s_scaled']:.1f} | {b['before_15_10_s_scaled'] / b['estimator_fit_with_cache_s']:.1f}x |

One fit and 10 predicts take {b['speedup_vs_uncached']:.1f}x less time than without the cache and
{b['speedup_vs_before_15']:.1f}x less than before #15: the one encoding of the context (the estimator's
members, wider than the table after their SVD features, through the transformer) is most of that time. Each
predict after it takes {b['tabtune_cached_predict_s']:.2f} s (the estimator's cached predict:
{b['estimator_cached_predict_s']:.2f} s; before #15 every predict took {b['before_15_per_predict_s']:.1f} s,
{b['per_predict_speedup_vs_before_15']:.0f}x more). Cached answers equal the estimator's within
{b['max_abs_diff_proba']:.1e}.
"""
    return {"title": "TabPFN inference: the package's own answers, the context encoded once", "markdown": markdown,
            "data": data,
            "commands": [f".venv/bin/python benchmarks/bench.py --only inference_tabpfn{' --quick' if quick else ''}"]}
