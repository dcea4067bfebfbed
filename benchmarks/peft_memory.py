"""peft lighter than base-ft: TabICL at its default size (random weights), trained with base-ft and with peft.

Each configuration (base-ft, peft, and each with ``strategy.gradient_checkpointing=true``) is one
``TabularPipeline.fit`` in a fresh process, so that its peak resident memory is its own (a process's
peak only ever grows): the same synthetic table of ``ROWS`` rows, TabICL at ``model.size=default``
(its own constructor's defaults, 27.6M parameters) on random weights, one epoch of
``STEPS`` optimizer steps of the shipped episode shape, validated before and after on a few rows.
The first step is the warm-up; seconds per step are the median of the others (the time between
successive step records of the engine's own history). Peak RSS is the child's own high-water mark
(``VmHWM``, which starts afresh at ``exec``; ``ru_maxrss`` would not: a spawned child inherits its
parent's peak, and ``make bench``'s process has run the heavier topics before): the whole process,
imports, model, training, validation and the save included; ``fit`` is the same figure right after
``fit``, before the save. The artifact is what the run
trains: ``adapter_model.safetensors`` for peft, ``model.safetensors`` for base-ft. CPU.

Run alone: ``python benchmarks/peft_memory.py [--quick] [--out bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("base-ft", False), ("peft", False), ("base-ft", True), ("peft", True)]
# the shipped episode shape (conf/strategy/*.yaml): 2 episodes a step of 256 context and 64 query rows
FULL = dict(size="default", rows=2000, n_features=20, n_classes=3, steps=6, context_size=256, query_size=64,
            batch_size=2, threads=1, repeats=3)
# --quick: checks the benchmark runs (about a minute); not figures to quote
QUICK = dict(size="small", rows=2000, n_features=20, n_classes=3, steps=3, context_size=128, query_size=32,
             batch_size=2, threads=1, repeats=1)
COMMAND = ".venv/bin/python benchmarks/bench.py --only peft_memory --out bench"


def table(n: int, n_features: int, n_classes: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """A numeric table whose classes are bands of a noisy linear score."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, n_features)), columns=[f"x{i}" for i in range(n_features)])
    score = X["x0"] + 0.5 * X["x1"] - 0.3 * X["x2"] + rng.normal(scale=0.5, size=n)
    cuts = np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])
    return X, pd.Series(np.searchsorted(cuts, score), name="label")


def measure_one(strategy: str, checkpointing: bool, size: dict) -> dict:
    """One configuration, in this process: the engine's fit, then its save; figures as a dict."""
    import torch

    from tabtune_cli import TabularPipeline

    torch.set_num_threads(size["threads"])
    X, y = table(size["rows"], size["n_features"], size["n_classes"])
    stamps, cpu_stamps = [], []

    def on_record(entry: dict) -> None:
        if "loss" in entry:  # a step's record, written right after its optimizer step
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    tuning = {"epochs": 1, "steps_per_epoch": size["steps"], "warmup_steps": 0, "show_progress": False,
              "context_size": size["context_size"], "query_size": size["query_size"],
              "batch_size": size["batch_size"], "val_max_rows": 64, "val_n_estimators": 1,
              "gradient_checkpointing": checkpointing}
    model = {"pretrained": False, "size": size["size"], "n_estimators": 1,
             "max_context_rows": size["context_size"]}
    before = peak_mb()
    started = time.perf_counter()
    pipe = TabularPipeline("tabicl", tuning_strategy=strategy, tuning_params=tuning, model_params=model,
                           device="cpu").fit(X, y, on_record=on_record)
    fit_seconds = time.perf_counter() - started
    fit_peak = peak_mb()
    steps = np.diff(stamps).tolist()  # the first step (warm-up) has no predecessor: left out
    cpu_steps = np.diff(cpu_stamps).tolist()
    summary = pipe.summary()
    with tempfile.TemporaryDirectory() as folder:
        pipe.save(folder)
        artifact = Path(folder) / ("adapter_model.safetensors" if strategy == "peft" else "model.safetensors")
        artifact_mb = artifact.stat().st_size / 2**20
    return {"strategy": strategy, "gradient_checkpointing": checkpointing, "threads": torch.get_num_threads(),
            "step_s": statistics.median(steps), "steps_s": steps, "fit_s": fit_seconds,
            "step_cpu_s": statistics.median(cpu_steps), "steps_cpu_s": cpu_steps,
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "artifact": artifact.name, "artifact_mb": artifact_mb,
            "start_rss_mb": before, "fit_peak_rss_mb": fit_peak, "peak_rss_mb": peak_mb()}


def measure_saved(strategy: str, checkpointing: bool, size: dict) -> dict:
    """What one training forward keeps for backward (MB of distinct storages), with the engine's module
    after one step; and, for peft, what importing peft (and with it transformers) adds to the process."""
    import torch

    from tabtune_cli import TabularPipeline

    torch.set_num_threads(size["threads"])
    resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # noqa: E731
    before = resident()
    import peft  # noqa: F401  (peft is imported by a peft fit anyway; here its cost alone)

    import_mb = resident() - before
    X, y = table(size["rows"], size["n_features"], size["n_classes"])
    tuning = {"epochs": 1, "steps_per_epoch": 1, "show_progress": False, "val_max_rows": 64, "val_n_estimators": 1,
              "context_size": size["context_size"], "query_size": size["query_size"],
              "batch_size": size["batch_size"], "gradient_checkpointing": checkpointing}
    model = {"pretrained": False, "size": size["size"], "n_estimators": 1, "max_context_rows": size["context_size"]}
    pipe = TabularPipeline("tabicl", tuning_strategy=strategy, tuning_params=tuning, model_params=model,
                           device="cpu").fit(X, y)
    rows = pipe.preprocessor_.transform(X.iloc[:size["context_size"] + size["query_size"]])
    batch = torch.as_tensor(np.stack([rows] * size["batch_size"]))
    labels = torch.as_tensor(pipe.label_encoder_.transform(y.iloc[:size["context_size"]]))
    labels = torch.stack([labels] * size["batch_size"])
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    pipe.module_.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        pipe.adapter_.episode_logits(pipe.module_, batch[:, :size["context_size"]], labels,
                                     batch[:, size["context_size"]:], pipe.task_)
    return {"saved_mb": sum(storages.values()) / 2**20, "peft_import_mb": import_mb}


def peak_mb() -> float:
    """This process's peak resident set so far, MiB (Linux ``VmHWM``: its own since ``exec``)."""
    import torch

    from tabtune_cli.memory import peak_mb as probe

    return probe(torch.device("cpu"))


def run_child(strategy: str, checkpointing: bool, size: dict, what: str = "fit") -> dict:
    """``measure_one`` (``what="fit"``) or ``measure_saved`` (``"saved"``) in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        spec = json.dumps({"strategy": strategy, "checkpointing": checkpointing, "size": size, "what": what})
        child = subprocess.run([sys.executable, __file__, "--child", spec, "--result", str(out)], cwd=ROOT)
        if child.returncode != 0:
            raise RuntimeError(f"peft_memory: {strategy} (checkpointing {checkpointing}) exited {child.returncode}")
        return json.loads(out.read_text())


def measure(quick: bool) -> dict:
    """Every configuration ``repeats`` times, interleaved, then what each keeps for backward."""
    size = QUICK if quick else FULL
    runs = [run_child(strategy, checkpointing, size) for _ in range(size["repeats"])
            for strategy, checkpointing in CONFIGS]
    # under checkpointing, torch's own hooks hide what the blocks keep from ours: not taken
    saved = {strategy: run_child(strategy, False, size, what="saved") for strategy, checkpointing in CONFIGS
             if not checkpointing}
    return summarize(size, runs, saved)


def summarize(size: dict, runs: list[dict], saved: dict) -> dict:
    """Per configuration the medians over its repeats, and every ratio to base-ft's."""
    rows = []
    for strategy, checkpointing in CONFIGS:
        mine = [r for r in runs if (r["strategy"], r["gradient_checkpointing"]) == (strategy, checkpointing)]
        row = {**mine[0], "repeats": mine}
        for key in ("peak_rss_mb", "fit_peak_rss_mb", "start_rss_mb", "step_s", "step_cpu_s", "fit_s"):
            row[key] = statistics.median(r[key] for r in mine)
        if not checkpointing:
            row.update({key: saved[strategy][key] for key in ("saved_mb", "peft_import_mb")})
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("peak_rss_mb", "fit_peak_rss_mb", "step_s", "step_cpu_s", "artifact_mb", "saved_mb"):
            if key in row:
                row[key.replace("_mb", "").replace("_s", "") + "_ratio"] = row[key] / base[key]
    return {"sizes": size, "rows": rows}


def markdown(data: dict) -> str:
    size, rows = data["sizes"], data["rows"]
    lines = ["| strategy | gradient checkpointing | peak RSS (MB) | x base-ft | kept for backward (MB) | x base-ft "
             "| s / step | x base-ft | CPU s / step | x base-ft | trainable parameters | artifact (MB) | x base-ft |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = f"{r['saved_mb']:,.0f} | {r['saved_ratio']:.2f}" if "saved_mb" in r else "not taken | "
        lines.append(f"| {r['strategy']} | {'yes' if r['gradient_checkpointing'] else 'no'} "
                     f"| {r['peak_rss_mb']:,.0f} | {r['peak_rss_ratio']:.2f} | {saved} "
                     f"| {r['step_s']:.2f} | {r['step_ratio']:.2f} | {r['step_cpu_s']:.2f} | {r['step_cpu_ratio']:.2f} "
                     f"| {r['trainable_params']:,} | `{r['artifact']}` {r['artifact_mb']:.2f} | {r['artifact_ratio']:.3f} |")
    base, peft = rows[0], rows[1]
    mb = 4 / 2**20  # float32
    weights = base["total_params"] * mb
    base_state = 4 * base["trainable_params"] * mb  # gradients, AdamW's two moments, the best-epoch copy
    peft_state = 4 * peft["trainable_params"] * mb
    expected = base_state - peft_state - peft["peft_import_mb"] + base["saved_mb"] - peft["saved_mb"]
    return f"""
TabICL at `model.size={size['size']}` ({base['total_params']:,} parameters) on random weights, a
synthetic table of {size['rows']:,} rows, {size['n_features']} numeric features and {size['n_classes']} classes;
one epoch of {size['steps']} optimizer steps of {size['batch_size']} episodes ({size['context_size']} context +
{size['query_size']} query rows, the shipped shape), validated before and after on 64 rows with one member;
each configuration a fresh process on the CPU with {size['threads']} torch thread(s), {size['repeats']} interleaved
repeat(s), medians. Seconds per step: the median of the {size['steps'] - 1} steps after the first (wall clock,
and the process's CPU time, which other processes on a shared machine disturb less). Peak RSS: the whole
child process (its own `VmHWM`), imports, model, validation and save included. Kept for backward: the distinct
storages one training forward of a step's episodes saves for backward (another fresh process, after one step;
not taken with checkpointing, whose own hooks hide what the recomputed blocks keep).

{chr(10).join(lines)}

Where the memory goes. Both strategies hold the weights ({weights:,.0f} MB) and, on random weights, the
pipeline's copy of them for the save ({weights:,.0f} MB); the process starts at {base['start_rss_mb']:,.0f} MB
before `fit` (Python, torch, tabicl, pandas). base-ft adds its training state: a gradient, AdamW's two moments
and the trainer's best-epoch copy of every weight ({base_state:,.0f} MB); peft adds the same for its LoRA
parameters only ({peft_state:,.1f} MB), and importing peft brings transformers along
({peft['peft_import_mb']:,.0f} MB). Those, with the activations kept for backward, predict base-ft's peak
minus peft's at {expected:,.0f} MB; measured: {base['peak_rss_mb'] - peft['peak_rss_mb']:,.0f} MB. The rest of either
peak is the activations and the allocator's working space around them, the same for both: LoRA sits on
every linear layer TabICL's defaults reach, and a LoRA layer keeps its input for the gradient of A exactly
as a trained layer keeps it for the gradient of W, so peft's saved activations can only be base-ft's minus
the few layers it leaves untouched (peft keeps {peft['saved_ratio']:.2f}x of base-ft's). With the weights this
small (TabICL is {base['total_params'] / 1e6:.1f}M parameters) and the activations this large, the optimizer
state peft saves is a minority of the peak: peft alone comes to {peft['peak_rss_ratio']:.2f}x of base-ft's peak
here; with `strategy.gradient_checkpointing=true` (each transformer block recomputed in backward, so only the
blocks' inputs are kept) {rows[3]['peak_rss_ratio']:.2f}x, and base-ft with it {rows[2]['peak_rss_ratio']:.2f}x.

Where the time goes. peft skips the weight-gradient product of every frozen layer and the optimizer's
pass over {base['trainable_params'] / 1e6:.1f}M parameters, and adds six rank-r products a LoRA layer (the
in-place `addmm`s of `modules.low_rank.lora_linear`, without peft's rebuilt `W + B·A` and its full-size gradient).
Profiled at the default size: in TabICL's 512-wide ICL transformer the skipped products dominate; in its
128-wide column and row transformers, run over rows x feature-groups tokens, each rank-r product streams
as many bytes of activations as the full product it replaces, so there peft saves little on a CPU; attention
(a quarter of the step) and the element-wise work are the same in both. Gradient checkpointing pays one more
forward of each block a step.
"""


def run(out_dir: Path, quick: bool) -> dict:
    data = measure(quick)
    (Path(out_dir) / "peft_memory.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"title": "peft lighter than base-ft: TabICL memory and step time",
            "markdown": markdown(data), "data": data,
            "commands": [COMMAND + (" --quick" if quick else ""),
                         ".venv/bin/python -m pytest -q tests/test_peft_memory.py"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        measure_child = measure_saved if spec["what"] == "saved" else measure_one
        Path(args.result).write_text(json.dumps(measure_child(spec["strategy"], spec["checkpointing"], spec["size"])))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(run(Path(args.out), args.quick)["markdown"])


if __name__ == "__main__":
    main()
