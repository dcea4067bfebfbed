"""Reduced precision and torch.compile: measured before either becomes a default (issue #15).

Two models: TabICL at ``model.size=small`` on random weights (one member) and nano (the shipped weights).
On a synthetic table (``bench.binary_table``: ``n_features`` normal features, a noisy yes/no label), three
measurements, on the CPU with one torch thread, and on CUDA too when there is one:

(a) Training: base-ft, ``steps`` optimizer steps of ``batch_size`` episodes (``context_size`` context +
    ``query_size`` query rows; AdamW at the shipped rate, constant, no warm-up) with
    ``strategy.mixed_precision`` "no" (float32) and "bf16" (the trainer's ``torch.autocast``; on CUDA "fp16"
    too, with its gradient scaler). Seconds per step: the median gap between successive step records of the
    engine's own history (the first step, after the starting validation, left out). Answers: the
    validation log loss after the same steps (the validation pass after the epoch, run in float32 on at most
    ``val_rows`` rows with one member, before the trainer restores its best epoch) and the training loss of
    every step (the same seeded episodes in every run). On CUDA, the allocator's peak during ``fit``
    (``torch.cuda.max_memory_allocated``, the pipeline's ``peak_memory_mb_``).
(b) Prediction: ``predict_proba`` of ``predict_rows`` rows against ``predict_context`` context rows
    (``predict_members`` members, the context cache off so the whole prediction runs at the precision
    measured) in float32 and inside ``torch.autocast(device, dtype=torch.bfloat16)`` (on CUDA float16 too);
    max |difference| of the probabilities and the time ratio. TabICL's own estimator keeps its AMP
    choice (off on the CPU).
(c) torch.compile: one forward of nano's network (``pipe.module_``, no gradients) on ``compile_context``
    context and ``compile_query`` query rows, eager and ``torch.compile``-d, in a fresh process with an
    empty inductor cache (the first compiled call is the compile time a new user pays; the full run
    compiles again in another process on the now warm cache); then ``compile_calls`` calls of each,
    interleaved, medians; max |difference| of the logits. A compile that fails is the finding.

Repeats are interleaved (every model and precision once a round), medians over ``repeats`` rounds.

Run alone: ``python benchmarks/precision.py [--quick] [--out bench]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# answers count as equal within these
LOSS_TOLERANCE = 0.01  # validation log loss, absolute
PROBA_TOLERANCE = 0.01  # probabilities, max |difference|
LOGIT_TOLERANCE = 1e-4  # compiled vs eager logits: the same float32 arithmetic, reordered
# faster means under this fraction of float32's / eager's time: a shared machine's timings wander by ~10%
FASTER = 0.9
# a compile must pay for itself within this many calls of one shape: the shipped base-ft's 200 steps of
# 2 episodes over nano's 3 views are ~1,200 forwards (and their shapes vary, each new one compiled again)
PAYBACK_CALLS = 1000
MODELS = {"TabICL small": ("tabicl", {"pretrained": False, "size": "small", "n_estimators": 1}),
          "nano": ("nano", {})}
FULL = dict(train_rows=800, n_features=10, steps=6, context_size=256, query_size=64, batch_size=2, val_rows=256,
            repeats=2, predict_context=512, predict_rows=1000, predict_members=4, compile_context=512,
            compile_query=1024, compile_calls=5, warm_compile=True)
# --quick: checks the benchmark runs (about 1.5 minutes, most of it compiling); not figures to quote
QUICK = dict(train_rows=400, n_features=10, steps=3, context_size=128, query_size=32, batch_size=2, val_rows=128,
             repeats=1, predict_context=256, predict_rows=300, predict_members=2, compile_context=256,
             compile_query=256, compile_calls=2, warm_compile=False)
COMMAND = ".venv/bin/python benchmarks/bench.py --only precision --out bench"


def devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def train_one(label: str, precision: str, device: str, size: dict) -> dict:
    """One base-ft fit at ``strategy.mixed_precision=precision``: seconds per step, losses, peak memory."""
    from bench import binary_table

    from tabtune_cli import TabularPipeline

    name, model = MODELS[label]
    X, y = binary_table(size["train_rows"], size["n_features"])
    stamps = []

    def on_record(entry: dict) -> None:
        if "loss" in entry:  # a step's record, written right after its optimizer step (loss.item(): synchronised)
            stamps.append(time.perf_counter())

    tuning = {"epochs": 1, "steps_per_epoch": size["steps"], "batch_size": size["batch_size"],
              "context_size": size["context_size"], "query_size": size["query_size"], "warmup_steps": 0,
              "scheduler": "constant", "val_max_rows": size["val_rows"], "val_n_estimators": 1,
              "mixed_precision": precision, "show_progress": False}
    started = time.perf_counter()
    pipe = TabularPipeline(name, tuning_strategy="base-ft", tuning_params=tuning, model_params=model,
                           device=device, seed=0).fit(X, y, on_record=on_record)
    fit_s = time.perf_counter() - started
    history = pipe.train_result_.history
    val = [h["val_log_loss"] for h in history if "val_log_loss" in h]
    steps = np.diff(stamps).tolist()
    return {"model": label, "precision": precision, "device": device, "fit_s": fit_s,
            "step_s": statistics.median(steps), "steps_s": steps, "val_before": val[0], "val_after": val[-1],
            "losses": [h["loss"] for h in history if "loss" in h],
            "peak_mb": pipe.peak_memory_mb_ if device == "cuda" else None}


def predict_all(size: dict, device: str) -> dict:
    """Per model: seconds of each precision's ``predict_proba`` (every repeat) and max |difference| from float32."""
    import torch
    from bench import binary_table, timed

    from tabtune_cli import TabularPipeline

    n_context = size["predict_context"]
    X, y = binary_table(n_context + size["predict_rows"], size["n_features"], seed=1)
    precisions = {"fp32": None, "bf16": torch.bfloat16, **({"fp16": torch.float16} if device == "cuda" else {})}
    pipes = {}
    for label, (name, model) in MODELS.items():
        pipe = TabularPipeline(name, model_params={**model, "n_estimators": size["predict_members"]},
                               tuning_params={"show_progress": False}, device=device, seed=0)
        pipes[label] = pipe.fit(X.iloc[:n_context], y.iloc[:n_context])
        pipe.adapter_.cache_context = False  # every predict encodes its context at the precision measured
    X_query = X.iloc[n_context:]
    seconds = {label: {p: [] for p in precisions} for label in MODELS}
    answers = {label: {} for label in MODELS}
    for _ in range(size["repeats"]):
        for label, pipe in pipes.items():
            for precision, dtype in precisions.items():
                def call():
                    if dtype is None:
                        return pipe.predict_proba(X_query)
                    with torch.autocast(device, dtype=dtype):
                        return pipe.predict_proba(X_query)
                took, proba = timed(call)
                seconds[label][precision].append(took)
                answers[label][precision] = np.asarray(proba, dtype=np.float64)
    out = {}
    for label in MODELS:
        fp32 = statistics.median(seconds[label]["fp32"])
        out[label] = {p: {"s": statistics.median(seconds[label][p]), "ratio": statistics.median(seconds[label][p]) / fp32,
                          "max_diff": float(np.abs(answers[label][p] - answers[label]["fp32"]).max()),
                          "repeats_s": seconds[label][p]} for p in precisions}
    return out


def compile_child(spec: dict) -> dict:
    """In a fresh process: nano's forward eager and compiled, on every device, or the error compiling gave."""
    import torch
    from bench import binary_table

    from tabtune_cli import TabularPipeline

    torch.set_num_threads(1)
    size = spec["size"]
    n_context, n_query = size["compile_context"], size["compile_query"]
    X, y = binary_table(n_context + n_query, size["n_features"], seed=2)
    pipe = TabularPipeline("nano", tuning_params={"show_progress": False}, device="cpu", seed=0).fit(X, y)
    rows = torch.as_tensor(pipe.preprocessor_.transform(X), dtype=torch.float32)
    labels = torch.as_tensor(pipe.label_encoder_.transform(y))
    out = {}
    for device in spec["devices"]:
        module = pipe.module_.to(device).eval()
        inputs = (rows[None, :n_context].to(device), labels[None, :n_context].to(device),
                  rows[None, n_context:].to(device))

        def clock(call):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = call(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started, result

        with torch.no_grad():
            clock(module)  # warm-up: the eager path's own first call
            try:
                compiled = torch.compile(module)
                compile_s, answer = clock(compiled)
            except Exception as error:  # noqa: BLE001  (whatever stops compiling is the finding)
                out[device] = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
                continue
            eager_s, compiled_s = [], []
            for _ in range(size["compile_calls"]):  # interleaved
                took, expected = clock(module)
                eager_s.append(took)
                took, answer = clock(compiled)
                compiled_s.append(took)
        out[device] = {"ok": True, "compile_s": compile_s, "eager_s": statistics.median(eager_s),
                       "compiled_s": statistics.median(compiled_s), "ratio": statistics.median(compiled_s)
                       / statistics.median(eager_s), "max_diff": (answer - expected).abs().max().item(),
                       "eager_calls_s": eager_s, "compiled_calls_s": compiled_s}
    return out


def measure_compile(size: dict, cache: Path) -> dict:
    """``compile_child`` in a fresh interpreter whose inductor cache is ``cache``; a crash is reported as such."""
    spec = json.dumps({"size": size, "devices": devices()})
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", spec], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {d: {"ok": False, "error": "compiling took over 900 s (stopped)"} for d in devices()}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {d: {"ok": False, "error": f"the process exited {done.returncode}: {tail}"} for d in devices()}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(quick: bool) -> dict:
    import torch

    size = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = []
        for device in devices():
            precisions = ["no", "bf16", "fp16"] if device == "cuda" else ["no", "bf16"]
            for _ in range(size["repeats"]):  # interleaved
                for label in MODELS:
                    for precision in precisions:
                        training.append(train_one(label, precision, device, size))
        predicting = {device: predict_all(size, device) for device in devices()}
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache:
        compiling = {"cold": measure_compile(size, Path(cache))}
        if size["warm_compile"]:
            compiling["warm"] = measure_compile(size, Path(cache))
    return {"sizes": size, "training": summarize(training), "training_runs": training, "predicting": predicting,
            "compiling": compiling, "tolerances": {"log_loss": LOSS_TOLERANCE, "proba": PROBA_TOLERANCE,
                                                   "logits": LOGIT_TOLERANCE}}


def summarize(runs: list[dict]) -> dict:
    """Per device, model and precision: median seconds per step and fit, the answers, and ratios to float32's."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["device"], {}).setdefault(run["model"], {}).setdefault(run["precision"], []).append(run)
    for device, models in out.items():
        for label, precisions in models.items():
            for precision, mine in precisions.items():
                peaks = [r["peak_mb"] for r in mine if r["peak_mb"] is not None]
                precisions[precision] = {
                    "step_s": statistics.median(r["step_s"] for r in mine),
                    "fit_s": statistics.median(r["fit_s"] for r in mine),
                    "val_before": mine[0]["val_before"], "val_after": mine[0]["val_after"],
                    "losses": mine[0]["losses"], "peak_mb": max(peaks) if peaks else None}
            base = precisions["no"]
            for figures in precisions.values():
                figures["step_ratio"] = figures["step_s"] / base["step_s"]
                figures["val_diff"] = figures["val_after"] - base["val_after"]
                figures["max_loss_diff"] = max(abs(a - b) for a, b in zip(figures["losses"], base["losses"]))
    return out


def verdicts(data: dict) -> dict:
    """Whether bf16 (training, prediction) and compile should become CPU defaults: only if faster, answers equal."""
    cpu, predicting = data["training"]["cpu"], data["predicting"]["cpu"]
    train_faster = all(m["bf16"]["step_ratio"] < FASTER for m in cpu.values())
    train_equal = all(abs(m["bf16"]["val_diff"]) <= LOSS_TOLERANCE for m in cpu.values())
    predict_faster = all(m["bf16"]["ratio"] < FASTER for m in predicting.values())
    predict_equal = all(m["bf16"]["max_diff"] <= PROBA_TOLERANCE for m in predicting.values())
    compiled = data["compiling"]["cold"]["cpu"]
    compile_faster = compiled["ok"] and compiled["ratio"] < FASTER
    payback = compiled["compile_s"] / (compiled["eager_s"] - compiled["compiled_s"]) if compile_faster else None
    compile_ok = compile_faster and compiled["max_diff"] <= LOGIT_TOLERANCE and payback <= PAYBACK_CALLS
    return {"bf16_training": train_faster and train_equal, "bf16_training_faster": train_faster,
            "bf16_training_equal": train_equal, "bf16_predict": predict_faster and predict_equal,
            "bf16_predict_faster": predict_faster, "bf16_predict_equal": predict_equal, "compile": compile_ok,
            "compile_faster": compile_faster, "compile_payback_calls": payback}


def training_table(models: dict, device: str) -> str:
    memory = device == "cuda"
    lines = ["| model | precision | s / step | x float32 | validation log loss after | Δ vs float32 "
             "| max \\|Δ\\| step loss |" + (" peak CUDA memory (MiB) |" if memory else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if memory else "")]
    for label, precisions in models.items():
        for precision, f in precisions.items():
            lines.append(f"| {label} | {'float32' if precision == 'no' else precision} | {f['step_s']:.3f} "
                         f"| {f['step_ratio']:.2f} | {f['val_after']:.4f} (from {f['val_before']:.4f}) "
                         f"| {f['val_diff']:+.4f} | {f['max_loss_diff']:.1e} |"
                         + (f" {f['peak_mb']:,.0f} |" if memory else ""))
    return "\n".join(lines)


def predict_table(models: dict) -> str:
    lines = ["| model | precision | s / predict | x float32 | max \\|Δ probability\\| |", "|---|---|---|---|---|"]
    for label, precisions in models.items():
        for precision, f in precisions.items():
            lines.append(f"| {label} | {precision} | {f['s']:.3f} | {f['ratio']:.2f} | {f['max_diff']:.1e} |")
    return "\n".join(lines)


def compile_lines(compiling: dict) -> str:
    lines = ["| device | inductor cache | first call (compiling) s | eager s / call | compiled s / call | x eager "
             "| max \\|Δ logits\\| |", "|---|---|---|---|---|---|---|"]
    failures = []
    for cache, per_device in compiling.items():
        for device, c in per_device.items():
            if c["ok"]:
                lines.append(f"| {device} | {cache} | {c['compile_s']:.1f} | {c['eager_s']:.3f} | {c['compiled_s']:.3f} "
                             f"| {c['ratio']:.2f} | {c['max_diff']:.1e} |")
            else:
                failures.append(f"torch.compile on {device} ({cache} cache) failed: `{c['error']}`.")
    return ("\n".join(lines) if len(lines) > 2 else "") + ("\n\n" + "\n".join(failures) if failures else "")


def markdown(data: dict) -> str:
    size, v = data["sizes"], verdicts(data)
    cpu, predicting = data["training"]["cpu"], data["predicting"]["cpu"]
    step_ratios = ", ".join(f"{m['bf16']['step_ratio']:.1f}x ({label})" for label, m in cpu.items())
    val_diffs = ", ".join(f"{m['bf16']['val_diff']:+.4f} ({label})" for label, m in cpu.items())
    predict_ratios = ", ".join(f"{m['bf16']['ratio']:.1f}x ({label})" for label, m in predicting.items())
    proba_diffs = ", ".join(f"{m['bf16']['max_diff']:.1e} ({label})" for label, m in predicting.items())
    margin = f"faster meaning under {FASTER:.1f}x"
    bf16 = (f"**bf16 on the CPU: {'make it the default' if v['bf16_training'] else 'keep float32 the default'} for "
            f"training, {'make it the default' if v['bf16_predict'] else 'keep float32'} for prediction.** A bf16 "
            f"training step takes {step_ratios} float32's time ({'faster' if v['bf16_training_faster'] else 'not faster'}, {margin}), "
            f"validation log loss after the same steps differs by {val_diffs} "
            f"({'within' if v['bf16_training_equal'] else 'outside'} ±{LOSS_TOLERANCE}); a bf16 prediction takes "
            f"{predict_ratios} float32's time, its probabilities differ by at most {proba_diffs} "
            f"({'within' if v['bf16_predict_equal'] else 'outside'} {PROBA_TOLERANCE}).")
    cold = data["compiling"]["cold"]["cpu"]
    if not cold["ok"]:
        compiled = f"**torch.compile is not usable on this CPU**, so eager stays the default: `{cold['error']}`."
    else:
        equal = cold["max_diff"] <= LOGIT_TOLERANCE
        payback = (f"; compiling pays for itself after {v['compile_payback_calls']:,.0f} calls of this shape "
                   f"(at most {PAYBACK_CALLS:,} asked)" if v["compile_faster"] else "")
        compiled = (f"**torch.compile on the CPU: {'could become the default' if v['compile'] else 'keep eager the default'}.** "
                    f"It works here: the first call compiles for {cold['compile_s']:.0f} s (empty cache), then a "
                    f"call takes {cold['ratio']:.2f}x eager's time ({'faster' if v['compile_faster'] else 'not faster'} "
                    f"by the {1 - FASTER:.0%} margin), logits {'within' if equal else 'outside'} "
                    f"{LOGIT_TOLERANCE:.0e} of eager's ({cold['max_diff']:.1e}){payback}.")
    cuda = ""
    if "cuda" in data["training"]:
        cuda_train, cuda_predict = data["training"]["cuda"], data["predicting"]["cuda"]
        figures = "; ".join(
            f"{label}: " + ", ".join(f"{p} {f['step_ratio']:.2f}x the step time and {f['peak_mb'] / m['no']['peak_mb']:.2f}x "
                                     f"the peak memory (Δ validation log loss {f['val_diff']:+.4f})"
                                     for p, f in m.items() if p != "no")
            for label, m in cuda_train.items())
        cuda = f"""
### CUDA

Training:

{training_table(cuda_train, 'cuda')}

Prediction:

{predict_table(cuda_predict)}

Against float32 on CUDA: {figures}.
"""
    return f"""
{size['steps']} base-ft steps of {size['batch_size']} episodes ({size['context_size']} context + {size['query_size']} query rows)
on {size['train_rows']:,} rows of {size['n_features']} features (10% held out to validate on {size['val_rows']} rows at most,
one member); prediction of {size['predict_rows']:,} rows against {size['predict_context']:,} context rows with
{size['predict_members']} members; nano's forward on {size['compile_context']} + {size['compile_query']} rows for
torch.compile. CPU with one torch thread, {size['repeats']} interleaved round(s), medians.

Training on the CPU (`strategy.mixed_precision`):

{training_table(cpu, 'cpu')}

Prediction on the CPU (`torch.autocast` around `predict_proba`):

{predict_table(predicting)}

torch.compile of nano's network (one forward, no gradients):

{compile_lines(data['compiling'])}
{cuda}
{bf16}

{compiled}
"""


def run(out_dir: Path, quick: bool) -> dict:
    data = measure(quick)
    data["verdicts"] = verdicts(data)
    (Path(out_dir) / "precision.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"title": "Reduced precision and torch.compile",
            "markdown": markdown(data), "data": data,
            "commands": [COMMAND + (" --quick" if quick else "")]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(compile_child(json.loads(sys.argv[2]))))
    else:
        from bench import standalone

        standalone(__doc__, run)
