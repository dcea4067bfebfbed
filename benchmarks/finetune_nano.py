"""Fine-tuning that trains: nano (the shipped weights) zero-shot, base-ft and peft, with the shipped defaults.

Tables: the leaderboard's (``conf/leaderboard.yaml``) and the five regression tables (diabetes,
concrete, california, diamonds, flights) turned binary at the training rows' median. One seeded
split per table: 30% held out, then at most ``TRAIN_ROWS`` training and ``TEST_ROWS`` test rows
(stratified). Each strategy is a ``TabularPipeline`` with every setting as shipped
(``conf/strategy/*.yaml``, ``conf/model/nano.yaml``); fine-tuning holds out 10% of the training
rows to validate on, and they join the context afterwards. Test ROC AUC (macro one-vs-rest on
multi-class) and log loss come from the model's default prediction (64 members, calibrated).

Run alone: ``python benchmarks/finetune_nano.py [--quick] [--tables a,b] [--out bench]``; rows are
appended to ``<out>/finetune_nano.jsonl`` as they finish (after a first line of the settings), so a
partial run still shows its tables (``--render`` writes the table from that file), and a run stopped
part-way goes on from the tables it finished when started again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
REGRESSION = ["diabetes", "concrete", "california", "diamonds", "flights"]
TRAIN_ROWS, TEST_ROWS = 1024, 1000
# tables are sampled to this many rows before splitting (adult, flights, ...): the split only keeps ~1,500
MAX_TABLE_ROWS = 20_000
# "paired": zero-shot on fine-tuning's own split (preprocessing fitted on the same 90% of the training rows,
# the 10% validation rows joining the context after), so that its difference from base-ft / peft is
# fine-tuning's alone; "inference" is zero-shot as a user runs it, on every training row
STRATEGIES = ("inference", "paired", "base-ft", "peft")
QUICK_TABLES = ["pima", "concrete"]
# --quick checks the benchmark runs (< 2 minutes): short training, few members; not figures to quote
QUICK_TUNING = {"epochs": 1, "steps_per_epoch": 6, "context_size": 128, "query_size": 32}
QUICK_MODEL = {"n_estimators": 4}


def leaderboard_tables() -> list[str]:
    from omegaconf import OmegaConf

    return list(OmegaConf.load(ROOT / "conf" / "leaderboard.yaml")["datasets"])


def load_table(name: str, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """``(X, y)``: a leaderboard table as it is, or a regression table's target as above/below its median."""
    from tabtune_cli.commands.leaderboard import load_tables

    X, y = load_tables([name], SHARED)[name]
    if len(X) > MAX_TABLE_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), MAX_TABLE_ROWS, replace=False))
        X, y = X.iloc[keep], y.iloc[keep]
    return X.reset_index(drop=True), y.reset_index(drop=True)


def split_table(name: str, X: pd.DataFrame, y: pd.Series, seed: int = 0):
    """``(X_train, y_train, X_test, y_test)``; regression targets split at the training rows' median."""
    from tabtune_cli.data.split import split_frame, subsample

    regression = name in REGRESSION
    frame = X.assign(__target__=y.to_numpy())
    train, test = split_frame(frame, "__target__", fraction=0.3, stratify=not regression, seed=seed)
    if regression:
        median = float(train["__target__"].median())
        train, test = (part.assign(__target__=np.where(part["__target__"] > median, "above", "below"))
                       for part in (train, test))
    train = subsample(train, "__target__", TRAIN_ROWS, stratify=True, seed=seed)
    test = subsample(test, "__target__", TEST_ROWS, stratify=True, seed=seed)
    return (train.drop(columns="__target__"), train["__target__"].rename("target"),
            test.drop(columns="__target__"), test["__target__"].rename("target"))


def score(pipe, X_test: pd.DataFrame, y_test: pd.Series) -> dict:
    """Test ROC AUC and log loss, and the seconds the prediction took."""
    from tabtune_cli.evaluation.metrics import compute_metrics

    started = time.perf_counter()
    proba = pipe.predict_proba(X_test)
    seconds = time.perf_counter() - started
    codes = pipe.label_encoder_.transform(y_test)
    metrics = compute_metrics("classification", codes, proba)
    return {"roc_auc": metrics["roc_auc"], "log_loss": metrics["log_loss"], "predict_seconds": seconds}


def run_table(name: str, quick: bool, seed: int = 0, strategies=STRATEGIES, tuning: dict | None = None,
              model_params: dict | None = None, on_row=None) -> list[dict]:
    """One row per strategy on table ``name``: steps, seconds, test ROC AUC and log loss."""
    from tabtune_cli import TabularPipeline
    from tabtune_cli.data.split import split_frame

    X, y = load_table(name, seed)
    X_train, y_train, X_test, y_test = split_table(name, X, y, seed)
    rows = []
    for strategy in strategies:
        params = {"show_progress": False}
        if strategy not in ("inference", "paired"):  # a training strategy
            params.update(QUICK_TUNING if quick else {}, **(tuning or {}).get(strategy, {}))
        model = {**(QUICK_MODEL if quick else {}), **(model_params or {})}
        started = time.perf_counter()
        pipe = TabularPipeline("nano", tuning_strategy="inference" if strategy == "paired" else strategy,
                               tuning_params=params, model_params=model, device="cpu", seed=seed)
        if strategy == "paired":  # the hold-out fit() makes for fine-tuning (same fraction, seed, stratified)
            rest, held = split_frame(X_train.assign(__target__=y_train.to_numpy()), "__target__", fraction=0.1,
                                     stratify=True, seed=seed)
            pipe.fit(rest.drop(columns="__target__"), rest["__target__"].rename(y_train.name),
                     X_val=held.drop(columns="__target__"), y_val=held["__target__"].rename(y_train.name))
        else:
            pipe.fit(X_train, y_train)
        fit_seconds = time.perf_counter() - started
        r = pipe.train_result_
        row = {"table": name, "strategy": strategy, "train_rows": len(X_train), "test_rows": len(X_test),
               "classes": int(len(pipe.classes_)), "fit_seconds": fit_seconds,
               "steps": 0 if r is None else r.steps, "best_step": 0 if r is None else r.best_step,
               "val_seconds": 0.0 if r is None else r.val_seconds,
               "val_before": None if r is None else r.val_before, "val_best": None if r is None else r.best_val,
               # (step, validation log loss, validation ROC AUC) at every validation pass
               "val_history": [] if r is None else [(h["step"], h["val_log_loss"], h.get("val_roc_auc"))
                                                    for h in r.history if "val_log_loss" in h],
               **score(pipe, X_test, y_test)}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def verdicts(rows: list[dict], baseline: str = "inference") -> dict:
    """Per fine-tuning strategy against ``baseline`` (zero-shot, or the paired zero-shot): tables where it
    is better in both ROC AUC and log loss, where it is worse in either, and the largest ROC AUC loss."""
    frame = pd.DataFrame(rows)
    start = frame[frame.strategy == baseline].set_index("table")
    out = {}
    for strategy in ("base-ft", "peft"):
        tuned = frame[frame.strategy == strategy].set_index("table")
        tables = [t for t in tuned.index if t in start.index]
        d_auc = {t: tuned.roc_auc[t] - start.roc_auc[t] for t in tables}
        d_ll = {t: tuned.log_loss[t] - start.log_loss[t] for t in tables}
        out[strategy] = {
            "tables": len(tables),
            "beats_both": [t for t in tables if d_auc[t] > 0 and d_ll[t] < 0],
            "kept_start": [t for t in tables if tuned.best_step[t] == 0],
            "worse_auc": [t for t in tables if d_auc[t] < 0],
            "worse_log_loss": [t for t in tables if d_ll[t] > 0],
            "largest_auc_loss": float(max([0.0, *(-v for v in d_auc.values())])),
            "mean_auc_change": float(np.mean(list(d_auc.values()))) if tables else None,
            "mean_log_loss_change": float(np.mean(list(d_ll.values()))) if tables else None,
        }
    return out


def to_markdown(rows: list[dict], settings: dict) -> str:
    frame = pd.DataFrame(rows)
    start = frame[frame.strategy == "inference"].set_index("table")
    paired = frame[frame.strategy == "paired"].set_index("table")
    lines = ["| table | train / test rows | zero-shot ROC AUC / log loss | paired zero-shot | strategy | "
             "steps (best) | fit s (validation s) | ROC AUC | Δ | log loss | Δ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for table in dict.fromkeys(frame.table):
        if table not in start.index:
            continue
        s = start.loc[table]
        pair = (f"{paired.roc_auc[table]:.4f} / {paired.log_loss[table]:.4f}" if table in paired.index else "")
        for r in frame[(frame.table == table) & frame.strategy.isin(["base-ft", "peft"])].itertuples():
            lines.append(f"| {table} | {r.train_rows} / {r.test_rows} | {s.roc_auc:.4f} / {s.log_loss:.4f} | {pair} | "
                         f"{r.strategy} | {r.steps} ({r.best_step}) | {r.fit_seconds:.0f} ({r.val_seconds:.0f}) | "
                         f"{r.roc_auc:.4f} | {r.roc_auc - s.roc_auc:+.4f} | {r.log_loss:.4f} | "
                         f"{r.log_loss - s.log_loss:+.4f} |")
    summary = []
    for baseline, label in (("inference", "zero-shot"), ("paired", "the paired zero-shot")):
        if baseline not in set(frame.strategy):
            continue
        for strategy, v in verdicts(rows, baseline).items():
            summary.append(
                f"- **{strategy}** against {label}: better in both ROC AUC and log loss on {len(v['beats_both'])} "
                f"of {v['tables']} tables; ROC AUC lower on {len(v['worse_auc'])} "
                f"({', '.join(v['worse_auc']) or 'none'}), largest loss {v['largest_auc_loss']:.4f}; log loss "
                f"higher on {len(v['worse_log_loss'])} ({', '.join(v['worse_log_loss']) or 'none'}); mean change "
                f"ROC AUC {v['mean_auc_change']:+.4f}, log loss {v['mean_log_loss_change']:+.4f}; the starting "
                f"weights kept on {len(v['kept_start'])} ({', '.join(v['kept_start']) or 'none'}).")
    zero, tuned = frame[frame.strategy == "inference"], frame[frame.strategy.isin(["base-ft", "peft"])]
    timing = (f"Zero-shot predicts the test rows in {zero.predict_seconds.median():.0f} s (median); "
              f"fine-tuning takes {tuned.fit_seconds.median():.0f} s per fit (median; "
              f"{tuned.steps.median():.0f} steps), of which validation {tuned.val_seconds.median():.0f} s "
              f"({(tuned.val_seconds / tuned.fit_seconds).median():.0%}).")
    return (f"Settings: {json.dumps(settings)}. 'steps (best)': optimizer steps run, and the step whose weights "
            f"were kept (0: the start). Δ: fine-tuned minus zero-shot (ROC AUC higher is better, log loss lower). "
            f"'paired zero-shot': zero-shot on fine-tuning's own split (preprocessing fitted on the same 90% of "
            f"the training rows), which fine-tuning matches when it keeps the start.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n\n" + timing + "\n")


def shipped_settings() -> dict:
    from tabtune_cli.config import group_defaults

    keys = ("epochs", "steps_per_epoch", "learning_rate", "batch_size", "context_size", "query_size",
            "warmup_steps", "early_stopping_patience", "val_max_rows", "val_n_estimators")
    return {s: {k: group_defaults("strategy", s).get(k) for k in keys} for s in ("base-ft", "peft")}


def finished_rows(log_path: Path, settings: dict, tables: list[str]) -> list[dict]:
    """The rows of tables an earlier run with the same settings finished (every strategy), from its log."""
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    if not lines or json.loads(lines[0]).get("settings") != settings:
        return []
    rows = [json.loads(line) for line in lines[1:]]
    whole = {t for t in tables if {r["strategy"] for r in rows if r["table"] == t} == set(STRATEGIES)}
    return [r for r in rows if r["table"] in whole]


def run(out_dir: Path, quick: bool, tables: list[str] | None = None) -> dict:
    import torch

    torch.set_num_threads(1)  # the machine is shared; figures are per thread
    tables = tables or (QUICK_TABLES if quick else leaderboard_tables() + REGRESSION)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "finetune_nano.jsonl"
    settings = {"quick": QUICK_TUNING} if quick else shipped_settings()
    done = finished_rows(log_path, settings, tables)  # an interrupted run goes on where it stopped
    log_path.write_text("".join(json.dumps(x) + "\n" for x in [{"settings": settings}, *done]))

    def on_row(row):
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"finetune_nano: {row['table']} {row['strategy']}: ROC AUC {row['roc_auc']:.4f} "
              f"log loss {row['log_loss']:.4f} ({row['steps']} steps, {row['fit_seconds']:.0f} s)", flush=True)

    rows, skipped = list(done), []
    for name in tables:
        if any(r["table"] == name for r in done):
            continue
        try:
            rows += run_table(name, quick, on_row=on_row)
        except Exception as exc:  # noqa: BLE001 - a table that cannot run is reported, the rest go on
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    rows.sort(key=lambda r: tables.index(r["table"]))
    markdown = to_markdown(rows, settings) if rows else "No table ran.\n"
    if skipped:
        markdown += "\nNot run: " + "; ".join(skipped) + "\n"
    return {"title": "Fine-tuning nano: base-ft and peft against zero-shot",
            "markdown": markdown,
            "data": {"rows": rows, "verdicts": verdicts(rows) if rows else {},
                     "verdicts_paired": verdicts(rows, "paired") if rows else {}, "settings": settings,
                     "skipped": skipped},
            "commands": [f"python benchmarks/finetune_nano.py{' --quick' if quick else ''}",
                         "make bench ONLY=finetune_nano"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", default="", help="comma-separated (default: all)")
    parser.add_argument("--render", action="store_true", help="only write the table from <out>/finetune_nano.jsonl")
    args = parser.parse_args()
    if args.render:
        rows = [json.loads(line) for line in (Path(args.out) / "finetune_nano.jsonl").read_text().splitlines()[1:]]
        markdown = to_markdown(rows, shipped_settings())
        (Path(args.out) / "finetune_nano.md").write_text(markdown)
        print(markdown)
        return 0
    result = run(Path(args.out), args.quick, [t for t in args.tables.split(",") if t] or None)
    (Path(args.out) / "finetune_nano.md").write_text(f"## {result['title']}\n\n{result['markdown']}")
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
