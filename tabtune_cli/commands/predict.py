"""``tabtune predict`` and ``tabtune evaluate``: a finished run on a new table.

``predict run=<run dir> data=<csv|parquet> [output=<file>] [id=<column>] [overwrite=true] [device=...]``
writes one row per input row, in the input's order: the ``id=`` column when given, then ``prediction`` and, for
classification, ``proba_<label>`` per class (the columns of the run's ``predictions.parquet``). The format
follows ``output``'s extension (``.csv``, ``.parquet``); the default is ``<data stem>.predictions.parquet``
beside the input table.

``evaluate run=<run dir> data=<file> [target=<column>] [output=<file.json>] [overwrite=true] [device=...]``
prints every metric of the run's task and writes them as JSON, by default ``<data stem>.metrics.json`` beside
the input table. ``target`` defaults to the run's ``dataset.target`` (its ``config.yaml``).

Both load the run with ``TabularPipeline.load``, so the table meets the same schema check as the library
(``data/schema.py``); the run's target, its ``dataset.drop_columns`` and the ``id=`` column are dropped first
without a warning. An output file is never written over unless ``overwrite=true``, and it is written
atomically. A run directory whose ``run.json`` does not say ``complete`` is refused; what
``TabularPipeline.save`` wrote (a folder without ``run.json``, or one file) is accepted, with ``target=``
required for evaluate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import rundir
from ..data.io import read_table
from ..errors import TabTuneError
from .args import key_values

log = logging.getLogger("tabtune")

PREDICT_KEYS = ("run", "data", "output", "id", "overwrite", "device")
EVALUATE_KEYS = ("run", "data", "target", "output", "overwrite", "device")
DEVICES = ("auto", "cpu", "cuda")
HELP = {
    "predict": """usage: tabtune predict run=<run dir> data=<csv|parquet> [output=<file>] [id=<column>] [overwrite=true]
                       [device=auto|cpu|cuda]

Writes, for each row of data (in its order), the id column when id= is given, then `prediction` and, for
classification, `proba_<label>` per class. output's extension picks CSV or Parquet; default:
<data stem>.predictions.parquet beside data. An existing file is kept unless overwrite=true.
The table is matched to the training columns by name (README: Predict and evaluate).""",
    "evaluate": """usage: tabtune evaluate run=<run dir> data=<csv|parquet> [target=<column>] [output=<file.json>]
                        [overwrite=true] [device=auto|cpu|cuda]

Prints every metric of the run's task on the labelled table and writes them as JSON; default:
<data stem>.metrics.json beside data. target defaults to the run's dataset.target.""",
}
TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


# ---- arguments ---------------------------------------------------------------------------------

def parse_args(argv: list[str], command: str, keys: tuple[str, ...]) -> dict | None:
    """``key=value`` arguments as a dict (None for ``--help``)."""
    if any(item in ("-h", "--help", "help") for item in argv):
        print(HELP[command])
        return None
    args = key_values(argv, command, keys, required=("run", "data"), flags={"overwrite": False},
                      usage=f"tabtune {command} run=<run dir> data=<csv|parquet>")
    if args.get("device", "auto") not in DEVICES:
        raise TabTuneError(f"tabtune {command}: device must be one of {', '.join(DEVICES)}, got {args['device']!r}")
    return args


def output_path(given: str | None, data: Path, default_suffix: str, suffixes: tuple[str, ...],
                overwrite: bool) -> Path:
    """Where the result goes: ``given``, else beside ``data``; an existing file is refused unless ``overwrite``."""
    path = Path(given) if given else data.with_name(data.stem + default_suffix)
    if path.suffix.lower() not in suffixes:
        raise TabTuneError(f"output={path}: unsupported file type {path.suffix!r} (use {' or '.join(suffixes)})")
    if path.is_dir():
        raise TabTuneError(f"output={path}: is a folder; name a file")
    if path.exists() and not overwrite:
        raise TabTuneError(f"{path} already exists (pass overwrite=true to replace it, or output=<another file>)")
    return path


# ---- the run -----------------------------------------------------------------------------------

def open_run(path: str) -> tuple[Path, dict]:
    """``(run dir, its resolved config or {})`` for a complete run or a pipeline saved by the library (a folder
    without ``run.json``, or one file); anything else is a one-line error."""
    run_dir = Path(path)
    if run_dir.is_file():  # one file written by TabularPipeline.save('x.joblib'): load reads (and checks) it
        return run_dir, {}
    if not run_dir.is_dir():
        raise TabTuneError(f"run={run_dir}: no such run directory")
    manifest = run_dir / rundir.MANIFEST
    if manifest.is_file() and not rundir.is_complete(run_dir):
        try:
            status = json.loads(manifest.read_text()).get("status")
        except ValueError:
            status = "unreadable"
        raise TabTuneError(f"{run_dir}: the run is not complete (run.json says {status!r}); "
                           f"only a finished run can be used")
    if not (run_dir / "pipeline.json").is_file():
        raise TabTuneError(f"{run_dir}: not a run directory or saved pipeline (pipeline.json is missing)")
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return run_dir, config or {}


def recorded_target(config: dict) -> str | None:
    """The training target's column name, from the run's resolved config (None for a bare saved pipeline)."""
    dataset = config.get("dataset") or {}
    if dataset.get("target"):
        return str(dataset["target"])
    if dataset.get("builtin"):
        from ..data.builtin import TARGET

        return TARGET
    return None


def load_pipeline(run_dir: Path, device: str | None):
    from ..pipeline import TabularPipeline

    return TabularPipeline.load(run_dir, device=device)


def not_features(config: dict, *columns: str | None) -> set[str]:
    """The column names that are known not to be features: ``columns`` and the run's ``dataset.drop_columns``."""
    dropped = (config.get("dataset") or {}).get("drop_columns") or []
    return {str(c) for c in (*columns, *dropped) if c is not None}


def features(frame: pd.DataFrame, pipeline, known: set[str]) -> pd.DataFrame:
    """``frame`` less the columns the run knows are not features (target, dropped, id), unless the model reads them."""
    inputs = {str(c) for c in pipeline.preprocessor_.state.get("input_columns") or []}
    return frame.drop(columns=[c for c in frame.columns if str(c) in known - inputs])


@contextlib.contextmanager
def warnings_to_stderr():
    """Show the schema check's warnings (and any other) as ``tabtune: warning: ...`` lines while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("tabtune: warning: %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def _write(path: Path, write) -> Path:
    try:
        return write(path)
    except OSError as exc:
        raise TabTuneError(f"{path}: cannot write it ({exc.strerror or exc})") from None


# ---- predict -----------------------------------------------------------------------------------

def run(argv: list[str]) -> int:
    """Entry for ``tabtune predict ARGS``."""
    args = parse_args(argv, "predict", PREDICT_KEYS)
    if args is None:
        return 0
    run_dir, config = open_run(args["run"])
    data = Path(args["data"])
    out = output_path(args.get("output"), data, ".predictions.parquet", TABLE_SUFFIXES, args["overwrite"])
    frame = read_table(data)
    id_column = args.get("id")
    if id_column is not None and id_column not in frame.columns:
        raise TabTuneError(f"{data}: id column {id_column!r} not found (columns: {_shown(frame.columns)})")
    console = Console()
    started = time.perf_counter()
    with warnings_to_stderr(), console.status(escape(f"loading {run_dir}")):
        pipeline = load_pipeline(run_dir, args.get("device"))
        X = features(frame, pipeline, not_features(config, recorded_target(config), id_column))
        predictions = predict_table(pipeline, X, frame[id_column] if id_column else None)
    seconds = time.perf_counter() - started
    if out.suffix.lower() == ".csv":
        _write(out, lambda path: rundir.write_file(path, lambda tmp: predictions.to_csv(tmp, index=False)))
    else:
        _write(out, lambda path: rundir.write_parquet(path, predictions))
    show_predict_summary(console, pipeline, run_dir, data, out, predictions, seconds)
    return 0


def predict_table(pipeline, X: pd.DataFrame, ids: pd.Series | None = None) -> pd.DataFrame:
    """One row per row of ``X``: the id (when given), ``prediction``, and ``proba_<label>`` per class."""
    out = pd.DataFrame(index=pd.RangeIndex(len(X)))
    if ids is not None:
        clash = ids.name == "prediction" or str(ids.name).startswith("proba_")
        if clash:
            raise TabTuneError(f"id column {ids.name!r} would clash with an output column; rename it")
        out[ids.name] = ids.to_numpy()
    if pipeline.task_.is_classification:
        proba = pipeline.predict_proba(X)
        out["prediction"] = pipeline.label_encoder_.inverse(proba.argmax(axis=1))
        out["prediction"] = out["prediction"].astype(str)  # as in predictions.parquet: labels as text
        for k, label in enumerate(pipeline.classes_):
            out[f"proba_{label}"] = proba[:, k]
    else:
        out["prediction"] = np.asarray(pipeline.predict(X), dtype="float64")
    return out


def show_predict_summary(console: Console, pipeline, run_dir: Path, data: Path, out: Path,
                         predictions: pd.DataFrame, seconds: float) -> None:
    table = Table(title="tabtune predict", show_header=False)
    table.add_column("")
    table.add_column("", overflow="fold")
    table.add_row("run", escape(f"{run_dir} ({pipeline.model_name} · {pipeline.tuning_strategy})"))
    table.add_row("data", escape(f"{data} ({len(predictions)} rows)"))
    if pipeline.task_.is_classification:
        counts = predictions["prediction"].value_counts()
        table.add_row("classes", escape(f"{len(pipeline.classes_)}: " + ", ".join(
            f"{label} ({int(counts.get(str(label), 0))} predicted)" for label in pipeline.classes_)))
    else:
        values = predictions["prediction"]
        table.add_row("predictions", f"regression: mean {values.mean():.4g}, min {values.min():.4g}, "
                                     f"max {values.max():.4g}")
    table.add_row("seconds", f"{seconds:.2f} (load and predict)")
    table.add_row("output", escape(str(out)))
    console.print(table)


# ---- evaluate ----------------------------------------------------------------------------------

def evaluate(argv: list[str]) -> int:
    """Entry for ``tabtune evaluate ARGS``."""
    args = parse_args(argv, "evaluate", EVALUATE_KEYS)
    if args is None:
        return 0
    run_dir, config = open_run(args["run"])
    target = args.get("target") or recorded_target(config)
    if target is None:
        raise TabTuneError(f"{run_dir}: no training target is recorded (no config.yaml): pass target=<column>")
    data = Path(args["data"])
    out = output_path(args.get("output"), data, ".metrics.json", (".json",), args["overwrite"])
    frame = read_table(data)
    if target not in frame.columns:
        raise TabTuneError(f"{data}: target column {target!r} not found (columns: {_shown(frame.columns)})")
    console = Console()
    with warnings_to_stderr():
        labelled = frame[frame[target].notna()]
        if labelled.empty:
            raise TabTuneError(f"{data}: target column {target!r} has no values")
        if len(labelled) < len(frame):
            log.warning("%d row(s) without a %r value are left out", len(frame) - len(labelled), target)
        with console.status(escape(f"loading {run_dir}")):
            pipeline = load_pipeline(run_dir, args.get("device"))
        y = labelled[target]
        if not pipeline.task_.is_classification:
            values = pd.to_numeric(y, errors="coerce")
            if values.isna().any():
                raise TabTuneError(f"{data}: target column {target!r} holds values that are not numbers "
                                   f"(e.g. {y[values.isna()].iloc[0]!r}); the run does regression")
            y = values.astype("float64")
        X = features(labelled, pipeline, not_features(config, target))
        with console.status(f"predicting {len(X)} rows"):
            metrics = pipeline.evaluate(X, y)
    seconds = metrics.pop("predict_seconds")
    record = {"run": str(run_dir), "data": str(data), "target": target, "task": pipeline.task_.kind,
              "rows": len(X), "metrics": metrics, "predict_seconds": seconds}
    _write(out, lambda path: rundir.write_json(path, record))
    show_evaluate_summary(console, pipeline, record, out)
    return 0


def show_evaluate_summary(console: Console, pipeline, record: dict, out: Path) -> None:
    table = Table(title="tabtune evaluate")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record["metrics"].items():
        table.add_row(name, "—" if value is None else f"{value:.4f}")
    table.add_section()
    table.add_row("rows", str(record["rows"]))
    table.add_row("predict seconds", f"{record['predict_seconds']:.2f}")
    console.print(table)
    console.print(escape(f"run: {record['run']} ({pipeline.model_name} · {pipeline.tuning_strategy})"))
    console.print(escape(f"data: {record['data']} (target {record['target']!r})"))
    console.print(f"metrics written to: [bold]{escape(str(out))}[/bold]")


def _shown(columns) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
