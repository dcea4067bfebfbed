"""``tabtune train``: compose the config, run the pipeline, write the run directory, show a summary."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import shutil
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import rundir
from ..config import DatasetConfig, LoraSettings, StrategyConfig, from_dict, to_dict
from ..errors import TabTuneError
from .hydra_conf import check_overrides, conf_dir, given_keys, one_line, one_line_errors, train_help
from ..models.base import Task
from ..models.registry import get_spec
from ..strategies import check_combination, check_strategy, get_strategy

log = logging.getLogger("tabtune")
CHECKPOINTS = "checkpoints"  # a run's resumable checkpoint while it trains; removed once it is complete


def plain_configs(cfg: DictConfig, given: frozenset[str] | set[str] = frozenset()):
    """The composed config as validated dataclasses, with value checks that types alone cannot make.

    The first item is the model's spec (``models/base.ModelSpec``: name, title, tasks, ``check_task``,
    ``checkpoint_file``), not its adapter: validation imports neither torch nor the model's package.
    ``given`` is the keys the user set on the command line: those this combination ignores are logged as
    warnings (see :func:`strategies.check_combination`)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)
    except Exception as exc:
        raise TabTuneError(one_line(exc)) from None
    spec = get_spec(values["model"]["name"])
    model = from_dict(spec.config_class, values["model"], "model")
    strategy = from_dict(get_strategy(values["strategy"]["name"]).config_class, values["strategy"], "strategy")
    check_strategy(strategy, spec)
    lora = from_dict(LoraSettings, values["lora"], "lora")
    for warning in check_combination(model, strategy, lora, set(given)):
        log.warning(warning, extra={"config_warning": True})
    dataset = from_dict(DatasetConfig, values["dataset"], "dataset")
    check_run_settings(values, dataset, strategy)
    if not model.pretrained:
        spec.random_size(model)  # an unknown size fails here, before any data is read
    if values["device"] == "cuda":  # torch only then: validation stays light
        from ..pipeline import resolve_device

        resolve_device("cuda")
    if dataset.task.value != "auto" and dataset.task.value not in spec.tasks:
        raise TabTuneError(f"model {spec.name!r} does not support {dataset.task.value} "
                           f"(it supports: {', '.join(spec.tasks)})")
    return spec, model, strategy, lora, dataset, values


def check_run_settings(values: dict, dataset: DatasetConfig, strategy: StrategyConfig) -> None:
    """The top-level settings and the ones that decide how rows are split or shared, each refused in one line
    naming the key, before any data is read."""
    from ..data.builtin import TARGET
    from ..tuning import distributed

    seed = values["seed"]
    if not 0 <= seed < 2**32:  # numpy's and torch's generators take 0 .. 2**32 - 1
        raise TabTuneError(f"seed={seed}: a seed is a whole number from 0 to {2**32 - 1}")
    if values.get("threads") is not None and values["threads"] < 1:
        raise TabTuneError(f"threads={values['threads']}: at least 1 (or null: every core)")
    if dataset.max_rows is not None and dataset.max_rows < 2:
        raise TabTuneError(f"dataset.max_rows={dataset.max_rows}: at least 2 rows (or null: every row)")
    target = dataset.target or (None if dataset.path else TARGET)
    if target is not None and target in dataset.drop_columns:
        raise TabTuneError(f"dataset.drop_columns names the target {target!r}: the target cannot be dropped")
    if target is not None and target in (dataset.text_columns or []):
        raise TabTuneError(f"dataset.text_columns names the target {target!r}: it is what the model predicts")
    distributed.check_shardable(strategy, get_strategy(strategy.name).trains)


def run(argv: list[str]) -> int:
    """Entry for ``tabtune train ARGS``: validate every (sweep) composition first, then hand over to Hydra;
    ``tabtune train resume=<run dir>`` carries on an interrupted run instead."""
    rest = [a for a in argv if a not in ("--help", "-h")]
    if len(rest) < len(argv) and all("=" in a and not a.startswith(("-", "hydra")) for a in rest):
        print(train_help(rest))  # the config those overrides compose (other flags: Hydra's own help)
        return 0
    import hydra

    from . import sweep

    signal.signal(signal.SIGTERM, _terminated)
    if any(a.startswith("resume=") for a in argv):
        return resume(argv)
    with config_warnings_on_console():
        check_overrides(argv, "train", validate=plain_configs)
        sys.argv = ["tabtune train", *argv]
        main = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(
            one_line_errors(execute))
        sweep.LAST_SWEEP.clear()
        main()
    return 1 if sweep.LAST_SWEEP.get("failed") else 0  # a sweep whose jobs did not all complete


def _terminated(signum, frame):
    """SIGTERM (a scheduler's or ``kill``'s stop) ends a run as Ctrl-C does: marked interrupted, resumable."""
    raise KeyboardInterrupt("terminated")


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


def preflight(cfg: DictConfig, given: frozenset[str] | set[str] = frozenset(), fetch: bool = True):
    """What a run checks before its run directory exists: ``plain_configs``' tuple and the loaded data.
    A missing official checkpoint is downloaded here, or with ``fetch=False`` (validate) only looked up."""
    adapter, model, strategy, lora, dataset, values = plain_configs(cfg, given)
    from ..data.dataset import load_dataset  # here, not at the top: --help and validation stay light

    data = load_dataset(dataset, values["seed"])
    # an unsupported task or a missing checkpoint is the user's to fix: say so before a run directory exists
    adapter.check_task(Task(data.task), strategy.name)
    adapter.checkpoint_file(model, Task(data.task), fetch=fetch)
    check_width(adapter, model, strategy.name, dataset, data)
    return (adapter, model, strategy, lora, dataset, values), data


def check_width(spec, model, strategy: str, dataset, data) -> None:
    """A table wider than the model takes is refused now, with the limit: the model's own preprocessing
    is fitted on the training rows to count what it would read."""
    limit = spec.feature_limit(model, strategy)
    if limit is None:
        return
    from ..models.registry import get_adapter

    X = data.train.drop(columns=data.target)
    width = len(get_adapter(spec.name).preprocessor(model, dataset.text_columns, dataset.text_features)
                .fit(X, data.train[data.target]).feature_names)
    if width > limit:
        raise TabTuneError(f"{data.name}: {spec.title} reads at most {limit} features; this table has {width} "
                           f"after preprocessing (drop some with dataset.drop_columns)")


def execute(cfg: DictConfig) -> float | None:
    """One run: data, pipeline, evaluation, run directory. Returns the validation metric ``objective`` names,
    for a sweeper to optimise (``hparams_search``).

    A sweep's job (``-m``) stands alone (``sweep.py``): seeded, its share of the cores, its own peak memory;
    when it fails it is recorded as failed (run.json, with the error; also one that fails before it starts),
    says so in one line and returns None, so that the other jobs go on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import sweep

    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    target_dir = Path(hydra_cfg.runtime.output_dir)
    threads = sweep.start_job(cfg.seed, sweep.job_threads(cfg.threads, hydra_cfg.launcher if sweeping else None))
    early = logging.handlers.BufferingHandler(10_000)  # what is logged before train.log exists (config warnings)
    log.addHandler(early)
    try:
        checked, data = preflight(cfg, given_keys(hydra_cfg.overrides.task))
        sweep.check_objective(cfg.objective, data.task)
    except TabTuneError as exc:
        if not sweeping:
            rundir.discard_if_empty(target_dir)
            raise
        run_dir = rundir.create(target_dir)  # the sweep's report shows this job, and why it never started
        rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        rundir.finish(run_dir, "failed", error=str(exc))
        return _job_failed(run_dir, exc, hydra_cfg)
    finally:
        log.removeHandler(early)
    from ..tuning import distributed

    if distributed.rank() != 0:  # torchrun: the other ranks train alongside rank 0, which alone writes the run
        _, model, strategy, lora, _, values = checked
        _train_and_write(None, data, model, strategy, lora, values)
        return None
    run_dir = rundir.create(target_dir)
    rundir.update(run_dir, dataset=data.source, threads=threads)
    rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        metrics = _run(run_dir, checked, data, early.buffer)
    except Exception as exc:  # _run recorded it in run.json; Ctrl-C still ends the whole sweep
        if not sweeping:
            raise
        return _job_failed(run_dir, exc, hydra_cfg)
    return sweep.objective_value(cfg.objective, metrics)


def _job_failed(run_dir: Path, exc: Exception, hydra_cfg) -> None:
    """A sweep's failed job: one line on stderr (TABTUNE_DEBUG=1: raised, for Hydra to show its traceback)."""
    import os

    from . import sweep

    if os.environ.get("TABTUNE_DEBUG"):
        raise exc
    sweep.job_failed(run_dir, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                     list(hydra_cfg.overrides.task))
    return None


def resume(argv: list[str]) -> int:
    """``tabtune train resume=<run dir>``: carry on an interrupted (or killed) run from its last checkpoint,
    with its own config and data, into its own directory; it ends as the uninterrupted run would have."""
    from ..tuning import checkpoint, distributed

    if distributed.launched():  # each rank would reopen and write the same run directory
        raise TabTuneError(f"resume= under torchrun ({distributed.world_size()} processes): resume the run in one "
                           f"process (tabtune train {argv[0]}), or start a new torchrun run")
    if len(argv) != 1:
        raise TabTuneError("resume=<run dir> takes no other arguments: a run resumes with its own config.yaml")
    run_dir = Path(argv[0].split("=", 1)[1])
    if not (run_dir / rundir.MANIFEST).is_file() or not (run_dir / "config.yaml").is_file():
        raise TabTuneError(f"resume: {str(run_dir)!r} is not a run directory (no run.json and config.yaml)")
    manifest = json.loads((run_dir / rundir.MANIFEST).read_text())
    if manifest.get("status") == "complete":
        raise TabTuneError(f"resume: {run_dir} is complete; there is nothing to resume")
    if checkpoint.latest(run_dir / CHECKPOINTS) is None:
        raise TabTuneError(f"resume: {run_dir} has no checkpoint (it stopped before its first epoch ended); "
                           f"start it again instead")
    with config_warnings_on_console():
        checked, data = preflight(OmegaConf.load(run_dir / "config.yaml"))
    if manifest.get("dataset") is not None and json.loads(json.dumps(data.source, default=str)) != manifest["dataset"]:
        raise TabTuneError(f"resume: the data of {run_dir} changed since it started "
                           f"({manifest['dataset'].get('path', 'its dataset')}); start a new run instead")
    rundir.reopen(run_dir)
    _run(run_dir, checked, data, [])
    return 0


def _run(run_dir: Path, checked: tuple, data, early_records: list) -> dict:
    """Train, evaluate and write into ``run_dir`` (new, or reopened to resume), then mark it complete."""
    from ..tuning import checkpoint

    adapter, model, strategy, lora, dataset, values = checked
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for record in early_records:
        handler.handle(record)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        metrics, provenance = _train_and_write(run_dir, data, model, strategy, lora, values)
    except KeyboardInterrupt:
        saved = checkpoint.latest(run_dir / CHECKPOINTS)
        hint = (f"its last checkpoint is {saved.name}: tabtune train resume={run_dir}" if saved
                else "no epoch had ended, so there is no checkpoint: start it again")
        rundir.finish(run_dir, "interrupted", error=f"interrupted; {hint}")
        print(f"tabtune: {hint}", file=sys.stderr)
        raise
    except BaseException as exc:
        rundir.finish(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
    # run.json is the run's manifest: where it came from, what it was, what it measured
    rundir.finish(run_dir, "complete", provenance=provenance, config=values, seed=values["seed"],
                  **{k: metrics[k] for k in ("device", "gpu") if k in metrics}, metrics=metrics)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # only for resuming: a complete run has its weights
    show_summary(run_dir, metrics, adapter.title, strategy.name, data.name)
    return metrics


def _train_and_write(run_dir: Path | None, data, model, strategy, lora, values) -> tuple[dict, dict]:
    from ..pipeline import TabularPipeline

    log.info("dataset %s: %d train, %d val, %d test rows; task %s", data.name, len(data.train), len(data.val),
             len(data.test), data.task)
    X_train, y_train = data.train.drop(columns=data.target), data.train[data.target]
    X_val, y_val = data.val.drop(columns=data.target), data.val[data.target]
    X_test, y_test = data.test.drop(columns=data.target), data.test[data.target]
    # only the settings this strategy reads: the pipeline warns of every key it is given that it would ignore
    # (the command line's own explicit keys were checked in plain_configs)
    tuner = get_strategy(strategy.name)
    used = tuner.reads(strategy) - {"name"}
    pipeline = TabularPipeline(
        model_name=model.name, task_type=data.task, tuning_strategy=strategy.name,
        tuning_params={k: v for k, v in to_dict(strategy).items() if k in used},
        model_params=to_dict(model), peft_config=to_dict(lora) if tuner.lora else None,
        device=values["device"], seed=values["seed"],
        text_columns=values["dataset"]["text_columns"], text_features=values["dataset"]["text_features"])
    has_val = len(X_val) > 0
    # validation rows choose the epoch, are scored with the training rows as context, then join the context
    if run_dir is None:  # a torchrun rank but the first: train, write nothing
        pipeline.fit(X_train, y_train, X_val if has_val else None, y_val if has_val else None)
        return {}, {}
    # a resumed fit replays the checkpoint's history through on_record: the file starts again from it
    (run_dir / "history.jsonl").unlink(missing_ok=True)
    pipeline.fit(X_train, y_train, X_val if has_val else None, y_val if has_val else None,
                 on_record=lambda record: rundir.append_jsonl(run_dir / "history.jsonl", record),
                 checkpoint_dir=run_dir / CHECKPOINTS)
    test = pipeline.evaluate(X_test, y_test)
    predict_seconds = test.pop("predict_seconds")
    rundir.write_parquet(run_dir / "predictions.parquet", _predictions(pipeline, X_test, y_test))
    pipeline.provenance_["dataset"] = data.source
    pipeline.save(run_dir)
    summary = pipeline.summary()
    device = {k: summary[k] for k in ("device", "gpu") if k in summary}  # what it ran on (device=auto says not)
    metrics = {"test": test, "val": pipeline.val_metrics_, **device, "fit_seconds": summary["fit_seconds"],
               "predict_seconds": predict_seconds,
               "peak_memory_mb": summary["peak_memory_mb"], "trainable_params": summary["trainable_params"],
               "total_params": summary["total_params"],
               "rows": {"train": summary["rows"]["train"], "val": summary["rows"]["val"], "test": len(X_test)}}
    if "training" in summary:
        metrics["training"] = summary["training"]
    if pipeline.train_result_ is not None:
        from ..evaluation.plots import training_curves

        training_curves(pipeline.train_result_.history, run_dir / "training.png",
                        f"{model.name} · {strategy.name} · {data.name}")
    rundir.write_json(run_dir / "metrics.json", metrics)
    log.info("test metrics: %s", test)
    return metrics, pipeline.provenance_


def _predictions(pipeline, X, y):
    import pandas as pd

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
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{model} · {strategy} · {dataset}")
    table.add_column("metric")
    table.add_column("test", justify="right")
    table.add_column("val", justify="right")
    for name, value in metrics["test"].items():
        val = metrics["val"].get(name)
        table.add_row(name, "—" if value is None else f"{value:.4f}", "—" if val is None else f"{val:.4f}")
    table.add_section()
    table.add_row("device", metrics["device"] + (f" ({metrics['gpu']})" if metrics.get("gpu") else ""), "")
    table.add_row("fit seconds", f"{metrics['fit_seconds']:.2f}", "")
    table.add_row("predict seconds", f"{metrics['predict_seconds']:.2f}", "")
    table.add_row("trainable / total params", f"{metrics['trainable_params']:,} / {metrics['total_params']:,}", "")
    table.add_row("rows train / val / test",
                  f"{metrics['rows']['train']} / {metrics['rows']['val']} / {metrics['rows']['test']}", "")
    console.print(table)
    if metrics.get("training", {}).get("stopped"):
        console.print(f"[yellow]warning:[/yellow] {metrics['training']['stopped']}")
    console.print(f"run directory: [bold]{run_dir}[/bold]")
