"""``tabtune report <dir> [<dir> ...] [output=<dir>] [metric=<name>]``: runs side by side.

Each ``<dir>`` is a run directory or a folder holding some (a sweep: ``runs/multirun/<date>/<time>``;
any folder of runs). One row a run: the config keys that vary between the runs, its status (a failed or
unfinished run with its error), its test metrics, fit and predict seconds, peak memory and parameter
counts. Printed as a table, and written as ``report.csv`` (every metric, test and validation, at full
precision), ``report.md`` and PNGs: ``report_runs.png`` (the metric per run; the metric against fit time)
and, when ``lora.r`` varies, ``report_lora_rank.png`` (metric, fit seconds, peak memory and trainable
parameters against rank: the peft guide's trade-off). They go into the one folder given, or ``output=``.
An Optuna sweep's best trial (its optimization_results.yaml) is named and marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import rundir
from ..errors import TabTuneError
from ..evaluation.metrics import HIGHER_IS_BETTER
from ..evaluation.plots import rank_tradeoff, runs_overview
from ..evaluation.report import (RESOURCES, best_trial, column_name, find_runs, headline_metric, read_run,
                                 report_frame, varying_keys)
from .args import key_values

HELP = """usage: tabtune report <dir> [<dir> ...] [output=<dir>] [metric=<name>]

Runs side by side: the config keys that vary between them, status (and error), test metrics, fit and predict
seconds, peak memory, trainable / total parameters. <dir>: a sweep folder (runs/multirun/<date>/<time>), any
folder of run directories, or run directories. Writes report.csv, report.md and PNGs (report_runs.png; for a
LoRA rank sweep report_lora_rank.png: metric, time, memory and parameters against rank) into the one folder
given, or output=<dir>. metric= picks the metric plotted (default: accuracy, or rmse for regression)."""

# the test metrics the terminal shows (report.md and report.csv have them all)
SHOWN = {"classification": ("accuracy", "roc_auc", "log_loss"), "regression": ("rmse", "mae", "r2")}
HEADERS = {"fit_seconds": "fit s", "predict_seconds": "predict s", "peak_memory_mb": "peak MiB"}


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    folders = [a for a in argv if "=" not in a]
    options = key_values([a for a in argv if "=" in a], "report", ("output", "metric"))
    if not folders:
        raise TabTuneError("report: name a sweep folder or run directories: tabtune report runs/multirun/<date>/<time>")
    output = _output_folder(folders, options.get("output"))
    runs = [read_run(p) for p in find_runs(folders)]
    frame = report_frame(runs)
    metric = headline_metric(frame, options.get("metric"))
    best = best_trial(output, runs) or next((b for b in (best_trial(Path(f), runs) for f in folders) if b), None)
    if best is not None:
        frame.insert(1, "best", frame["path"] == str(best["run"]))
    varying = [column_name(k) for k in varying_keys([r["config"] for r in runs])]

    output.mkdir(parents=True, exist_ok=True)
    rundir.write_text(output / "report.csv", frame.to_csv(index=False))
    images = _plots(frame, runs, varying, metric, output)
    rundir.write_text(output / "report.md", _markdown(frame, varying, best, images, output))
    _show(frame, varying, metric, best)
    print(f"written: {output / 'report.csv'}, report.md, {', '.join(p.name for p in images)}")
    return 0


def _output_folder(folders: list[str], output: str | None) -> Path:
    """``output=``; else the one folder given when it is not itself a run directory (a sweep's folder)."""
    if output is not None:
        return Path(output)
    if len(folders) == 1 and not (Path(folders[0]) / rundir.MANIFEST).is_file():
        return Path(folders[0])
    raise TabTuneError("report: several run directories: say where the report goes with output=<folder>")


def _label(row: pd.Series, varying: list[str]) -> str:
    """A run as the plots name it: its job number (or name), then what varied."""
    name = Path(row["run"]).name
    head = name.split("_", 1)[0] if name.split("_", 1)[0].isdigit() else name
    values = ", ".join(f"{k}={'null' if _missing(row[k]) else _value(row[k])}" for k in varying)
    return f"{head}: {values}" if values else head


def _plots(frame: pd.DataFrame, runs: list[dict], varying: list[str], metric: str, output: Path) -> list[Path]:
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    title = _title(runs, varying)
    overview = pd.DataFrame({"label": [_label(row, varying) for _, row in frame.iterrows()],
                             "status": frame["status"], "metric": frame.get(f"test_{metric}"),
                             "fit_seconds": frame["fit_seconds"]})
    images = [runs_overview(overview, metric, better, output / "report_runs.png", title)]
    if "lora.r" in varying and f"test_{metric}" in frame:
        ranks = pd.to_numeric(frame["lora.r"], errors="coerce")  # lora.r=auto has no place on the axis
        done = frame[frame[f"test_{metric}"].notna() & ranks.notna()]
        if done["lora.r"].nunique() > 1:
            # what else varied makes the lines; keys that follow the rank (lora_alpha = 2r) do not
            others = [k for k in varying if k != "lora.r" and done.groupby("lora.r")[k].nunique().max() > 1]
            points = pd.DataFrame({"rank": ranks[done.index].astype(int), "metric": done[f"test_{metric}"],
                                   "fit_seconds": done["fit_seconds"], "peak_memory_mb": done["peak_memory_mb"],
                                   "trainable_params": done["trainable_params"],
                                   "series": done.apply(lambda row: ", ".join(f"{k}={_value(row[k])}"
                                                                              for k in others), axis=1)})
            if points["series"].nunique() > 6:  # a search's learning rates: one cloud, not a legend of dozens
                points["series"] = ""
            images.append(rank_tradeoff(points, metric, better, output / "report_lora_rank.png",
                                        f"LoRA rank: accuracy, speed and memory · {title}"
                                        if metric == "accuracy" else f"LoRA rank trade-off · {title}"))
    return images


def _title(runs: list[dict], varying: list[str]) -> str:
    """What the runs share: model · strategy · dataset (those that do not vary)."""
    config = next((r["config"] for r in runs if r["config"]), {})
    parts = [str(config.get(f"{g}.name")) for g in ("model", "strategy", "dataset")
             if g not in varying and config.get(f"{g}.name") is not None]
    return " · ".join(parts) or "runs"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _value(value) -> str:
    if _missing(value):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(column: str, value) -> str:
    if _missing(value):
        return "—"
    if column in ("trainable_params", "total_params", "peak_memory_mb"):
        return f"{value:,.0f}"
    if column.endswith("_seconds"):
        return f"{value:.2f}"
    if column.startswith(("test_", "val_")):
        return f"{value:.4f}"
    if column == "best":
        return "★" if value else ""
    return _value(value)


def _columns(frame: pd.DataFrame, varying: list[str], metrics: list[str], best,
             errors: bool = True) -> list[tuple[str, str]]:
    """(column, header) pairs of a shown table."""
    columns = [("run", "run")] + ([("best", "best")] if best else []) + [(k, k) for k in varying]
    columns.append(("status", "status"))
    if best:
        columns.append((f"val_{best['metric'].removeprefix('val ')}", best["metric"]))
    columns += [(f"test_{m}", m) for m in metrics if f"test_{m}" in frame]
    columns += [(k, HEADERS.get(k, k)) for k in RESOURCES if k not in ("trainable_params", "total_params")]
    columns.append(("params", "trainable / total"))
    return columns + ([("error", "error")] if errors and frame["error"].notna().any() else [])


def _row(frame_row: pd.Series, columns) -> list[str]:
    cells = []
    for column, _ in columns:
        if column == "params":
            cells.append("—" if _missing(frame_row["total_params"]) else
                         f"{_cell('trainable_params', frame_row['trainable_params'])} / "
                         f"{_cell('total_params', frame_row['total_params'])}")
        else:
            cells.append(_cell(column, frame_row.get(column)))
    return cells


def _shown_metrics(frame: pd.DataFrame, metric: str) -> list[str]:
    names = [m for task in ("classification", "regression") for m in SHOWN[task] if f"test_{m}" in frame]
    return names if metric in names else [metric, *names]


def _show(frame: pd.DataFrame, varying: list[str], metric: str, best) -> None:
    console = Console()
    columns = _columns(frame, varying, _shown_metrics(frame, metric), best, errors=False)
    table = Table(title=f"{len(frame)} runs: {_counts(frame)}")
    for column, header in columns:
        table.add_column(header, justify="left" if column in ("run", "status", *varying) else "right")
    for _, row in frame.iterrows():
        style = None if row["status"] == "complete" else "red"
        table.add_row(*(escape(c) for c in _row(row, columns)), style=style)
    # whole rows, wider than the terminal if need be: squeezed, rich would fold numbers digit by digit
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    (Console(width=needed) if needed > console.width else console).print(table)
    for _, row in frame[frame["error"].notna()].iterrows():  # whole, below the table: errors are long
        console.print(f"[red]{escape(row['run'])}: {row['status']}:[/red] {escape(str(row['error']))}")
    if best is not None:
        console.print(f"best trial: [bold]{escape(Path(best['run']).name)}[/bold] ({escape(best['params'])}): "
                      f"{best['metric']} {best['value']:.4g}")


def _counts(frame: pd.DataFrame) -> str:
    counts = frame["status"].value_counts()
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _markdown(frame: pd.DataFrame, varying: list[str], best, images: list[Path], output: Path) -> str:
    metrics = [c.removeprefix("test_") for c in frame.columns if c.startswith("test_")]
    columns = _columns(frame, varying, metrics, best)
    lines = [f"# tabtune report: {output}", "", f"{len(frame)} runs: {_counts(frame)}.", ""]
    if best is not None:
        lines += [f"Best trial (Optuna): `{Path(best['run']).name}` ({best['params']}): "
                  f"{best['metric']} {best['value']:.4g}.", ""]
    lines.append("| " + " | ".join(header for _, header in columns) + " |")
    lines.append("|" + "".join(" --- |" if c in ("run", "status", "error", *varying) else " ---: |"
                               for c, _ in columns))
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(row, columns)) + " |")
    lines.append("")
    lines += [f"![{image.stem}]({image.name})" for image in images]
    return "\n".join(lines) + "\n"
