"""``tabtune train``: compose the config, run the pipeline, write the run directory, show a summary."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from .. import rundir
from ..config import (DatasetConfig, LoraSettings, StrategyConfig, check_combination, check_strategy, from_dict,
                      to_dict)
from ..data.dataset import load_dataset
from ..errors import TabTuneError
from ..evaluation.plots import training_curves
from ..hydra_conf import check_overrides, conf_dir, given_keys, one_line, one_line_errors
from ..models.base import Task
from ..models.registry import get_adapter

log = logging.getLogger("tabtune")


def plain_configs(cfg: DictConfig, given: frozenset[str] | set[str] = frozenset()):
    """The composed config as validated dataclasses, with value checks that types alone cannot make.

    ``given`` is the keys the user set on the command line: those this combination ignores are logged as
    warnings (see :func:`config.check_combination`)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)
    except Exception as exc:
        raise TabTuneError(one_line(exc)) from None
    adapter = get_adapter(values["model"]["name"])
    model = from_dict(adapter.config_class, values["model"], "model")
    strategy = from_dict(StrategyConfig, values["strategy"], "strategy")
    check_strategy(strategy)
    lora = from_dict(LoraSettings, values["lora"], "lora")
    for warning in check_combination(model, strategy, lora, set(given)):
        log.warning(warning, extra={"config_warning": True})
    dataset = from_dict(DatasetConfig, values["dataset"], "dataset")
    if not model.pretrained:
        adapter.random_size(model)  # an unknown size fails here, before any data is read
    if values["device"] == "cuda":  # torch only then: validation stays light
        from ..pipeline import resolve_device

        resolve_device("cuda")
    if dataset.task.value != "auto" and dataset.task.value not in adapter.tasks:
        raise TabTuneError(f"model {adapter.name!r} does not support {dataset.task.value} "
                           f"(it supports: {', '.join(adapter.tasks)})")
    return adapter, model, strategy, lora, dataset, values


def run(argv: list[str]) -> int:
    """Entry for ``tabtune train ARGS``: validate every (sweep) composition first, then hand over to Hydra."""
    import hydra

    with config_warnings_on_console():
        check_overrides(argv, "train", validate=plain_configs)
        sys.argv = ["tabtune train", *argv]
        main = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(
            one_line_errors(execute))
        main()
    return 0


class _FirstTimeOnly(logging.Filter):
    """Passes each config warning the first time only: a sweep checks every combination up front, then
    each job checks its own again."""

    def __init__(self):
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "config_warning", False) or record.getMessage() in self.shown:
            return False
        self.shown.add(record.getMessage())
        return True


@contextlib.contextmanager
def config_warnings_on_console():
    """Show the ``tabtune`` logger's config warnings on stderr, each once, for the length of one command."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("tabtune: warning: %(message)s"))
    console.addFilter(_FirstTimeOnly())
    log.addHandler(console)
    try:
        yield
    finally:
        log.removeHandler(console)


def preflight(cfg: DictConfig, given: frozenset[str] | set[str] = frozenset()):
    """What a run checks before its run directory exists: ``plain_configs``' tuple and the loaded data."""
    adapter, model, strategy, lora, dataset, values = plain_configs(cfg, given)
    data = load_dataset(dataset, values["seed"])
    # an unsupported task or a missing checkpoint is the user's to fix: say so before a run directory exists
    adapter.check_task(Task(data.task), strategy.name.value)
    adapter.checkpoint_file(model, Task(data.task))
    return (adapter, model, strategy, lora, dataset, values), data


def execute(cfg: DictConfig) -> dict:
    """One run: data, pipeline, evaluation, run directory. Returns metrics.json's content."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    target_dir = Path(hydra_cfg.runtime.output_dir)
    early = logging.handlers.BufferingHandler(10_000)  # what is logged before train.log exists (config warnings)
    log.addHandler(early)
    try:
        (adapter, model, strategy, lora, dataset, values), data = preflight(cfg, given_keys(hydra_cfg.overrides.task))
    except TabTuneError:
        rundir.discard_if_empty(target_dir)
        raise
    finally:
        log.removeHandler(early)
    run_dir = rundir.create(target_dir)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for record in early.buffer:
        handler.handle(record)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        metrics, provenance = _train_and_write(run_dir, data, model, strategy, lora, values)
    except BaseException as exc:
        rundir.finish(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
    # run.json is the run's manifest: where it came from, what it was, what it measured
    rundir.finish(run_dir, "complete", provenance=provenance, config=values, seed=values["seed"], metrics=metrics)
    show_summary(run_dir, metrics, adapter.title, strategy.name.value, data.name)
    return metrics


def _train_and_write(run_dir: Path, data, model, strategy, lora, values) -> tuple[dict, dict]:
    from ..pipeline import TabularPipeline

    log.info("dataset %s: %d train, %d val, %d test rows; task %s", data.name, len(data.train), len(data.val),
             len(data.test), data.task)
    X_train, y_train = data.train.drop(columns=data.target), data.train[data.target]
    X_val, y_val = data.val.drop(columns=data.target), data.val[data.target]
    X_test, y_test = data.test.drop(columns=data.target), data.test[data.target]
    # only the settings this strategy reads: the pipeline warns of every key it is given that it would ignore
    # (the command line's own explicit keys were checked in plain_configs)
    used = {"show_progress"} if strategy.name.value == "inference" else set(to_dict(strategy)) - {"name"}
    pipeline = TabularPipeline(
        model_name=model.name, task_type=data.task, tuning_strategy=strategy.name.value,
        tuning_params={k: v for k, v in to_dict(strategy).items() if k in used},
        model_params=to_dict(model), peft_config=to_dict(lora) if strategy.name.value == "peft" else None,
        device=values["device"], seed=values["seed"],
        text_columns=values["dataset"]["text_columns"], text_features=values["dataset"]["text_features"])
    has_val = len(X_val) > 0
    # validation rows choose the epoch, are scored with the training rows as context, then join the context
    pipeline.fit(X_train, y_train, X_val if has_val else None, y_val if has_val else None,
                 on_record=lambda record: rundir.append_jsonl(run_dir / "history.jsonl", record))
    test = pipeline.evaluate(X_test, y_test)
    predict_seconds = test.pop("predict_seconds")
    rundir.write_parquet(run_dir / "predictions.parquet", _predictions(pipeline, X_test, y_test))
    pipeline.provenance_["dataset"] = data.source
    pipeline.save(run_dir)
    summary = pipeline.summary()
    metrics = {"test": test, "val": pipeline.val_metrics_, "fit_seconds": summary["fit_seconds"],
               "predict_seconds": predict_seconds,
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
    return metrics, pipeline.provenance_


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
