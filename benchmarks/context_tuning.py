"""Context tuning on nano: learned context rows (``strategy=context``) against zero-shot, base-ft and peft.

The tables, splits and scoring are ``finetune_nano``'s (the leaderboard's tables and the five regression
tables split at the median, flights among them; one seeded split each; the shipped weights and settings).
This run measures zero-shot and context tuning; base-ft and peft are read from ``<out>/finetune_nano.jsonl``
(the same splits and weights, measured by ``make bench ONLY=finetune_nano``), and each table's zero-shot
ROC AUC here must equal the one stored there (to 1e-9), which shows the split and the weights are the
same. Fit seconds of those two come from that run, not this one. Predict seconds are per 1,000 test rows,
with every setting as shipped: zero-shot and base-ft / peft read every training row as context, context
tuning reads its ``strategy.context_rows`` learned rows only.

Run alone: ``python benchmarks/context_tuning.py [--quick] [--tables a,b] [--out bench]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICK_CONTEXT = {"epochs": 1, "steps_per_epoch": 6, "context_size": 128, "query_size": 32}


def stored_rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "finetune_nano.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]


def to_markdown(rows: list[dict], settings: dict) -> str:
    frame = pd.DataFrame(rows)
    frame["predict_s_per_1k"] = frame.predict_seconds / frame.test_rows * 1000
    order = ["inference", "context", "base-ft", "peft"]
    names = {"inference": "zero-shot", "context": "context", "base-ft": "base-ft", "peft": "peft"}
    lines = ["| table | strategy | ROC AUC | log loss | fit s | predict s / 1k rows |", "|---|---|---|---|---|---|"]
    for table in dict.fromkeys(frame.table):
        for strategy in order:
            r = frame[(frame.table == table) & (frame.strategy == strategy)]
            if len(r):
                r = r.iloc[0]
                lines.append(f"| {table} | {names[strategy]} | {r.roc_auc:.4f} | {r.log_loss:.4f} | "
                             f"{r.fit_seconds:.0f} | {r.predict_s_per_1k:.2f} |")
    complete = [t for t in dict.fromkeys(frame.table)
                if set(order) <= set(frame[frame.table == t].strategy)]
    means = ["| strategy | tables | mean ROC AUC | mean log loss | median fit s | median predict s / 1k rows |",
             "|---|---|---|---|---|---|"]
    for strategy in order:
        part = frame[(frame.strategy == strategy) & frame.table.isin(complete)]
        if len(part):
            means.append(f"| {names[strategy]} | {len(part)} | {part.roc_auc.mean():.4f} | {part.log_loss.mean():.4f} | "
                         f"{part.fit_seconds.median():.0f} | {part.predict_s_per_1k.median():.2f} |")
    ctx = frame[frame.strategy == "context"].set_index("table")
    zero = frame[frame.strategy == "inference"].set_index("table")
    both = [t for t in ctx.index if t in zero.index]
    d_auc = {t: ctx.roc_auc[t] - zero.roc_auc[t] for t in both}
    verdict = (f"Context tuning against zero-shot: ROC AUC higher on {sum(v > 0 for v in d_auc.values())} of "
               f"{len(both)} tables, lower on {sum(v < 0 for v in d_auc.values())} (largest loss "
               f"{max([0.0, *(-v for v in d_auc.values())]):.4f}); mean change {np.mean(list(d_auc.values())):+.4f}."
               if both else "")
    return (f"Settings: {json.dumps(settings)}. Means over the {len(complete)} tables with all four rows.\n\n"
            + "\n".join(means) + "\n\n" + verdict + "\n\n" + "\n".join(lines) + "\n")


def run(out_dir: Path, quick: bool, tables: list[str] | None = None) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import finetune_nano as fn
    from tabtune_cli.config import group_defaults

    torch.set_num_threads(1)  # as finetune_nano: figures per thread
    tables = tables or (fn.QUICK_TABLES if quick else fn.leaderboard_tables() + fn.REGRESSION)
    stored = [] if quick else stored_rows(out_dir)
    tuning = {"context": QUICK_CONTEXT} if quick else {}
    settings = {"context": {**group_defaults("strategy", "context"), **tuning.get("context", {})}}
    rows, skipped, mismatched = [], [], []
    for name in tables:
        try:
            mine = fn.run_table(name, quick, strategies=("inference", "context"), tuning=tuning)
        except Exception as exc:  # noqa: BLE001 - a table that cannot run is reported, the rest go on
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        for r in mine:
            print(f"context_tuning: {name} {r['strategy']}: ROC AUC {r['roc_auc']:.4f} log loss {r['log_loss']:.4f} "
                  f"({r['fit_seconds']:.0f} s)", flush=True)
        theirs = [r for r in stored if r["table"] == name and r["strategy"] in ("inference", "base-ft", "peft")]
        zero = next((r for r in theirs if r["strategy"] == "inference"), None)
        if zero is not None and abs(zero["roc_auc"] - mine[0]["roc_auc"]) > 1e-9:
            mismatched.append(name)  # not the same split or weights: its stored rows are not comparable
            theirs = []
        rows += mine + [r for r in theirs if r["strategy"] != "inference"]
    markdown = to_markdown(rows, settings) if rows else "No table ran.\n"
    if mismatched:
        markdown += f"\nStored base-ft / peft rows left out (zero-shot differs from finetune_nano's): {mismatched}\n"
    if skipped:
        markdown += "\nNot run: " + "; ".join(skipped) + "\n"
    return {"title": "Context tuning on nano: learned context rows against zero-shot, base-ft and peft",
            "markdown": markdown, "data": {"rows": rows, "settings": settings, "skipped": skipped,
                                           "mismatched": mismatched},
            "commands": [f"python benchmarks/context_tuning.py{' --quick' if quick else ''}",
                         "make bench ONLY=context_tuning"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", default="", help="comma-separated (default: all)")
    args = parser.parse_args()
    result = run(Path(args.out), args.quick, [t for t in args.tables.split(",") if t] or None)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
