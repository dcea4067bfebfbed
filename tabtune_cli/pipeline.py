"""TabularPipeline: preprocess, build the model, apply the strategy, predict — the engine behind the CLI.

Follows scikit-learn's conventions: ``__init__`` only stores its arguments,
``fit`` does the work, fitted state ends in ``_``.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import rundir
from .config import (LoraSettings, StrategyConfig, StrategyName, check_strategy, from_dict, to_dict)
from .data.dataset import infer_task
from .data.preprocess import LabelEncoder
from .data.split import split_frame
from .errors import TabTuneError
from .evaluation.metrics import compute_metrics
from .models.base import Task, predict_classes
from .models.registry import get_adapter
from .tuning import lora
from .tuning.trainer import Split, train

FORMAT_VERSION = 1
WEIGHT_FILES = {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TabTuneError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class TabularPipeline:
    """A tabular foundation model on one table: ``fit`` then ``predict`` / ``predict_proba`` / ``evaluate``."""

    def __init__(self, model_name: str = "tabicl", task_type: str = "auto", tuning_strategy: str = "inference",
                 tuning_params: dict | None = None, model_params: dict | None = None,
                 peft_config: dict | None = None, device: str = "auto", seed: int = 0,
                 text_columns: list | None = None, text_features: int = 8):
        self.model_name = model_name
        self.task_type = task_type
        self.tuning_strategy = tuning_strategy
        self.tuning_params = tuning_params
        self.model_params = model_params
        self.peft_config = peft_config
        self.device = device
        self.seed = seed
        self.text_columns = text_columns
        self.text_features = text_features

    # ---- configuration ---------------------------------------------------------------------
    def _configs(self):
        adapter = get_adapter(self.model_name)
        strategy = from_dict(StrategyConfig, {**(self.tuning_params or {}), "name": self.tuning_strategy}, "tuning_params")
        check_strategy(strategy)
        model_params = {k: v for k, v in (self.model_params or {}).items() if k != "name"}
        model_config = from_dict(adapter.config_class, {**model_params, "name": adapter.name}, "model_params")
        lora_settings = from_dict(LoraSettings, self.peft_config, "peft_config")
        if self.task_type not in ("auto", "classification", "regression"):
            raise TabTuneError(f"task_type: {self.task_type!r} is not one of: auto, classification, regression")
        return adapter, strategy, model_config, lora_settings

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X: pd.DataFrame, y, X_val: pd.DataFrame | None = None, y_val=None, on_record=None):
        """Fit preprocessing on ``X``, build the model and apply the strategy; ``X_val`` drives early stopping."""
        adapter, strategy, model_config, lora_settings = self._configs()
        X, y = self._check_xy(X, y, "X")
        kind = infer_task(y) if self.task_type == "auto" else self.task_type
        trains = strategy.name != StrategyName.inference
        held_out = trains and X_val is None
        if held_out:
            # hold out part of the training rows for validation and early stopping
            joined = X.assign(__target__=y.to_numpy())
            rest, held = split_frame(joined, "__target__", fraction=0.1, stratify=kind == "classification", seed=self.seed)
            X, y = rest.drop(columns="__target__"), rest["__target__"].rename(y.name)
            X_val, y_val = held.drop(columns="__target__"), held["__target__"].rename(y.name)
        started = time.perf_counter()
        device = resolve_device(self.device)
        torch.manual_seed(self.seed)

        self.preprocessor_ = adapter.preprocessor(model_config, self.text_columns, self.text_features).fit(X, y)
        X_train = self.preprocessor_.transform(X)
        if kind == "classification":
            self.label_encoder_ = LabelEncoder().fit(y)
            self.classes_ = np.asarray(self.label_encoder_.classes, dtype=object)
            if len(self.classes_) < 2:
                raise TabTuneError(f"target {y.name!r} has a single class ({self.classes_[0]!r}); "
                                   f"classification needs at least two")
            y_train = self.label_encoder_.transform(y)
            task = Task("classification", len(self.classes_))
        else:
            self.label_encoder_ = None
            values = pd.to_numeric(y, errors="coerce").astype("float64")
            if values.isna().any():
                raise TabTuneError(f"target {y.name!r} has non-numeric values; it cannot be a regression target")
            self.target_scale_ = (float(values.mean()), float(values.std(ddof=0)) or 1.0)
            y_train = self._scale(values.to_numpy())
            task = Task("regression")
        adapter.check_task(task, strategy.name.value)

        module, self.architecture_ = adapter.build(model_config, task)
        module.to(device)
        self._base_state_ = None if model_config.pretrained else {k: v.detach().cpu().clone()
                                                                    for k, v in module.state_dict().items()}
        if strategy.name == StrategyName.peft:
            module = lora.wrap(adapter, module, lora_settings)
        else:
            module.requires_grad_(strategy.name == StrategyName.base_ft)

        self.adapter_, self.task_, self.module_, self.device_ = adapter, task, module, device
        self.strategy_, self.model_config_, self.lora_settings_ = strategy, model_config, lora_settings
        self.context_X_, self.context_y_ = X_train, y_train
        self.train_result_ = None
        if trains:
            X_val, y_val = self._check_xy(X_val, y_val, "X_val")
            val = Split(self.preprocessor_.transform(X_val), self._encode_target(y_val))
            self.train_result_ = train(adapter, module, task, Split(X_train, y_train), val, strategy, model_config,
                                       device, self.seed, on_record=on_record)
            if held_out:  # rows held out only to choose the epoch are the user's training rows: context again
                self.context_X_ = np.concatenate([X_train, val.X])
                self.context_y_ = np.concatenate([y_train, val.y])
        module.eval()
        self.fit_seconds_ = time.perf_counter() - started
        self.rows_ = {"train": int(len(X_train)), "val": int(0 if X_val is None else len(X_val))}
        return self

    @staticmethod
    def _check_xy(X, y, name):
        if not isinstance(X, pd.DataFrame):
            X = pd.DataFrame(np.asarray(X), columns=[f"x{i}" for i in range(np.asarray(X).shape[1])])
        y = pd.Series(np.asarray(y), name=getattr(y, "name", None) or "target", index=X.index)
        if len(X) == 0:
            raise TabTuneError(f"{name} is empty: no rows to fit on")
        if y.isna().any():
            raise TabTuneError(f"target {y.name!r} has {int(y.isna().sum())} missing values; drop those rows first")
        return X, y

    def _scale(self, values: np.ndarray) -> np.ndarray:
        mean, std = self.target_scale_
        return ((values - mean) / std).astype(np.float32)

    def _encode_target(self, y: pd.Series) -> np.ndarray:
        if self.task_.is_classification:
            return self.label_encoder_.transform(y)
        return self._scale(pd.to_numeric(y, errors="coerce").astype("float64").to_numpy())

    # ---- predicting ------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "module_"):
            raise TabTuneError("this TabularPipeline is not fitted yet: call fit() first")

    def _predict_raw(self, X: pd.DataFrame) -> np.ndarray:
        self._check_fitted()
        if not isinstance(X, pd.DataFrame):
            X = pd.DataFrame(np.asarray(X), columns=self.preprocessor_.state["input_columns"])
        Xq = self.preprocessor_.transform(X)
        labels = self.context_y_ if self.task_.is_classification else None
        ctx = self.adapter_.prediction_context(labels, len(self.context_y_), self.model_config_, self.seed)
        return predict_classes(self.adapter_, self.module_, self.context_X_[ctx], self.context_y_[ctx], Xq,
                               self.task_, self.model_config_, self.device_)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        self._check_fitted()
        if not self.task_.is_classification:
            raise TabTuneError("predict_proba is for classification; this pipeline does regression")
        return self._predict_raw(X)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted labels (classification) or values in the target's own units (regression)."""
        raw = self._predict_raw(X)
        if self.task_.is_classification:
            return self.label_encoder_.inverse(raw.argmax(axis=1))
        mean, std = self.target_scale_
        return raw * std + mean

    def evaluate(self, X: pd.DataFrame, y) -> dict:
        """The metric dict for ``(X, y)``: classification or regression metrics, plus ``predict_seconds``."""
        self._check_fitted()
        started = time.perf_counter()
        raw = self._predict_raw(X)
        seconds = time.perf_counter() - started
        y = pd.Series(np.asarray(y))
        if self.task_.is_classification:
            metrics = compute_metrics("classification", self.label_encoder_.transform(y), raw)
        else:
            mean, std = self.target_scale_
            metrics = compute_metrics("regression", y.astype("float64").to_numpy(), raw * std + mean)
        return {**metrics, "predict_seconds": seconds}

    def summary(self) -> dict:
        """Fit-time facts for metrics.json: seconds, peak memory, parameter counts, rows."""
        self._check_fitted()
        params = list(self.module_.parameters())
        out = {"fit_seconds": self.fit_seconds_, "peak_memory_mb": _peak_memory_mb(self.device_),
               "trainable_params": int(sum(p.numel() for p in params if p.requires_grad)),
               "total_params": int(sum(p.numel() for p in params)), "rows": dict(self.rows_)}
        if self.train_result_ is not None:
            r = self.train_result_
            out["training"] = {"best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "steps": r.steps,
                               "val_before": r.val_before, "val_best": r.best_val}
        return out

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write everything ``load`` needs into the folder ``path`` (safetensors and JSON only)."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        strategy = self.strategy_.name
        staging = Path(tempfile.mkdtemp(prefix=".save-", dir=path))
        weights = None
        try:
            if strategy == StrategyName.base_ft:
                weights = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
            elif self._base_state_ is not None:
                weights = self._base_state_
            if weights is not None:
                save_file(weights, staging / "model.safetensors")
            if strategy == StrategyName.peft:
                self.module_.save_pretrained(staging)
            for stale in WEIGHT_FILES - {p.name for p in staging.iterdir()}:
                (path / stale).unlink(missing_ok=True)
            save_file({"X": torch.as_tensor(self.context_X_), "y": torch.as_tensor(self.context_y_)},
                      staging / "context.safetensors")
            (staging / "preprocessor.json").write_text(json.dumps(self.preprocessor_.to_json(), indent=1))
            for item in sorted(staging.iterdir()):
                if item.is_file():
                    item.replace(path / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        meta = {
            "format": FORMAT_VERSION, "model_name": self.adapter_.name, "task": {"kind": self.task_.kind,
                                                                                  "n_classes": self.task_.n_classes},
            "tuning_strategy": strategy.value, "tuning_params": to_dict(self.strategy_),
            "model_params": to_dict(self.model_config_), "peft_config": to_dict(self.lora_settings_),
            "device": self.device, "seed": self.seed, "architecture": self.architecture_,
            "text_columns": self.text_columns, "text_features": self.text_features,
            "classes": None if self.label_encoder_ is None else list(self.label_encoder_.classes),
            "target_scale": getattr(self, "target_scale_", None),
            "base_weights": "model.safetensors" if weights is not None else "checkpoint",
            "summary": self.summary(),
        }
        rundir.write_json(path / "pipeline.json", meta)  # last: its presence means the save is whole
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "TabularPipeline":
        """Rebuild a saved pipeline; its predictions equal the saved one's."""
        path = Path(path)
        meta_path = path / "pipeline.json"
        if not meta_path.is_file():
            raise TabTuneError(f"{path}: no saved pipeline here (pipeline.json is missing)")
        meta = json.loads(meta_path.read_text())
        tuning = {k: v for k, v in meta["tuning_params"].items() if k != "name"}
        self = cls(meta["model_name"], meta["task"]["kind"], meta["tuning_strategy"], tuning, meta["model_params"],
                   meta["peft_config"], device or meta["device"], meta["seed"], meta.get("text_columns"),
                   meta.get("text_features", 8))
        adapter, strategy, model_config, lora_settings = self._configs()
        task = Task(meta["task"]["kind"], meta["task"]["n_classes"])
        self.device_ = resolve_device(self.device)
        self._base_state_ = None
        if meta["base_weights"] == "model.safetensors":
            module = adapter.from_architecture(meta["architecture"])
            state = load_file(path / "model.safetensors")
            module.load_state_dict(state)
            if strategy.name != StrategyName.base_ft:
                self._base_state_ = state  # not reproducible from a checkpoint: a later save writes it again
        else:
            module, _ = adapter.build(model_config, task)
        module.to(self.device_)
        if strategy.name == StrategyName.peft:
            module = lora.load(module, path)
        module.eval()
        self.adapter_, self.task_, self.module_, self.architecture_ = adapter, task, module, meta["architecture"]
        self.strategy_, self.model_config_, self.lora_settings_ = strategy, model_config, lora_settings
        self.preprocessor_ = adapter.preprocessor_from_json(json.loads((path / "preprocessor.json").read_text()),
                                                            model_config)
        context = load_file(path / "context.safetensors")
        self.context_X_, self.context_y_ = context["X"].numpy(), context["y"].numpy()
        self.label_encoder_ = LabelEncoder(meta["classes"]) if meta["classes"] is not None else None
        self.classes_ = None if self.label_encoder_ is None else np.asarray(meta["classes"], dtype=object)
        if meta["target_scale"] is not None:
            self.target_scale_ = tuple(meta["target_scale"])
        self.train_result_ = None
        self.fit_seconds_ = meta["summary"]["fit_seconds"]
        self.rows_ = meta["summary"]["rows"]
        return self
