"""Run directories side by side: what varied between them, how each ended, what each measured.

The table behind ``tabtune report``, read from what runs wrote and nothing else: ``run.json`` (status,
error), ``config.yaml`` (the resolved config), ``metrics.json``, and a sweep folder's
``optimization_results.yaml`` (Hydra's Optuna sweeper). A failed or unfinished run is a row like any other,
its metrics empty and its error given.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

from .. import rundir
from ..errors import TabTuneError
from .metrics import METRICS, objective_metric

RESOURCES = ("fit_seconds", "predict_seconds", "peak_memory_mb", "trainable_params", "total_params")
# the config groups whose `name` is the option chosen: their other keys are that option's defaults
GROUPS = ("model", "strategy", "dataset")


def find_runs(folders: list[str | Path]) -> list[Path]:
    """The run directories (those holding run.json) among ``folders`` and under them, in job order."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if (folder / rundir.MANIFEST).is_file():
            found.append(folder)
        elif folder.is_dir():
            found += sorted((p.parent for p in folder.rglob(rundir.MANIFEST)), key=_natural)
        else:
            raise TabTuneError(f"report: {str(folder)!r} is not a folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise TabTuneError(f"report: no run directories (run.json) in {', '.join(map(str, folders))}")
    return unique


def _natural(path: Path) -> list:
    """``2_x`` before ``10_x``: a sweep's jobs in their order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for piece in path.parts for part in piece.replace("-", "_").split("_")]


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{"lora.r": 8, ...}``; lists stay whole."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_run(path: Path) -> dict:
    """One run directory's manifest, flattened config and metrics (None unless it completed)."""
    manifest = _read_json(path / rundir.MANIFEST) or {"status": "unreadable", "error": "run.json is unreadable"}
    config_file = path / "config.yaml"
    config = flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    metrics = _read_json(path / "metrics.json") if manifest.get("status") == "complete" else None
    status, error = manifest.get("status", "unknown"), manifest.get("error")
    if status == "complete" and metrics is None:
        error = "metrics.json is missing"
    if status == "running" and manifest.get("host") == socket.gethostname() and not rundir._alive(manifest.get("pid")):
        error = f"its process ({manifest.get('pid')}) is gone: killed before it could say so"
    return {"path": path, "status": status, "error": error, "config": config, "metrics": metrics}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def varying_keys(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between runs, in config order. A key of a group option
    (``model.n_estimators``) that differs only because the option does (``model=nano,tabicl``) is left out."""
    configs = [c for c in configs if c]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ = [k for k in keys if len({_same(c.get(k)) for c in configs}) > 1]
    chosen = []
    for key in differ:
        group, _, leaf = key.partition(".")
        if group in GROUPS and leaf != "name" and f"{group}.name" in differ:
            by_option = defaultdict(set)
            for c in configs:
                by_option[c.get(f"{group}.name")].add(_same(c.get(key)))
            if all(len(values) == 1 for values in by_option.values()):
                continue
        chosen.append(key)
    return chosen


def _same(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def column_name(key: str) -> str:
    """``strategy.name`` reads ``strategy``; other keys keep their dotted name."""
    group, _, leaf = key.partition(".")
    return group if group in GROUPS and leaf == "name" else key


def task_of(metrics: dict | None) -> str | None:
    test = (metrics or {}).get("test") or {}
    return "classification" if "log_loss" in test else "regression" if "rmse" in test else None


def report_frame(runs: list[dict]) -> pd.DataFrame:
    """One row a run: ``run`` (its path below the runs' common folder), the varying config keys, ``status``,
    ``test_<metric>`` and ``val_<metric>`` (metrics.json's values), fit and predict seconds, peak memory,
    parameter counts, ``error`` and ``path``."""
    paths = [r["path"] for r in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    varying = varying_keys([r["config"] for r in runs])
    tasks = [t for t in (task_of(r["metrics"]) for r in runs) if t]
    metric_names = [m for task in ("classification", "regression") if task in tasks for m in METRICS[task]]
    rows = []
    for r in runs:
        metrics = r["metrics"] or {}
        row = {"run": str(r["path"].relative_to(common)) if r["path"] != common else r["path"].name}
        row.update({column_name(k): r["config"].get(k) for k in varying})
        row["status"] = r["status"]
        for split in ("test", "val"):
            values = metrics.get(split) or {}
            row.update({f"{split}_{m}": values.get(m) for m in metric_names})
        row.update({k: metrics.get(k) for k in RESOURCES})
        row["error"] = r["error"]
        row["path"] = str(r["path"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("trainable_params", "total_params"):  # whole numbers, also beside a failed run's blank
        frame[column] = frame[column].astype("Int64")
    return frame


def headline_metric(frame: pd.DataFrame, metric: str | None = None) -> str:
    """The metric the plots show: ``metric`` when given, else accuracy (classification) or RMSE (regression),
    as the peft guide's trade-off does."""
    names = [c.removeprefix("test_") for c in frame.columns if c.startswith("test_")]
    if metric is not None:
        if metric not in names:
            raise TabTuneError(f"report: metric={metric} is not among these runs' metrics "
                               f"({', '.join(names) or 'none: no run completed'})")
        return metric
    return "accuracy" if "accuracy" in names else "rmse" if "rmse" in names else (names[0] if names else "accuracy")


def best_trial(sweep_dir: Path, runs: list[dict] | None = None) -> dict | None:
    """An Optuna sweep's best trial, from its optimization_results.yaml: ``run`` (the run directory whose
    config has the best parameters), ``params`` (as overrides), ``metric`` (the validation metric optimised)
    and ``value``; None when the folder holds no such file or no run matches."""
    results_file = Path(sweep_dir) / "optimization_results.yaml"
    if not results_file.is_file():
        return None
    results = yaml.safe_load(results_file.read_text()) or {}
    params, value = results.get("best_params") or {}, results.get("best_value")
    if runs is None:
        runs = [read_run(p) for p in find_runs([sweep_dir])]
    matches = [r for r in runs if r["status"] == "complete" and all(_matches(r["config"], k, v)
                                                                   for k, v in params.items())]
    if not matches:
        return None
    run = min(matches, key=lambda r: abs((_objective(r) or ("", math.inf))[1] - value) if value is not None else 0)
    name, _ = _objective(run) or ("objective", None)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return {"run": run["path"], "params": shown,
            "metric": f"val {name}", "value": value}


def _matches(config: dict, key: str, value) -> bool:
    have = config.get(key, config.get(f"{key}.name"))
    if isinstance(value, (int, float)) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return math.isclose(float(have), float(value), rel_tol=1e-9)
    return str(have) == str(value)


def _objective(run: dict) -> tuple[str, float] | None:
    """The validation metric a run returned to its sweeper (its config's ``objective``), and its value."""
    task = task_of(run["metrics"])
    if task is None:
        return None
    name = objective_metric(run["config"].get("objective", "auto"), task)
    value = ((run["metrics"] or {}).get("val") or {}).get(name)
    return (name, value) if value is not None else None
