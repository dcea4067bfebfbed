"""Every training row as context: peak memory and time of TabICL and TabPFN zero-shot at 10k and 50k rows.

tabtune's default is the package's: no cap on the context. This measures what that costs, tabtune beside the
package's own estimator at its defaults (``TabICLClassifier()``, ``TabPFNClassifier()``), on the same
random-weight checkpoint of the default size written in the official format. Each measurement runs in a
fresh process (peak RSS only grows), one after the other, on the CPU: fit on the context, then predict
``N_QUERY`` rows; peak RSS of the process and wall time of fit + predict. The largest difference between the
two sides' probabilities says that they computed the same thing. ``CONTEXT_ROWS=10000`` (comma-separated)
measures other sizes than 10k and 50k (50k on a 2-core CPU takes hours: a GPU machine's work);
``CONTEXT_MODELS=tabicl`` one model only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

N_FEATURES = 8
N_QUERY = 1000
SIZES = (10_000, 50_000)
QUICK_SIZES = (2_000,)


def _checkpoint(model: str, folder: Path) -> Path:
    """A random-weight checkpoint of the model's default size (noise on every weight), written by tabtune."""
    import dataclasses

    import torch

    from tabtune_cli.models.base import Task
    from tabtune_cli.models.registry import get_adapter

    adapter, task = get_adapter(model), Task("classification", 2)
    if model == "tabicl":
        architecture = {"max_classes": 10, "zero_init": False}
    else:
        from tabpfn.architectures import tabpfn_v2

        architecture = {"architecture_name": "tabpfn_v2", "estimator": "classifier",
                        "config": dataclasses.asdict(tabpfn_v2.TabPFNV2Config(max_num_classes=10, num_buckets=-1))}
    torch.manual_seed(0)
    module = adapter.from_architecture(architecture)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    return adapter.write_checkpoint(module, architecture, task, folder)


def _measure(side: str, model: str, path: str, n_rows: str, out: str) -> None:
    """One measurement, in this (fresh) process: fit + predict, peak RSS, probabilities saved for the comparison."""
    import time

    import numpy as np
    import torch

    from bench import binary_table

    torch.set_num_threads(2)
    n_rows = int(n_rows)
    X, y = binary_table(n_rows + N_QUERY, N_FEATURES)
    X_train, y_train, X_test = X.iloc[:n_rows], y.iloc[:n_rows], X.iloc[n_rows:]
    started = time.perf_counter()
    if side == "tabtune":
        from tabtune_cli import TabularPipeline

        pipe = TabularPipeline(model_name=model, tuning_strategy="inference", device="cpu",
                               tuning_params={"show_progress": False}, model_params={"checkpoint": path})
        proba = pipe.fit(X_train, y_train).predict_proba(X_test)
    elif model == "tabicl":
        from tabicl import TabICLClassifier

        proba = TabICLClassifier(model_path=path, device="cpu", allow_auto_download=False) \
            .fit(X_train, y_train).predict_proba(X_test)
    else:
        from tabpfn import TabPFNClassifier
        from tabpfn.settings import settings

        settings.tabpfn.allow_cpu_large_dataset = True  # its CPU refusal past 1,000 rows; computes the same
        proba = TabPFNClassifier(model_path=path, device="cpu").fit(X_train, y_train).predict_proba(X_test)
    seconds = time.perf_counter() - started
    from tabtune_cli.memory import peak_mb as probe  # this fresh process's peak resident set since its start

    peak_mb = probe(torch.device("cpu"))
    np.save(out + ".npy", np.asarray(proba, dtype=np.float64))
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def run(out_dir: Path, quick: bool) -> dict:
    import numpy as np

    sizes = QUICK_SIZES if quick else tuple(int(n) for n in os.environ.get("CONTEXT_ROWS", "").split(",") if n) or SIZES
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in os.environ.get("CONTEXT_MODELS", "tabicl,tabpfn").split(","):
            (tmp / model).mkdir()
            path = str(_checkpoint(model, tmp / model))
            for n_rows in sizes:
                figures = {}
                for side in ("package", "tabtune"):
                    out = str(tmp / f"{model}-{n_rows}-{side}")
                    subprocess.run([sys.executable, __file__, "--measure", side, model, path, str(n_rows), out],
                                   check=True)
                    figures[side] = {**json.loads(Path(out + ".json").read_text()), "proba": np.load(out + ".npy")}
                gap = float(np.abs(figures["tabtune"]["proba"] - figures["package"]["proba"]).max())
                entry = {"model": model, "context_rows": n_rows, "query_rows": N_QUERY, "max_abs_diff": gap,
                         **{f"{side}_{k}": figures[side][k] for side in figures for k in ("seconds", "peak_mb")}}
                data.append(entry)
                rows.append(f"| {model} | {n_rows:,} | {entry['package_peak_mb']:,.0f} | {entry['tabtune_peak_mb']:,.0f} "
                            f"| {entry['tabtune_peak_mb'] / entry['package_peak_mb']:.2f} | {entry['package_seconds']:.1f} "
                            f"| {entry['tabtune_seconds']:.1f} | {entry['tabtune_seconds'] / entry['package_seconds']:.2f} "
                            f"| {gap:.1e} |")
                print(rows[-1], flush=True)
    markdown = (
        f"Zero-shot with every training row as context (the packages' default and tabtune's), {N_FEATURES} numeric "
        f"features, {N_QUERY:,} query rows, random weights of the default size (TabICL 27.6M parameters, TabPFN v2 "
        "7.2M), CPU with 2 torch threads, each measurement in a fresh process. The package side is "
        "`TabICLClassifier()` / `TabPFNClassifier()` at their defaults (8 members; TabPFN `\"auto\"`) on the same "
        "checkpoint file.\n\n"
        "| model | context rows | package peak RSS (MB) | tabtune peak RSS (MB) | ratio | package s | tabtune s | "
        "ratio | max abs diff |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    return {"title": "Every row as context: memory and time (TabICL, TabPFN)", "markdown": markdown, "data": data,
            "commands": ["make bench ONLY=context_memory"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        _measure(*sys.argv[2:7])
    else:
        from bench import standalone

        standalone(__doc__, run)
