"""``tabtune leaderboard``: entries (model x strategy x overrides, or a scikit-learn baseline) side by side on
tables, scored on the same folds; mean ± standard deviation per metric, fit and predict seconds, peak memory
and parameter counts, as a table, ``leaderboard.csv``, ``leaderboard.md`` and PNGs in a run directory.

Shipped boards: ``conf/leaderboard.yaml`` (``make bench-nano``), ``leaderboard_strategies`` and
``leaderboard_lora_ranks`` (``tabtune leaderboard --config-name <name>``). Every entry is checked when the
config is composed, before any table is read: an unknown model, key or value is one line naming the entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import rundir
from ..config import LoraSettings, from_dict, group_defaults, to_dict
from ..data.builtin import BUILTIN, TARGET, load_builtin
from ..errors import TabTuneError
from .hydra_conf import check_overrides, conf_dir, one_line_errors
from ..strategies import check_combination, check_strategy, get_strategy

log = logging.getLogger("tabtune")
ENTRY_KEYS = ("model", "strategy", "overrides", "baseline")
TABLE_KEYS = ("path", "target", "name")
GROUPS = ("model", "strategy", "lora")  # what an entry's overrides may set
# the metrics the terminal and leaderboard.md show per task (leaderboard.csv has every one), headline first
SHOWN = {"classification": ("roc_auc", "accuracy", "log_loss"), "regression": ("rmse", "mae", "r2")}


# ---- tables --------------------------------------------------------------------------------------

def table_name(spec) -> str:
    """The name a table goes by on the board: its own, or its file's stem."""
    return spec if isinstance(spec, str) else str(spec.get("name") or Path(spec["path"]).stem)


def load_tables(specs: list, shared_dir: Path) -> dict:
    """``name -> (X, y)``: built-in tables by name, ``shared_dir``'s tables by name (its manifest.json),
    files as ``{path, target[, name]}``. A name found in neither is skipped with a line on stderr (a
    machine without the shared tables runs the built-in ones); a file that cannot be read is an error."""
    from ..data.io import read_table

    manifest_path = shared_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    tables = {}
    for spec in specs:
        name = table_name(spec)
        if not isinstance(spec, str):
            frame, target, source = read_table(spec["path"]), spec["target"], spec["path"]
        elif spec in BUILTIN:
            frame, target, source = load_builtin(spec), TARGET, f"built-in dataset {spec}"
        elif spec in manifest:
            frame, target = pd.read_parquet(shared_dir / manifest[spec]["file"]), manifest[spec]["target"]
            source = str(shared_dir / manifest[spec]["file"])
        else:
            print(f"skipped {spec}: not built in and not in {manifest_path}", file=sys.stderr)
            continue
        if target not in frame.columns:
            raise TabTuneError(f"{source}: target column {target!r} not found")
        if name in tables:
            raise TabTuneError(f"two tables are named {name!r}: give one a name (datasets: [{{path: ..., "
                               f"target: ..., name: other}}])")
        frame = frame[frame[target].notna()]
        tables[name] = (frame.drop(columns=target), frame[target])
    if not tables:
        raise TabTuneError(f"no tables to run: none of {[table_name(s) for s in specs]} is built in or in "
                           f"{manifest_path}")
    return tables


# ---- entries: checked at composition ------------------------------------------------------------

def parse_overrides(overrides, where: str) -> dict:
    """An entry's (or the board's) overrides, ``{lora: {r: 8}, strategy: {epochs: 3}}`` (or with dotted keys,
    ``{lora.r: 8}``), as ``{"lora.r": 8, "strategy.epochs": 3}``: each a ``model.``, ``strategy.`` or
    ``lora.`` setting (the keys themselves are checked against the train config's schemas later)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TabTuneError(f"{where}: a mapping of model / strategy / lora settings, e.g. {{lora: {{r: 8}}}}, "
                           f"got {overrides!r}")
    flat = {}
    for key, value in overrides.items():
        group, dot, setting = str(key).partition(".")
        if group not in GROUPS:
            raise TabTuneError(f"{where}: {key!r} is not a model, strategy or lora setting")
        if dot:
            flat[f"{group}.{setting}"] = value
        elif isinstance(value, dict):
            flat.update({f"{group}.{k}": v for k, v in value.items()})
        else:
            raise TabTuneError(f"{where}.{group}: a mapping of {group} settings, got {value!r} (the {group} "
                               f"itself is the entry's `{group}:` key)" if group != "lora" else
                               f"{where}.lora: a mapping of LoRA settings, got {value!r}")
    return flat


def check_entry(label: str, entry, values: dict) -> dict | str:
    """One entry as TabularPipeline keyword arguments (or a baseline's name), every setting checked as
    ``tabtune train`` checks it; a mistake is a TabTuneError naming the entry and the key."""
    from ..leaderboard import BASELINES
    from ..models.registry import get_spec

    where = f"entry {label!r}"
    if not isinstance(entry, dict):
        raise TabTuneError(f"{where}: expected a mapping with model, strategy and overrides (or baseline), "
                           f"got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise TabTuneError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(ENTRY_KEYS)})")
    if "baseline" in entry:
        if set(entry) - {"baseline"}:
            raise TabTuneError(f"{where}: a baseline takes no {sorted(set(entry) - {'baseline'})[0]}")
        if entry["baseline"] not in BASELINES:
            raise TabTuneError(f"{where}: unknown baseline {entry['baseline']!r} (known: {', '.join(BASELINES)})")
        return entry["baseline"]
    defaults = values["entry_defaults"]
    common = parse_overrides(defaults["overrides"], "entry_defaults.overrides")  # its errors name no entry
    try:
        spec = get_spec(entry.get("model", defaults["model"]))
        strategy_name = entry.get("strategy", defaults["strategy"])
        own = parse_overrides(entry.get("overrides"), "overrides")
        settings = {**common, **own}
        part = {g: {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith(f"{g}.")} for g in GROUPS}
        # the board's own progress bar stands in for each fit's
        tuner = get_strategy(strategy_name)
        strategy = from_dict(tuner.config_class, {**group_defaults("strategy", tuner.name),
                                                  "show_progress": False, **part["strategy"],
                                                  "name": tuner.name}, "strategy")
        check_strategy(strategy, spec)
        model = from_dict(spec.config_class, {**group_defaults("model", spec.name), **part["model"],
                                              "name": spec.name}, "model")
        lora = from_dict(LoraSettings, {**group_defaults("lora", "default"), **part["lora"]}, "lora")
        for warning in check_combination(model, strategy, lora, set(own)):
            log.warning(f"{where}: {warning}", extra={"config_warning": True})
        if not model.pretrained:
            spec.random_size(model)
    except TabTuneError as exc:
        raise TabTuneError(f"{where}: {exc}") from None
    tuning = {k: v for k, v in to_dict(strategy).items() if k in tuner.reads(strategy) - {"name"}}
    return {"model_name": spec.name, "tuning_strategy": tuner.name, "tuning_params": tuning,
            "model_params": to_dict(model), "peft_config": to_dict(lora) if tuner.lora else None,
            "device": values["device"]}


def check_board(cfg: DictConfig, given=frozenset()) -> tuple[dict, dict]:
    """The composed board's values and its entries (``check_entry``); a mistake is one line naming it."""
    from ..evaluation.metrics import METRICS

    values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    known = sorted({m for task in METRICS.values() for m in task})
    if values["metric"] != "auto" and values["metric"] not in known:
        raise TabTuneError(f"metric: {values['metric']!r} is not one of: auto, {', '.join(known)}")
    if values["splits"] < (2 if values["cv"] == "kfold" else 1):
        raise TabTuneError(f"splits: cv={values['cv']} needs {'at least 2 folds' if values['cv'] == 'kfold' else 'at least 1 split'}"
                           f", got {values['splits']}")
    if not 0 < values["test_size"] < 1:
        raise TabTuneError(f"test_size must be between 0 and 1, got {values['test_size']}")
    for key in ("max_train_rows", "max_test_rows", "threads"):
        if values[key] is not None and values[key] < 1:
            raise TabTuneError(f"{key} must be at least 1 (or null), got {values[key]}")
    if not values["datasets"]:
        raise TabTuneError("datasets: name at least one table (a built-in, a shared one, or {path, target})")
    for spec in values["datasets"]:
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(TABLE_KEYS))
            if unknown or not {"path", "target"} <= set(spec):
                raise TabTuneError(f"datasets: a file is {{path: <csv or parquet>, target: <column>[, name: ...]}}, "
                                   f"got {spec}")
        elif not isinstance(spec, str):
            raise TabTuneError(f"datasets: {spec!r} is neither a table's name nor {{path, target}}")
        elif spec.lower().endswith((".csv", ".parquet", ".pq")):
            raise TabTuneError(f"datasets: the file {spec!r} needs its target column: {{path: {spec}, target: <column>}}")
    if not values["entries"]:
        raise TabTuneError("entries: the board has no entries")
    entries = {str(label): check_entry(str(label), entry, values) for label, entry in values["entries"].items()}
    return values, entries


def check_tasks(entries: dict, tables: dict, metric: str) -> dict[str, str]:
    """``table -> task``, once every entry is known to do each table's task (and to find its checkpoint) and
    ``metric`` is one of every table's."""
    from ..data.dataset import infer_task
    from ..leaderboard import BASELINES
    from ..evaluation.metrics import METRICS
    from ..models.base import Task
    from ..models.registry import get_spec

    tasks = {name: infer_task(y) for name, (_, y) in tables.items()}
    for name, task in tasks.items():
        if metric != "auto" and metric not in METRICS[task]:
            raise TabTuneError(f"metric={metric} does not score {name} ({task}): choose one of "
                               f"{', '.join(METRICS[task])}, or metric=auto")
    for label, entry in entries.items():
        for task in dict.fromkeys(tasks.values()):
            table = next(n for n, t in tasks.items() if t == task)
            try:
                if isinstance(entry, str):
                    if task not in BASELINES[entry]:
                        raise TabTuneError(f"baseline {entry} does {' and '.join(BASELINES[entry])}, and table "
                                           f"{table} is {task}")
                    continue
                spec = get_spec(entry["model_name"])
                model = from_dict(spec.config_class, entry["model_params"], "model")
                spec.check_task(Task(task), entry["tuning_strategy"])
                spec.checkpoint_file(model, Task(task))
            except TabTuneError as exc:
                raise TabTuneError(f"entry {label!r}: {exc}") from None
    return tasks


# ---- the command -----------------------------------------------------------------------------------

def run(argv: list[str]) -> int:
    import hydra

    from .train import config_warnings_on_console

    with config_warnings_on_console():
        check_overrides(argv, "leaderboard", validate=check_board)
        sys.argv = ["tabtune leaderboard", *argv]
        main = hydra.main(config_path=str(conf_dir()), config_name="leaderboard", version_base="1.3")(
            one_line_errors(_job))
        main()
    return 0


def _job(cfg: DictConfig) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..leaderboard import TabularLeaderboard

    values, entries = check_board(cfg)
    try:
        tables = load_tables(values["datasets"], Path(values["shared_dir"]))
        tasks = check_tasks(entries, tables, values["metric"])
    except TabTuneError:
        _discard(Path(values["out_dir"]))
        raise
    limits = contextlib.nullcontext()
    if values["threads"] is not None:  # torch's threads, and the OpenMP / BLAS pools of the baselines
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(values["threads"])
        limits = threadpool_limits(values["threads"])
    board = TabularLeaderboard(tables, entries, splits=values["splits"], test_size=values["test_size"],
                               max_train_rows=values["max_train_rows"], max_test_rows=values["max_test_rows"],
                               seed=values["seed"], cv=values["cv"])
    out = rundir.create(values["out_dir"])
    rundir.write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    total = len(tables) * board.n_folds * len(entries)
    console = Console(stderr=True)
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("leaderboard", total=total)

        def on_start(dataset, fold, label):
            progress.update(bar, description=f"{escape(dataset)} · fold {fold + 1}/{board.n_folds} · {escape(label)}")

        def on_result(row):
            rundir.append_jsonl(out / "results.jsonl", row)
            if row["error"]:
                progress.console.print(f"[red]{escape(row['contender'])} failed on {escape(row['dataset'])} "
                                       f"fold {row['split'] + 1}:[/red] {escape(row['error'])}")
            progress.advance(bar)

        with limits:
            results = board.run(on_result=on_result, on_start=on_start)
    aggregated = TabularLeaderboard.aggregate(results, values["metric"])
    rundir.write_text(out / "folds.csv", results.rename(columns={"split": "fold"}).to_csv(index=False))
    rundir.write_text(out / "leaderboard.csv", aggregated.rename(columns={"dataset": "table", "contender": "entry"})
                      .to_csv(index=False))
    images = plots(aggregated, values["metric"], out, title(values, tasks))
    rundir.write_text(out / "leaderboard.md", to_markdown(aggregated, values, tasks, images))
    rundir.finish(out, "complete")
    console = show(aggregated, values["metric"], title(values, tasks))
    console.print(f"leaderboard: [bold]{escape(str(out))}[/bold] (leaderboard.csv, leaderboard.md, folds.csv, "
                  f"{', '.join(p.name for p in images)})")


def _discard(out: Path) -> None:
    """Take back the folder Hydra made for a board that never started, and its parents that are now empty
    (a relative ``out``: up to the folder it is relative to; an absolute one: its date folder only)."""
    for folder in [out, *out.parents][: 2 if out.is_absolute() else len(out.parts)]:
        try:
            folder.rmdir()
        except OSError:
            return


def title(values: dict, tasks: dict) -> str:
    """What the numbers are: the folds, and the rows each fold trains and tests on."""
    folds = (f"{values['splits']}-fold cross-validation" if values["cv"] == "kfold"
             else f"{values['splits']} seeded split{'s' if values['splits'] > 1 else ''} "
                  f"(test {values['test_size']:g})")
    caps = [f"≤{values[k]:,} {what} rows" for k, what in (("max_train_rows", "training"), ("max_test_rows", "test"))
            if values[k] is not None]
    return f"mean ± standard deviation over {folds}" + (f"; {', '.join(caps)}" if caps else "")


def plots(board: pd.DataFrame, metric: str, out: Path, subtitle: str) -> list[Path]:
    """``leaderboard.png`` (the headline metric per entry, with error bars) and ``leaderboard_fit_time.png``
    (the metric against fit seconds), one panel per table."""
    from ..leaderboard import headline
    from ..evaluation.plots import leaderboard_fit_time, leaderboard_scores

    tables = board[board["dataset"] != "all"]
    metrics = {name: headline(task, metric) for name, task in zip(tables["dataset"], tables["task"])}
    return [leaderboard_scores(tables, metrics, out / "leaderboard.png", f"leaderboard\n{subtitle}"),
            leaderboard_fit_time(tables, metrics, out / "leaderboard_fit_time.png",
                                 f"score against fit time\n{subtitle}")]


# ---- the table, in the terminal and in Markdown ----------------------------------------------------

def _shown(board: pd.DataFrame, metric: str) -> list[str]:
    """The columns shown: each task's metrics, headline first, then the costs."""
    from ..leaderboard import headline

    shown = []
    for task in dict.fromkeys(board["task"]):
        first = headline(task, metric)
        shown += [first, *(m for m in SHOWN[task] if m != first)]
    return [*dict.fromkeys(shown), "fit_seconds", "predict_seconds", "peak_memory_mb", "params"]


def _cell(row, column: str) -> str:
    """``mean ± std`` at a precision the column needs (leaderboard.csv has them whole); ``—`` where there is
    nothing (a baseline's memory and parameters)."""
    if column == "params":
        if _missing(row["total_params"]):
            return "—"
        return f"{int(row['trainable_params']):,} / {int(row['total_params']):,}"
    mean, std = row.get(f"{column}_mean"), row.get(f"{column}_std")
    if _missing(mean):
        return "—"
    if column == "peak_memory_mb":
        fmt = "{:,.0f}"
    elif column.endswith("_seconds"):
        fmt = "{:.2f}" if mean < 10 else "{:.1f}"
    else:
        fmt = "{:.3f}"
    return fmt.format(mean) + ("" if _missing(std) else f" ± {fmt.format(std)}")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


HEADERS = {"fit_seconds": "fit s", "predict_seconds": "predict s", "peak_memory_mb": "peak MiB",
           "params": "params (trainable / total)"}


def _rows(board: pd.DataFrame, metric: str):
    """``(header, rows)`` of the table shown: one row per (table, entry); no table column for one table."""
    columns = _shown(board, metric)
    several = board["dataset"].nunique() > 1
    header = [*(["table"] if several else []), "entry", "rank", *(HEADERS.get(c, c) for c in columns)]
    rows = []
    for _, row in board.iterrows():
        failed = f" (failed {row['failed']}/{row['failed'] + row['folds']})" if row["failed"] else ""
        rows.append((row["dataset"], [*([str(row["dataset"])] if several else []), f"{row['contender']}{failed}",
                                      str(row["rank"] or "—"), *(_cell(row, c) for c in columns)]))
    return header, rows


def _errors(board: pd.DataFrame) -> list[str]:
    """One line per entry that failed on a table: its first error."""
    failed = board[(board["failed"] > 0) & (board["dataset"] != "all")]
    return [f"{row['contender']} on {row['dataset']}: {row['error']}" for _, row in failed.iterrows()]


def show(board: pd.DataFrame, metric: str, subtitle: str) -> Console:
    """Print the board as a table, and the errors of entries that failed; return the console used."""
    header, rows = _rows(board, metric)
    tables = list(dict.fromkeys(board["dataset"]))
    table = Table(title=f"leaderboard{'' if len(tables) > 1 else ' — ' + tables[0]}: {subtitle}",
                  title_justify="left")
    longest = max(len(cells[header.index("entry")]) for _, cells in rows)
    for name in header:
        table.add_column(name, justify="left" if name in ("table", "entry") else "right",
                         no_wrap=name != "entry", min_width=min(longest, 32) if name == "entry" else None)
    previous = None
    for dataset, cells in rows:
        if previous is not None and dataset != previous:
            table.add_section()
        previous = dataset
        table.add_row(*map(escape, cells))
    console = Console()
    if not console.is_terminal:  # a log file keeps every column whole
        console = Console(width=max(console.width, Console(width=1000).measure(table).maximum))
    console.print(table)
    for line in _errors(board):
        console.print(f"[red]failed:[/red] {escape(line)}")
    return console


def to_markdown(board: pd.DataFrame, values: dict, tasks: dict, images: list[Path]) -> str:
    header, rows = _rows(board, values["metric"])
    ranked = values["metric"] if values["metric"] != "auto" else "ROC AUC (classification) / RMSE (regression)"
    tables = ", ".join(f"{name} ({task})" for name, task in tasks.items())
    lines = [f"# Leaderboard\n\nTables: {tables}. {title(values, tasks)}; ranked by {ranked}. Every metric at "
             f"full precision in `leaderboard.csv`, each fold in `folds.csv`.\n",
             "| " + " | ".join(header) + " |",
             "|" + "".join("---|" if h in ("table", "entry") else "---:|" for h in header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for _, cells in rows]
    lines.append("")
    lines += [f"- failed: {line}" for line in _errors(board)] + ([""] if _errors(board) else [])
    lines += [f"![{p.stem}]({p.name})\n" for p in images]
    return "\n".join(lines)
