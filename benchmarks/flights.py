"""Big tables: nano on flights (327k rows) in a fixed memory budget, its predict time linear in query rows.

The table: ``flights`` from the shared tables (``manifest.json``: 327,346 rows, 12 features, ``arr_delay``
a regression target), split once, seeded: 30% held out as the query pool, the target turned binary at the
training rows' median (above / below). Every measurement is one fresh process (this file, ``--child``),
CPU, one torch thread, so that its memory is its own.

(1) Predict curve. The shipped nano, zero-shot (strategy ``inference``), fitted on ALL the training rows
    (nano keeps a seeded ``model.max_context_rows`` = 2,048 of them as its context), then asked for
    ``predict_proba`` on the first ``n`` rows of the pool, one process per ``n``. A first predict of a few
    rows encodes the context (members' keys and values, views, calibration map) beforehand, so the timed
    predict is the query pass alone, which nano runs in chunks of rows (``ATTENTION_BUDGET``). Members:
    ``n_estimators`` (fewer than the shipped 64 in the full run, to keep it to minutes; time scales with
    members, the shape of the curve does not).
(2) Training in a fixed budget. base-ft and peft, a few optimizer steps (one epoch of ``steps``, the shipped
    episode shape of context and query rows), on a seeded stratified subsample of the training rows and on
    more of them (all in the full run), validated on a few pool rows (passed as ``X_val``). An episode
    samples its context and query rows, so the working memory should not grow with the table.

Memory is the process's own peak resident set, read from ``/proc/self/status`` (``VmHWM``), reset
(``/proc/self/clear_refs``, as ``TabularPipeline.fit`` itself does) at the start of each stage: the fit, the
context's encoding, the timed predict; the process's peak is the largest of them and of the imports and
loading before. (A child's ``ru_maxrss`` from ``os.wait4`` starts at its parent's peak when it is spawned,
which here would be bench.py's, possibly an earlier topic's.) Seconds: wall clock, and the process's CPU
time (less disturbed by other processes on a shared machine).

Run alone: ``python benchmarks/flights.py [--quick] [--out bench]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import standalone, timed

ROOT = Path(__file__).resolve().parents[1]
TABLE = "flights"
STRATEGIES = ("base-ft", "peft")
FULL = dict(query_rows=[1000, 2000, 4000, 8000, 16000], n_estimators=32, warm_rows=32,
            train_rows=[10_000, None], steps=6, context_size=256, query_size=64, val_rows=256)
# --quick: checks the benchmark runs (a few minutes); not figures to quote
QUICK = dict(query_rows=[256, 512], n_estimators=4, warm_rows=32,
             train_rows=[10_000, 40_000], steps=2, context_size=64, query_size=16, val_rows=64)
COMMAND = ".venv/bin/python benchmarks/bench.py --only flights --out bench"


# ---- in the child ---------------------------------------------------------------------------------

def flights(seed: int = 0):
    """``(X_train, y_train, X_pool, y_pool)``: the 70 / 30 split, ``arr_delay`` above / below the training median."""
    import pandas as pd
    from finetune_nano import SHARED

    from tabtune_cli.commands.leaderboard import load_tables
    from tabtune_cli.data.split import split_frame

    X, y = load_tables([TABLE], SHARED)[TABLE]
    train, pool = split_frame(X.assign(__target__=y.to_numpy()), "__target__", fraction=0.3, stratify=False,
                              seed=seed)
    median = float(train["__target__"].median())

    def binary(part):
        return pd.Series(np.where(part["__target__"] > median, "above", "below"), name=y.name)

    return train.drop(columns="__target__"), binary(train), pool.drop(columns="__target__"), binary(pool)


def resident_mb() -> float:
    """This process's resident set now (``VmRSS``), MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure_predict(spec: dict) -> dict:
    """Zero-shot fit on every training row, the context encoded, then one timed predict of ``spec['rows']``."""
    import torch
    from sklearn.metrics import roc_auc_score

    from tabtune_cli import TabularPipeline
    from tabtune_cli.memory import peak_mb, reset_peak

    cpu = torch.device("cpu")
    X, y, X_pool, y_pool = flights()
    load_peak = peak_mb(cpu)  # imports and the table, since the process started
    pipe = TabularPipeline("nano", tuning_strategy="inference", tuning_params={"show_progress": False},
                           model_params={"n_estimators": spec["n_estimators"]}, device="cpu", seed=0)
    fit_s, _ = timed(lambda: pipe.fit(X, y))
    fit_peak, after_fit = pipe.peak_memory_mb_, resident_mb()  # fit measures its own peak
    reset_peak(cpu)
    context_s, _ = timed(lambda: pipe.predict_proba(X_pool.iloc[-spec["warm_rows"]:]))
    context_peak = peak_mb(cpu)
    reset_peak(cpu)
    query = X_pool.iloc[:spec["rows"]]
    cpu_started = time.process_time()
    seconds, proba = timed(lambda: pipe.predict_proba(query))
    cpu_seconds = time.process_time() - cpu_started
    predict_peak = peak_mb(cpu)
    positive = list(pipe.classes_).index("above")
    context_rows = int(min(len(X), pipe.model_config_.max_context_rows))
    return {"rows": spec["rows"], "train_rows": len(X), "context_rows": context_rows,
            "n_estimators": spec["n_estimators"], "fit_s": fit_s, "fit_peak_mb": fit_peak, "after_fit_mb": after_fit,
            "context_s": context_s, "context_peak_mb": context_peak, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "predict_peak_mb": predict_peak, "process_peak_mb": max(load_peak, fit_peak, context_peak, predict_peak),
            "roc_auc": float(roc_auc_score(y_pool.iloc[:spec["rows"]] == "above", proba[:, positive]))}


def measure_train(spec: dict) -> dict:
    """One fine-tuning fit of a few steps on ``spec['rows']`` training rows (None: all)."""
    from tabtune_cli import TabularPipeline
    from tabtune_cli.data.split import subsample

    X, y, X_pool, y_pool = flights()
    if spec["rows"] is not None:
        kept = subsample(X.assign(__target__=y.to_numpy()), "__target__", spec["rows"], stratify=True, seed=0)
        X, y = kept.drop(columns="__target__"), kept["__target__"].rename(y.name)
    if spec["strategy"] == "peft":
        import peft  # noqa: F401  (fit imports it before its own peak starts: here before "before")
    before = resident_mb()
    stamps = []

    def on_record(entry: dict) -> None:
        if "loss" in entry:  # a step's record, written right after its optimizer step
            stamps.append(time.perf_counter())

    tuning = {"epochs": 1, "steps_per_epoch": spec["steps"], "warmup_steps": 0, "show_progress": False,
              "context_size": spec["context_size"], "query_size": spec["query_size"],
              "val_max_rows": spec["val_rows"], "val_n_estimators": 1}
    # n_estimators only for fit's last evaluation of the validation rows: training uses every view as it is
    pipe = TabularPipeline("nano", tuning_strategy=spec["strategy"], tuning_params=tuning,
                           model_params={"n_estimators": 4}, device="cpu", seed=0)
    started = time.perf_counter()
    pipe.fit(X, y, X_val=X_pool.iloc[-spec["val_rows"]:], y_val=y_pool.iloc[-spec["val_rows"]:],
             on_record=on_record)
    fit_s = time.perf_counter() - started
    return {"strategy": spec["strategy"], "rows": len(X), "steps": len(stamps), "before_mb": before,
            "fit_peak_mb": pipe.peak_memory_mb_, "fit_s": fit_s, "first_step_s": stamps[0] - started,
            "step_s": statistics.median(np.diff(stamps)) if len(stamps) > 1 else None}


def child(spec: dict) -> dict:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("tabtune").setLevel(logging.ERROR)  # pool rows' unseen tail numbers, said once a predict
    return (measure_predict if spec["what"] == "predict" else measure_train)(spec)


# ---- in the parent --------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    """``child(spec)`` in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--result", str(out)], cwd=ROOT,
                       check=True)
        return json.loads(out.read_text())


def measure(quick: bool) -> dict:
    size = QUICK if quick else FULL
    curve = []
    for rows in size["query_rows"]:
        curve.append(run_child({"what": "predict", "rows": rows, "n_estimators": size["n_estimators"],
                                "warm_rows": size["warm_rows"]}))
        print(f"flights: predict {rows} rows: {curve[-1]['seconds']:.1f} s, peak {curve[-1]['process_peak_mb']:.0f} MB",
              flush=True)
    training = []
    for strategy in STRATEGIES:
        for rows in size["train_rows"]:
            training.append(run_child({"what": "train", "strategy": strategy, "rows": rows,
                                       **{k: size[k] for k in ("steps", "context_size", "query_size", "val_rows")}}))
            print(f"flights: {strategy} on {training[-1]['rows']} rows: peak {training[-1]['fit_peak_mb']:.0f} MB",
                  flush=True)
    for point in curve:
        point["s_per_1k"] = 1000 * point["seconds"] / point["rows"]
        point["cpu_s_per_1k"] = 1000 * point["cpu_seconds"] / point["rows"]
    rows = np.array([p["rows"] for p in curve], dtype=float)
    seconds = np.array([p["seconds"] for p in curve])
    slope, intercept = np.polyfit(rows, seconds, 1)
    residual = seconds - (slope * rows + intercept)
    r2 = 1 - (residual ** 2).sum() / max(((seconds - seconds.mean()) ** 2).sum(), 1e-12)
    return {"sizes": size, "curve": curve, "training": training,
            "fit": {"slope_s_per_1k": 1000 * slope, "intercept_s": intercept, "r2": r2}}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, fit = data["curve"], data["fit"]
    rows = np.array([p["rows"] for p in curve])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rows, [p["seconds"] for p in curve], "o", label="predict_proba (wall)")
    left.plot(rows, [p["cpu_seconds"] for p in curve], "s", mfc="none", label="predict_proba (CPU)")
    line = np.array([0, rows.max()])
    left.plot(line, fit["intercept_s"] + fit["slope_s_per_1k"] * line / 1000, "-", color="gray",
              label=f"fit: {fit['slope_s_per_1k']:.2f} s / 1k rows (R² {fit['r2']:.3f})")
    left.set(xlabel="query rows", ylabel="seconds",
             title=f"nano on flights: predict time ({curve[0]['n_estimators']} members)")
    right.plot(rows, [p["process_peak_mb"] for p in curve], "o-", label="process peak (fit, context, predict)")
    right.plot(rows, [p["predict_peak_mb"] for p in curve], "s-", label="peak during the predict")
    right.plot(rows, [p["after_fit_mb"] for p in curve], "^:", label="resident after fit")
    right.set(xlabel="query rows", ylabel="RSS (MB)", title="memory", xlim=(0, None), ylim=(0, None))
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(data: dict) -> str:
    curve, fit, training = data["curve"], data["fit"], data["training"]
    per_1k = [p["s_per_1k"] for p in curve]
    cpu_1k = [p["cpu_s_per_1k"] for p in curve]
    peaks = [p["process_peak_mb"] for p in curve]
    own = [p["predict_peak_mb"] for p in curve]
    spread = lambda values: 100 * (max(values) / min(values) - 1)  # noqa: E731
    text = (f"From {curve[0]['rows']:,} to {curve[-1]['rows']:,} query rows "
            f"({curve[-1]['rows'] // curve[0]['rows']}x), "
            f"seconds per 1k rows stay between {min(per_1k):.2f} and {max(per_1k):.2f} (spread {spread(per_1k):.0f}%; "
            f"CPU seconds {spread(cpu_1k):.0f}%); a line fits the times with R² {fit['r2']:.3f}, "
            f"{fit['slope_s_per_1k']:.2f} s per 1k rows plus {fit['intercept_s']:.1f} s. The process's peak RSS goes "
            f"from {peaks[0]:,.0f} to {peaks[-1]:,.0f} MB (range {min(peaks):,.0f}-{max(peaks):,.0f}), "
            f"the predict's own "
            f"peak from {own[0]:,.0f} to {own[-1]:,.0f} MB, on {curve[0]['train_rows']:,} training rows "
            f"(context {curve[0]['context_rows']:,}).")
    for strategy in STRATEGIES:
        small, large = sorted((r for r in training if r["strategy"] == strategy), key=lambda r: r["rows"])
        text += (f" {strategy}: {small['rows']:,} → {large['rows']:,} training rows moves its fit peak by "
                 f"{large['fit_peak_mb'] - small['fit_peak_mb']:+,.0f} MB ({small['fit_peak_mb']:,.0f} → "
                 f"{large['fit_peak_mb']:,.0f}), of which the table held before fit "
                 f"{large['before_mb'] - small['before_mb']:+,.0f} MB; its first step comes "
                 f"{small['first_step_s']:.1f} s → {large['first_step_s']:.1f} s after fit starts.")
    return text


def markdown(data: dict) -> str:
    size, curve = data["sizes"], data["curve"]
    first = curve[0]
    predict = ["| query rows | seconds | s / 1k rows | CPU s / 1k rows | predict's peak RSS MB | process peak RSS MB "
               "| ROC AUC |", "|---|---|---|---|---|---|---|"]
    for p in curve:
        predict.append(f"| {p['rows']:,} | {p['seconds']:.1f} | {p['s_per_1k']:.2f} | {p['cpu_s_per_1k']:.2f} "
                       f"| {p['predict_peak_mb']:,.0f} | {p['process_peak_mb']:,.0f} | {p['roc_auc']:.3f} |")
    train = ["| strategy | training rows | RSS before fit MB | fit peak RSS MB | peak − before MB | s to first step "
             "| s / step | fit s |", "|---|---|---|---|---|---|---|---|"]
    for r in data["training"]:
        step = "" if r["step_s"] is None else f"{r['step_s']:.2f}"
        train.append(f"| {r['strategy']} | {r['rows']:,} | {r['before_mb']:,.0f} | {r['fit_peak_mb']:,.0f} "
                     f"| {r['fit_peak_mb'] - r['before_mb']:,.0f} | {r['first_step_s']:.1f} | {step} "
                     f"| {r['fit_s']:.1f} |")
    median = lambda key: statistics.median(p[key] for p in curve)  # noqa: E731
    return f"""
flights: {first['train_rows']:,} training rows, the query pool the other 30%, `arr_delay` above / below the
training median. Each row of a table is a fresh process, CPU, one torch thread (method: the module's docstring).

**Predict time and memory against query rows.** nano zero-shot on every training row (context: a
seeded {first['context_rows']:,}), **{first['n_estimators']} members** (the shipped default is 64; time
scales with members), calibration on. Fit: {median('fit_s'):.1f} s (median of the processes), resident
after fit {median('after_fit_mb'):,.0f} MB, fit's peak {median('fit_peak_mb'):,.0f} MB; encoding the context
(the first predict, {size['warm_rows']} rows) {median('context_s'):.1f} s, peak {median('context_peak_mb'):,.0f} MB.
Then one timed `predict_proba`:

{chr(10).join(predict)}

![predict time and memory against query rows](flights.png)

**Training in a fixed budget.** One epoch of {size['steps']} optimizer steps, 2 episodes a step of
{size['context_size']} context and {size['query_size']} query rows, validated on {size['val_rows']} pool
rows with one member. Fit peak: the process's peak resident set during `fit` (from its start; the table
and imports are already resident: "RSS before fit"). "s to first step": from `fit`'s start to the first
optimizer step's record (preprocessing, sampling the epoch's episodes, the first validation).

{chr(10).join(train)}

{verdict(data)}
"""


def run(out_dir: Path, quick: bool) -> dict:
    data = measure(quick)
    out_dir = Path(out_dir)
    (out_dir / "flights.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, out_dir / "flights.png")
    return {"title": "Big tables: nano on flights (327k rows) in a fixed memory budget",
            "markdown": markdown(data), "data": data,
            "commands": [COMMAND + (" --quick" if quick else "")]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)  # the hidden child arguments; the rest is standalone's
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    known, _ = parser.parse_known_args()
    if known.child:
        Path(known.result).write_text(json.dumps(child(json.loads(known.child))))
    else:
        standalone(__doc__, run)
