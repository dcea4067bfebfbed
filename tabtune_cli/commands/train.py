"""``tabtune train``: compose the config, run the pipeline, write the run directory, show a summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from .. import rundir
from ..config import DatasetConfig, LoraSettings, StrategyConfig, check_strategy, from_dict, to_dict
from ..data.dataset import load_dataset
from ..errors import TabTuneError
from ..evaluation.plots import training_curves
from ..hydra_conf import check_overrides, conf_dir, one_line, one_line_errors
from ..models.base import Task
from ..models.registry import get_adapter

log = logging.getLogger("tabtune")


def plain_configs(cfg: DictConfig):
    """The composed config as validated dataclasses, with value checks that types alone cannot make."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)
    except Exception as exc:
        raise TabTuneError(one_line(exc)) from None
    adapter = get_adapter(values["model"]["name"])
    model = from_dict(adapter.config_class, values["model"], "model")
    strategy = from_dict(StrategyConfig, values["strategy"], "strategy")
    check_strategy(strategy)
    lora = from_dict(LoraSettings, values["lora"], "lora")
    dataset = from_dict(DatasetConfig, values["dataset"], "dataset")
    if not model.pretrained:
        adapter.random_size(model)  # an unknown size fails here, before any data is read
    if strategy.mixed_precision.value == "fp16" and strategy.name.value != "inference":
        import torch

        if values["device"] == "cpu" or not torch.cuda.is_available():
            raise TabTuneError("strategy.mixed_precision=fp16 needs a CUDA device (use bf16 or no on CPU)")
    if dataset.task.value != "auto" and dataset.task.value not in adapter.tasks:
        raise TabTuneError(f"model {adapter.name!r} does not support {dataset.task.value} "
                           f"(it supports: {', '.join(adapter.tasks)})")
    return adapter, model, strategy, lora, dataset, values


def run(argv: list[str]) -> int:
    """Entry for ``tabtune train ARGS``: validate every (sweep) composition first, then hand over to Hydra."""
    import hydra

    check_overrides(argv, "train", validate=plain_configs)
    sys.argv = ["tabtune train", *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(one_line_errors(execute))
    main()
    return 0


def execute(cfg: DictConfig) -> dict:
    """One run: data, pipeline, evaluation, run directory. Returns metrics.json's content."""
    from hydra.core.hydra_config import HydraConfig

    target_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        adapter, model, strategy, lora, dataset, values = plain_configs(cfg)
        data = load_dataset(dataset, values["seed"])
        # an unsupported task or a missing checkpoint is the user's to fix: say so before a run directory exists
        adapter.check_task(Task(data.task), strategy.name.value)
        adapter.checkpoint_file(model, Task(data.task))
    except TabTuneError:
        rundir.discard_if_empty(target_dir)
        raise
    run_dir = rundir.create(target_dir)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        metrics = _train_and_write(run_dir, data, model, strategy, lora, values)
    except BaseException as exc:
        rundir.finish(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
    rundir.finish(run_dir, "complete")
    show_summary(run_dir, metrics, adapter.title, strategy.name.value, data.name)
    return metrics


def _train_and_write(run_dir: Path, data, model, strategy, lora, values) -> dict:
    from ..pipeline import TabularPipeline

    log.info("dataset %s: %d train, %d val, %d test rows; task %s", data.name, len(data.train), len(data.val),
             len(data.test), data.task)
    X_train, y_train = data.train.drop(columns=data.target), data.train[data.target]
    X_val, y_val = data.val.drop(columns=data.target), data.val[data.target]
    X_test, y_test = data.test.drop(columns=data.target), data.test[data.target]
    pipeline = TabularPipeline(
        model_name=model.name, task_type=data.task, tuning_strategy=strategy.name.value,
        tuning_params={k: v for k, v in to_dict(strategy).items() if k != "name"},
        model_params=to_dict(model), peft_config=to_dict(lora), device=values["device"], seed=values["seed"],
        text_columns=values["dataset"]["text_columns"], text_features=values["dataset"]["text_features"])
    has_val = len(X_val) > 0
    pipeline.fit(X_train, y_train, X_val if has_val else None, y_val if has_val else None,
                 on_record=lambda record: rundir.append_jsonl(run_dir / "history.jsonl", record))
    test = pipeline.evaluate(X_test, y_test)
    val = pipeline.evaluate(X_val, y_val) if has_val else {}
    predict_seconds = test.pop("predict_seconds")
    val.pop("predict_seconds", None)
    rundir.write_parquet(run_dir / "predictions.parquet", _predictions(pipeline, X_test, y_test))
    pipeline.save(run_dir)
    summary = pipeline.summary()
    metrics = {"test": test, "val": val, "fit_seconds": summary["fit_seconds"], "predict_seconds": predict_seconds,
               "peak_memory_mb": summary["peak_memory_mb"], "trainable_params": summary["trainable_params"],
               "total_params": summary["total_params"],
               "rows": {"train": summary["rows"]["train"], "val": summary["rows"]["val"], "test": len(X_test)}}
    if "training" in summary:
        metrics["training"] = summary["training"]
    if pipeline.train_result_ is not None:
        training_curves(pipeline.train_result_.history, run_dir / "training.png",
                        f"{model.name} · {strategy.name.value} · {data.name}")
    rundir.write_json(run_dir / "metrics.json", metrics)
    log.info("test metrics: %s", test)
    return metrics


def _predictions(pipeline, X: pd.DataFrame, y: pd.Series) -> pd.DataFrame:
    out = pd.DataFrame({"row": X.index.astype(str), "target": y.to_numpy()})
    if pipeline.task_.is_classification:
        proba = pipeline.predict_proba(X)
        out["prediction"] = pipeline.label_encoder_.inverse(proba.argmax(axis=1))
        for k, label in enumerate(pipeline.classes_):
            out[f"proba_{label}"] = proba[:, k]
        out["target"] = out["target"].astype(str)
        out["prediction"] = out["prediction"].astype(str)
    else:
        out["prediction"] = pipeline.predict(X)
    return out


def show_summary(run_dir: Path, metrics: dict, model: str, strategy: str, dataset: str) -> None:
    console = Console()
    table = Table(title=f"{model} · {strategy} · {dataset}")
    table.add_column("metric")
    table.add_column("test", justify="right")
    table.add_column("val", justify="right")
    for name, value in metrics["test"].items():
        val = metrics["val"].get(name)
        table.add_row(name, "—" if value is None else f"{value:.4f}", "—" if val is None else f"{val:.4f}")
    table.add_section()
    table.add_row("fit seconds", f"{metrics['fit_seconds']:.2f}", "")
    table.add_row("predict seconds", f"{metrics['predict_seconds']:.2f}", "")
    table.add_row("trainable / total params", f"{metrics['trainable_params']:,} / {metrics['total_params']:,}", "")
    table.add_row("rows train / val / test",
                  f"{metrics['rows']['train']} / {metrics['rows']['val']} / {metrics['rows']['test']}", "")
    console.print(table)
    console.print(f"run directory: [bold]{run_dir}[/bold]")
