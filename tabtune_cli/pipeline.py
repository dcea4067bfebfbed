"""TabularPipeline: preprocess, build the model, apply the strategy, predict — the engine behind the CLI.

Follows scikit-learn's conventions: ``__init__`` only stores its arguments,
``fit`` does the work, fitted state ends in ``_``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from . import rundir
from .artifacts import (FORMAT_VERSION, WEIGHT_FILES, base_sha256, check_same_checkpoint, pack_folder, provenance,
                        read_safetensors, unpack_file)
from .config import Device, LoraSettings, from_dict, group_defaults, recipe_defaults, to_dict
from .data.checks import check_table, check_target
from .data.dataset import infer_task
from .data.preprocess import LabelEncoder
from .data.schema import check_schema
from .data.split import split_frame
from .errors import TabTuneError
from .evaluation.metrics import compute_metrics
from .memory import peak_mb, reset_peak
from .models.base import Task, load_weights, predict_classes
from .models.registry import get_adapter
from .strategies import check_combination, check_strategy, get_strategy
from .tuning import lora
from .tuning.trainer import Split, train

log = logging.getLogger("tabtune")


def resolve_device(name: str) -> torch.device:
    """The device ``device=name`` (auto, cpu, cuda) runs on: under ``torchrun``, this process's own GPU."""
    from .tuning import distributed

    return distributed.device(name)


def device_facts(device: torch.device) -> dict:
    """What a run records of the device it used: ``cpu`` or ``cuda:N`` and, on a GPU, its name."""
    if device.type != "cuda":
        return {"device": str(device)}
    index = torch.cuda.current_device() if device.index is None else device.index
    return {"device": f"cuda:{index}", "gpu": torch.cuda.get_device_name(index)}


class TabularPipeline:
    """A tabular foundation model on one table: ``fit`` then ``predict`` / ``predict_proba`` / ``evaluate``.

    Settings start from the shipped configs the command line composes (``conf/model/<name>.yaml``,
    ``conf/strategy/<strategy>.yaml``, ``conf/lora/default.yaml``), so both give the same run.
    ``tuning_params`` also takes the guides' ``device``, ``peft_config`` and ``save_checkpoint_path``.
    """

    def __init__(self, model_name: str = "nano", task_type: str = "auto", tuning_strategy: str = "inference",
                 tuning_params: dict | None = None, model_params: dict | None = None,
                 peft_config: dict | None = None, device: str | None = None, seed: int = 0,
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
    def _configs(self, check: bool = True):
        """Validated settings: ``(adapter, strategy, its config, model config, lora settings, device, checkpoint
        path)``;
        ``check`` also warns of settings that will have no effect (not for a saved pipeline's own)."""
        adapter = get_adapter(self.model_name)
        tuning = dict(self.tuning_params or {})
        device = tuning.pop("device", None)
        if device is not None and self.device is not None and str(device) != str(self.device):
            raise TabTuneError(f"device given twice: device={self.device!r} and tuning_params['device']={device!r}")
        device = device or self.device or "auto"
        if device not in [d.value for d in Device]:
            raise TabTuneError(f"device: {device!r} is not one of: {', '.join(d.value for d in Device)}")
        peft = tuning.pop("peft_config", None)
        if peft is not None and self.peft_config is not None:
            raise TabTuneError("peft_config given twice: as peft_config= and inside tuning_params; keep one")
        peft = dict(peft if peft is not None else self.peft_config or {})
        save_path = tuning.pop("save_checkpoint_path", None)
        tuner = get_strategy(self.tuning_strategy)
        if save_path is not None and not tuner.changes_weights:
            log.warning(f"save_checkpoint_path is ignored by strategy {tuner.name}: no weight changes")
            save_path = None
        # the strategy's defaults, then the model's own recipe for it (conf/recipe/), then the caller's keys
        strategy = from_dict(tuner.config_class, {**group_defaults("strategy", tuner.name),
                                                  **recipe_defaults(adapter.name, tuner.name), **tuning,
                                                  "name": tuner.name}, "tuning_params")
        check_strategy(strategy, adapter)
        model_params = {k: v for k, v in (self.model_params or {}).items() if k != "name"}
        model_config = from_dict(adapter.config_class, {**group_defaults("model", adapter.name), **model_params,
                                                        "name": adapter.name}, "model_params")
        lora_settings = from_dict(LoraSettings, {**group_defaults("lora", "default"), **peft}, "peft_config")
        given = ({f"strategy.{k}" for k in tuning} | {f"lora.{k}" for k in peft}
                 | {f"model.{k}" for k in model_params})
        for warning in check_combination(model_config, strategy, lora_settings, given if check else set()):
            log.warning(warning)
        if self.task_type not in ("auto", "classification", "regression"):
            raise TabTuneError(f"task_type: {self.task_type!r} is not one of: auto, classification, regression")
        return adapter, tuner, strategy, model_config, lora_settings, device, save_path

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X: pd.DataFrame, y, X_val: pd.DataFrame | None = None, y_val=None, on_record=None,
            checkpoint_dir: str | Path | None = None):
        """Fit preprocessing on ``X``, build the model and apply the strategy.

        Validation rows (``X_val``, or a seeded 10% of ``X`` when fine-tuning without it) choose the
        epoch; their metrics are taken with the training rows alone as context (``val_metrics_``), and
        then they join the context, as the command line does with its validation split.

        ``checkpoint_dir``: fine-tuning writes a resumable checkpoint there after every epoch, and a
        ``fit`` with the same data and settings on a folder that holds one resumes from it.
        """
        adapter, tuner, strategy, model_config, lora_settings, self.device_name_, save_path = self._configs()
        X, y = self._check_xy(X, y, "X")
        kind = infer_task(y) if self.task_type == "auto" else self.task_type
        trains = tuner.trains
        if trains and X_val is None:
            joined = X.assign(__target__=y.to_numpy())
            rest, held = split_frame(joined, "__target__", fraction=0.1, stratify=kind == "classification",
                                     seed=self.seed)
            X, y = rest.drop(columns="__target__"), rest["__target__"].rename(y.name)
            X_val, y_val = held.drop(columns="__target__"), held["__target__"].rename(y.name)
        device = resolve_device(self.device_name_)
        if tuner.lora:
            # peft's imports (transformers) take seconds: done before the clock and the memory peak start,
            # so that a sweep's first job is measured as its others are
            import peft  # noqa: F401
        reset_peak(device)
        started = time.perf_counter()
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
        adapter.check_task(task, tuner.name)
        if lora_settings.r == "auto" and not model_config.adapters:  # adapters bring their own rank
            lora_settings.r = lora.auto_rank(len(X_train))
            log.info("lora.r=auto: r=%d for %d training rows", lora_settings.r, len(X_train))

        module, self.architecture_ = adapter.build(model_config, task)
        module.to(device)
        self._base_state_ = None if model_config.pretrained else {k: v.detach().cpu().clone()
                                                                    for k, v in module.state_dict().items()}
        self.provenance_ = provenance(adapter, model_config, task, X, y)
        self.base_sha256_ = base_sha256(self.provenance_, self._base_state_)
        module, lora_settings = self._apply_strategy(adapter, module, tuner, strategy, model_config, lora_settings)

        self.adapter_, self.task_, self.module_, self.device_ = adapter, task, module, device
        self.tuner_, self.strategy_, self.model_config_, self.lora_settings_ = tuner, strategy, model_config, lora_settings
        self.context_X_, self.context_y_ = X_train, y_train
        self.train_result_, self.val_metrics_, self.learned_params_ = None, {}, 0
        self.target_name_ = str(y.name)
        if X_val is not None:
            X_val, y_val = self._check_xy(X_val, y_val, "X_val")
            val = Split(self.preprocessor_.transform(X_val), self._encode_target(y_val))
            learned = None
            if trains:
                learned = tuner.learned_context(adapter, task, strategy, X_train, y_train, self.seed, device)
                on_best = None if save_path is None else lambda m: self._write_best(m, save_path)
                self.train_result_ = train(adapter, module, task, Split(X_train, y_train), val, strategy,
                                           model_config, device, self.seed, on_record=on_record, on_best=on_best,
                                           lr_ratio=lora_settings.lr_ratio if self.is_peft else None,
                                           checkpoints=None if checkpoint_dir is None else Path(checkpoint_dir),
                                           target_scale=None if task.is_classification else self.target_scale_,
                                           learned=learned)
                self.learned_params_ = sum(p.numel() for _, p in learned.named_parameters()) if learned else 0
                if save_path is not None:  # the restored best, also when no epoch beat the start
                    self._write_best(module, save_path)
            module.eval()
            self.context_X_, self.context_y_ = tuner.final_context(learned, X_train, y_train)
            self.val_metrics_ = self.evaluate(X_val, y_val)
            self.val_metrics_.pop("predict_seconds")
            self.context_X_, self.context_y_ = tuner.final_context(learned, np.concatenate([X_train, val.X]),
                                                                   np.concatenate([y_train, val.y]))
        module.eval()
        self.preprocessor_.freeze()  # the context is built: what later tables bring is not part of the fit
        self.fit_seconds_ = time.perf_counter() - started
        self.peak_memory_mb_ = peak_mb(device)
        self.rows_ = {"train": int(len(X_train)), "val": int(0 if X_val is None else len(X_val))}
        self.fitted_on_ = device_facts(device)
        return self

    @property
    def is_peft(self) -> bool:
        """Whether the pipeline trained (or loaded) LoRA adapters of its own."""
        return self.tuner_.lora

    def _apply_strategy(self, adapter, module, tuner, strategy, model_config, lora_settings):
        """``(module, lora settings)`` ready for ``strategy``: adapters from ``model.adapters`` (if set) and/or new
        ones, its repeated blocks recomputed in backward under ``strategy.gradient_checkpointing``. Adapters from
        another run keep the LoRA settings they were trained with, and those are what this run records."""
        # what the model itself trains: a parameter built frozen (TabICL's fixed rotary frequencies) stays frozen
        learnable = {n for n, p in module.named_parameters() if p.requires_grad}
        if model_config.adapters:
            source = self._check_adapter_run(model_config.adapters, adapter)
            module = tuner.take_adapters(module, source)
            trained_with = json.loads((source / "pipeline.json").read_text()).get("peft_config")
            if trained_with:
                lora_settings = from_dict(LoraSettings, trained_with, "lora")
            log.info("adapters from %s", source)
        module = tuner.prepare(adapter, module, learnable, lora_settings, bool(model_config.adapters))
        if tuner.trains and strategy.gradient_checkpointing:
            adapter.set_gradient_checkpointing(module, True)
        return module, lora_settings

    def _check_adapter_run(self, source, adapter) -> Path:
        """The folder of another run's adapters, checked to fit this model: the same family, architecture and
        base weights (the SHA-256 of the checkpoint file, or of random base weights, its pipeline.json records)."""
        path = Path(source)
        meta_path = path / "pipeline.json"
        if not (path / "adapter_config.json").is_file() or not meta_path.is_file():
            raise TabTuneError(f"model.adapters: {str(path)!r} holds no saved peft run "
                               f"(adapter_config.json and pipeline.json are needed)")
        meta = json.loads(meta_path.read_text())
        if meta["model_name"] != adapter.name:
            raise TabTuneError(f"model.adapters: {str(path)!r} holds {meta['model_name']} adapters, "
                               f"not {adapter.name}")
        if getattr(self, "architecture_", None) is not None and meta["architecture"] != self.architecture_:
            raise TabTuneError(f"model.adapters: {str(path)!r} was trained on another {adapter.title} "
                               f"architecture (its base weights differ in shape)")
        theirs, ours = meta.get("base_sha256"), getattr(self, "base_sha256_", None)
        if theirs and ours and theirs != ours:
            where = (meta.get("provenance") or {}).get("checkpoint") or {}
            raise TabTuneError(f"model.adapters: {str(path)!r} was trained on other base weights "
                               f"({where.get('path', 'random weights')}, SHA-256 {theirs[:12]}...) than this model's "
                               f"(SHA-256 {ours[:12]}...): adapters only mean something on their own base")
        return path

    def _write_best(self, module, path) -> None:
        """``save_checkpoint_path``: the best weights so far, as safetensors whatever the file name says."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.tuner_.trained_state(module).items()}
        rundir.write_file(Path(path), lambda tmp: save_file(state, tmp, metadata={"format": "safetensors"}))

    def _check_xy(self, X, y, name):
        if not isinstance(X, pd.DataFrame):
            X = pd.DataFrame(np.asarray(X), columns=[f"x{i}" for i in range(np.asarray(X).shape[1])])
        if len(np.asarray(y)) != len(X):
            raise TabTuneError(f"{name} has {len(X)} rows but its target has {len(np.asarray(y))} values")
        y = pd.Series(np.asarray(y), name=getattr(y, "name", None) or "target", index=X.index)
        if len(X) == 0:
            raise TabTuneError(f"{name} is empty: no rows to fit on")
        # the command line's own checks (data.checks), the same messages; X_val's treatments go unsaid
        check_table(X, name, text_columns=self.text_columns, quiet=name != "X")
        check_target(y, name)
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
        X = check_schema(self.preprocessor_.state, X)  # by name; missing/extra/mistyped columns, unseen values
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
        """Fit-time facts for metrics.json: the device it ran on (and GPU name), seconds, peak memory, parameter
        counts, rows."""
        self._check_fitted()
        params = list(self.module_.parameters())
        out = {**self.fitted_on_, "fit_seconds": self.fit_seconds_, "peak_memory_mb": self.peak_memory_mb_,
               "trainable_params": int(sum(p.numel() for p in params if p.requires_grad) + self.learned_params_),
               "total_params": int(sum(p.numel() for p in params)), "rows": dict(self.rows_)}
        if self.train_result_ is not None:
            r = self.train_result_
            out["training"] = {"best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "steps": r.steps,
                               "val_metric": r.val_metric, "val_before": r.val_before, "val_best": r.best_val,
                               **({"stopped": r.stopped} if r.stopped else {})}
        return out

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write everything ``load`` needs: into the folder ``path``, or, when ``path`` names a file
        (``pipeline.joblib``: any suffix), into that one file.

        Either way the content is safetensors and JSON only, never pickle, whatever the file name says:
        loading it runs no code."""
        self._check_fitted()
        path = Path(path)
        if path.suffix and not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".save-", dir=path.parent) as folder:
                self._save_folder(Path(folder))
                rundir.write_file(path, lambda tmp: pack_folder(Path(folder), tmp))
            return path
        return self._save_folder(path)

    def _save_folder(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".save-", dir=path))
        try:
            weights = self.tuner_.weights_to_save(self.module_, self._base_state_, bool(self.model_config_.adapters))
            if weights is not None:
                weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
                save_file(weights, staging / "model.safetensors")
            self.tuner_.save_extra(self.module_, staging)
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
            "target": getattr(self, "target_name_", None),
            "tuning_strategy": self.tuner_.name, "tuning_params": to_dict(self.strategy_),
            "model_params": to_dict(self.model_config_), "peft_config": to_dict(self.lora_settings_),
            "device": self.device_name_, "seed": self.seed, "architecture": self.architecture_,
            "text_columns": self.text_columns, "text_features": self.text_features,
            "classes": None if self.label_encoder_ is None else list(self.label_encoder_.classes),
            "target_scale": getattr(self, "target_scale_", None),
            "base_weights": "model.safetensors" if weights is not None else "checkpoint",
            "base_sha256": self.base_sha256_,  # the weights under any adapters: model.adapters checks it
            "summary": self.summary(), "val_metrics": getattr(self, "val_metrics_", {}),
            "provenance": getattr(self, "provenance_", {}),
        }
        if self.is_peft:
            lora.write_card(path, meta)
        rundir.write_json(path / "pipeline.json", meta)  # last: its presence means the save is whole
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "TabularPipeline":
        """Rebuild a saved pipeline (a folder, or the one file ``save`` wrote); its predictions equal the
        saved one's. Only safetensors and JSON are read: nothing in the files is executed."""
        path = Path(path)
        if path.is_file():
            with tempfile.TemporaryDirectory(prefix=".load-") as folder:
                unpack_file(path, Path(folder))
                return cls._load_folder(Path(folder), device)
        return cls._load_folder(path, device)

    @classmethod
    def _load_folder(cls, path: Path, device: str | None) -> "TabularPipeline":
        meta_path = path / "pipeline.json"
        if not meta_path.is_file():
            raise TabTuneError(f"{path}: no saved pipeline here (pipeline.json is missing)")
        meta = json.loads(meta_path.read_text())
        tuning = {k: v for k, v in meta["tuning_params"].items() if k != "name"}
        self = cls(meta["model_name"], meta["task"]["kind"], meta["tuning_strategy"], tuning, meta["model_params"],
                   meta["peft_config"], device or meta["device"], meta["seed"], meta.get("text_columns"),
                   meta.get("text_features", 8))
        adapter, tuner, strategy, model_config, lora_settings, self.device_name_, _ = self._configs(check=False)
        task = Task(meta["task"]["kind"], meta["task"]["n_classes"])
        self.device_ = resolve_device(self.device_name_)
        self._base_state_ = None
        self.base_sha256_ = meta.get("base_sha256")
        if meta["base_weights"] == "model.safetensors":
            module = adapter.from_architecture(meta["architecture"])
            state = read_safetensors(path / "model.safetensors")
            load_weights(module, state, path / "model.safetensors")
            if not tuner.saves_trained_weights:
                self._base_state_ = state  # not reproducible from a checkpoint: a later save writes it again
        else:
            check_same_checkpoint(adapter.checkpoint_file(model_config, task), meta.get("provenance", {}), path)
            module, _ = adapter.build(model_config, task)
        module.to(self.device_)
        module = tuner.restore(module, path)
        module.eval()
        self.adapter_, self.task_, self.module_, self.architecture_ = adapter, task, module, meta["architecture"]
        self.tuner_, self.strategy_, self.model_config_, self.lora_settings_ = tuner, strategy, model_config, lora_settings
        self.preprocessor_ = adapter.preprocessor_from_json(json.loads((path / "preprocessor.json").read_text()),
                                                            model_config)
        context = read_safetensors(path / "context.safetensors")
        self.context_X_, self.context_y_ = context["X"].numpy(), context["y"].numpy()
        self.label_encoder_ = LabelEncoder(meta["classes"]) if meta["classes"] is not None else None
        self.classes_ = None if self.label_encoder_ is None else np.asarray(meta["classes"], dtype=object)
        if meta["target_scale"] is not None:
            self.target_scale_ = tuple(meta["target_scale"])
        self.target_name_ = meta.get("target")
        self.train_result_, self.learned_params_ = None, 0
        self.val_metrics_ = meta.get("val_metrics", {})
        self.provenance_ = meta.get("provenance", {})
        self.fit_seconds_ = meta["summary"]["fit_seconds"]
        self.peak_memory_mb_ = meta["summary"].get("peak_memory_mb")
        self.rows_ = meta["summary"]["rows"]
        self.fitted_on_ = {k: meta["summary"][k] for k in ("device", "gpu") if k in meta["summary"]}
        return self

    # ---- adapters --------------------------------------------------------------------------
    def load_adapters(self, run: str | Path, name: str) -> "TabularPipeline":
        """Add the LoRA adapters of another peft run under ``name``, over the base already loaded (no reload)."""
        self._check_fitted()
        if not self.is_peft:
            raise TabTuneError("load_adapters: this pipeline has no LoRA adapters of its own; "
                               "load a peft run first (TabularPipeline.load), then add others to it")
        source = self._check_adapter_run(run, self.adapter_)
        if name in self.module_.peft_config:
            raise TabTuneError(f"load_adapters: adapters named {name!r} are loaded already")
        lora.add(self.module_, source, name)
        self.module_.eval()
        return self.use_adapters(name)

    def use_adapters(self, name: str) -> "TabularPipeline":
        """Predict with the adapters loaded under ``name`` (``"default"``: the pipeline's own)."""
        self._check_fitted()
        if not self.is_peft:
            raise TabTuneError("use_adapters: this pipeline has no LoRA adapters (load_adapters adds some)")
        known = list(self.module_.peft_config)
        if name not in known:
            raise TabTuneError(f"use_adapters: no adapters named {name!r} (loaded: {', '.join(known)})")
        self.module_.set_adapter(name)
        self.module_.requires_grad_(False)
        return self
