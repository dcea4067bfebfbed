"""From the ``dataset`` config to train / validation / test frames, with errors that name the culprit."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import DatasetConfig
from ..errors import TabTuneError
from .builtin import BUILTIN, TARGET, load_builtin
from .checks import check_table, names
from .io import read_table
from .split import split_frame, subsample

log = logging.getLogger("tabtune")


@dataclass
class LoadedData:
    name: str
    target: str
    task: str
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    source: dict  # where the rows came from, with content hashes and the automatic treatments (a run's manifest)


def infer_task(y: pd.Series) -> str:
    """``regression`` for a numeric target with many distinct values, else ``classification``."""
    if pd.api.types.is_float_dtype(y) and y.nunique() > 20:
        return "regression"
    if pd.api.types.is_integer_dtype(y) and y.nunique() > 50:
        return "regression"
    return "classification"


def _checked(frame: pd.DataFrame, source: str, target: str, drop: list[str], treatments: list,
             text_columns: list | None) -> pd.DataFrame:
    if target not in frame.columns:
        shown = ", ".join(map(str, list(frame.columns)[:12])) + (" ..." if frame.shape[1] > 12 else "")
        raise TabTuneError(f"{source}: target column {target!r} not found (columns: {shown})")
    absent = [c for c in drop if c not in frame.columns]
    if absent:
        raise TabTuneError(f"{source}: dataset.drop_columns names {absent[0]!r}, which is not a column")
    frame = frame.drop(columns=drop)
    treatments.extend(check_table(frame, source, target=target, text_columns=text_columns))
    missing = int(frame[target].isna().sum())
    if missing == len(frame):
        raise TabTuneError(f"{source}: target column {target!r} has no values")
    if missing:
        message = f"{source}: {missing} row(s) without a {target!r} value: left out"
        log.warning(message)
        treatments.append({"case": "missing target", "source": source, "column": target, "message": message})
        frame = frame[frame[target].notna()]
    if frame.shape[1] < 2:
        raise TabTuneError(f"{source}: no feature columns besides the target {target!r}")
    return frame


def load_dataset(cfg: DatasetConfig, seed: int) -> LoadedData:
    """Read, check and split the configured table (train / val / test), stratified for classification.

    What was treated automatically on the way (``data.checks``, ``data.io``, ``data.split``) is logged and
    listed in ``source["treatments"]``."""
    treatments: list[dict] = []
    if cfg.path:
        source, name = cfg.path, Path(cfg.path).stem
        if not cfg.target:
            raise TabTuneError(f"{cfg.path}: dataset.target is not set (name the label column)")
        target, frame = cfg.target, read_table(cfg.path, treatments)
    elif cfg.builtin:
        if cfg.builtin not in BUILTIN:
            raise TabTuneError(f"dataset.builtin: unknown built-in dataset {cfg.builtin!r} "
                               f"(available: {', '.join(sorted(BUILTIN))})")
        source, name, target = f"built-in dataset {cfg.builtin}", cfg.builtin, cfg.target or TARGET
        frame = load_builtin(cfg.builtin)
    else:
        raise TabTuneError("dataset.path is not set (give a CSV or Parquet file, or choose dataset=<built-in>)")
    frame = _checked(frame, source, target, list(cfg.drop_columns), treatments, cfg.text_columns)
    unknown = [c for c in cfg.text_columns or [] if c not in frame.columns or c == target]
    if unknown:
        raise TabTuneError(f"{source}: dataset.text_columns names {unknown[0]!r}, which is not a feature column")
    if cfg.text_features < 0:
        raise TabTuneError(f"dataset.text_features must be 0 (drop text columns) or more, got {cfg.text_features}")
    task = infer_task(frame[target]) if cfg.task.value == "auto" else cfg.task.value
    if task == "classification" and frame[target].nunique() < 2:
        raise TabTuneError(f"{source}: target column {target!r} has a single class "
                           f"({frame[target].iloc[0]!r}); classification needs at least two")
    stratify = task == "classification"
    frame = subsample(frame, target, cfg.max_rows, stratify=stratify, seed=seed)
    if cfg.test_path and cfg.test_size is not None:
        raise TabTuneError(f"dataset.test_size={cfg.test_size} and dataset.test_path={cfg.test_path!r} both say "
                           f"which rows to test on: set one")
    if cfg.test_path:
        test = _checked(read_table(cfg.test_path, treatments), cfg.test_path, target, list(cfg.drop_columns),
                        treatments, cfg.text_columns)
        test = _same_columns(test, frame, cfg.test_path, source, treatments)
        rest = frame
    else:
        test_size = 0.2 if cfg.test_size is None else cfg.test_size
        if not 0 < test_size < 1:
            raise TabTuneError(f"dataset.test_size must be between 0 and 1, got {test_size}")
        rest, test = split_frame(frame, target, fraction=test_size, stratify=stratify, seed=seed,
                                 part="testing", treatments=treatments)
    if not 0 <= cfg.val_size < 1:
        raise TabTuneError(f"dataset.val_size must be in [0, 1), got {cfg.val_size}")
    train, val = split_frame(rest, target, fraction=cfg.val_size, stratify=stratify, seed=seed + 1,
                             part="validation", treatments=treatments)
    if len(train) < 2 or len(test) < 1:
        raise TabTuneError(f"{source}: too few rows to split ({len(frame)} rows)")
    if stratify:
        unseen = list(dict.fromkeys(test[target][~test[target].isin(set(train[target]))]))
        if unseen:
            raise TabTuneError(f"{cfg.test_path or source}: target {target!r} has value(s) the training table lacks: "
                               f"{names(unseen)} (the model cannot predict a class it never saw)")
    source = {"name": name, "path": cfg.path, "test_path": cfg.test_path, "builtin": cfg.builtin,
              "sha256": None if cfg.path is None else file_sha256(cfg.path),
              "test_sha256": None if cfg.test_path is None else file_sha256(cfg.test_path),
              "rows": {"table": int(len(frame)), "train": len(train), "val": len(val), "test": len(test)},
              "treatments": treatments}
    return LoadedData(name=name, target=target, task=task, train=train, val=val, test=test, source=source)


def _same_columns(test: pd.DataFrame, train: pd.DataFrame, test_source: str, train_source: str,
                  treatments: list) -> pd.DataFrame:
    """The test table with the training table's columns: one it lacks is an error, extra ones are left out."""
    lacks = [str(c) for c in train.columns if c not in test.columns]
    if lacks:
        raise TabTuneError(f"{test_source}: its columns differ from the training table's ({train_source}): it lacks "
                           f"{names(lacks)}")
    extra = [str(c) for c in test.columns if c not in train.columns]
    if extra:
        message = f"{test_source}: column(s) {names(extra)} are not in the training table ({train_source}): ignored"
        log.warning(message)
        treatments.append({"case": "test columns", "source": test_source, "column": None, "message": message})
    return test[list(train.columns)]


def file_sha256(path) -> str:
    """The SHA-256 of a file, or of a folder's files in name order (Mitra's checkpoint is a folder)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
