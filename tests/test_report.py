"""Sweeps compared: `tabtune report`, a failing job among others, jobs side by side (joblib), an Optuna
search, and the experiment configs. Each sweep runs once per module and is shared by the tests on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tabtune_cli.cli import main
from tabtune_cli.commands.train import plain_configs
from tabtune_cli.config import Objective
from tabtune_cli.errors import TabTuneError
from tabtune_cli.evaluation.metrics import METRICS, direction
from tabtune_cli.evaluation.report import varying_keys
from tabtune_cli.commands.hydra_conf import compose_train, conf_dir

from conftest import assert_picture

TABTUNE = [sys.executable, "-m", "tabtune_cli"]
SMOKE = ["debug=smoke", "model=tabicl", "strategy=peft", "dataset=iris"]


def tabtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TABTUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def sweep_dir(root: Path) -> Path:
    (found,) = [p for p in (root / "runs" / "multirun").glob("*/*") if p.is_dir()]
    return found


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p.parent for p in sweep.glob("*/run.json")), key=lambda p: int(p.name.split("_")[0]))


def report(sweep: Path, capsys, *args: str) -> tuple[pd.DataFrame, str]:
    """`tabtune report` in this process: report.csv as a frame, and what it printed."""
    capsys.readouterr()
    assert main(["report", str(sweep), *args]) == 0
    printed = capsys.readouterr().out
    return pd.read_csv(sweep / "report.csv"), printed


def assert_row_is_its_metrics(row: pd.Series) -> None:
    metrics = json.loads((Path(row["path"]) / "metrics.json").read_text())
    for name, value in metrics["test"].items():
        assert row[f"test_{name}"] == value, name
    for name in ("fit_seconds", "predict_seconds", "peak_memory_mb", "trainable_params", "total_params"):
        assert row[name] == metrics[name], name


# ---- one job fails, the others go on --------------------------------------------------------------

@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """Two jobs, the first failing as it builds its model (a checkpoint that is no checkpoint)."""
    root = tmp_path_factory.mktemp("failing")
    (root / "broken.ckpt").write_text("not a checkpoint")
    result = tabtune("train", "-m", *SMOKE, "threads=1", "model.checkpoint=broken.ckpt,null", cwd=root)
    return result, sweep_dir(root)


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(failing_sweep):
    result, sweep = failing_sweep
    assert result.returncode == 1, result.stderr  # the sweep ran to its end, and says a job failed
    assert "Traceback" not in result.stderr
    failed, complete = job_dirs(sweep)
    manifest = json.loads((failed / "run.json").read_text())
    assert manifest["status"] == "failed" and "broken.ckpt" in manifest["error"]
    assert f"job {failed.name} " in result.stderr and "broken.ckpt" in result.stderr
    assert json.loads((complete / "run.json").read_text())["status"] == "complete"
    assert "1 of 2 jobs complete" in result.stdout and f"tabtune report {sweep.relative_to(sweep.parents[3])}" in result.stdout


def test_report_shows_the_failed_job_with_its_error_and_the_others_intact(failing_sweep, capsys):
    _, sweep = failing_sweep
    frame, printed = report(sweep, capsys)
    assert list(frame["status"]) == ["failed", "complete"]
    assert list(frame["model.checkpoint"].fillna("null")) == ["broken.ckpt", "null"]  # what varied
    assert "broken.ckpt" in frame.loc[0, "error"] and frame.loc[0, ["test_accuracy", "fit_seconds"]].isna().all()
    assert_row_is_its_metrics(frame.loc[1])
    assert "failed" in printed and "broken.ckpt" in printed
    markdown = (sweep / "report.md").read_text()
    assert "| failed |" in markdown and "broken.ckpt" in markdown
    assert_picture(sweep / "report_runs.png")


def test_a_job_that_cannot_start_gets_a_failed_run_directory(tmp_path):
    result = tabtune("train", "-m", "debug=smoke", "dataset=file", "dataset.target=y",
                     "dataset.path=missing.csv,absent.csv", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    jobs = job_dirs(sweep_dir(tmp_path))
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "run.json").read_text())["status"] == "failed"
        assert (job / "config.yaml").is_file()


def test_report_needs_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2 and "report: no run directories" in capsys.readouterr().err


# ---- jobs side by side: hydra/launcher=joblib -----------------------------------------------------

@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("joblib")
    result = tabtune("train", "-m", *SMOKE, "lora.r=2,4,8,16", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     cwd=root)
    assert result.returncode == 0, result.stderr
    return sweep_dir(root)


def test_parallel_jobs_have_their_own_run_directory_threads_and_peak_memory(joblib_sweep):
    jobs = job_dirs(joblib_sweep)
    assert [j.name for j in jobs] == [f"{n}_tabicl_peft" for n in range(4)]
    manifests = [json.loads((j / "run.json").read_text()) for j in jobs]
    assert all(m["status"] == "complete" for m in manifests)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert {m["threads"] for m in manifests} == {max(1, cores // 2)}  # the cores shared by the 2 at a time
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert [m["trainable_params"] for m in metrics] == sorted(m["trainable_params"] for m in metrics)
    peaks = [m["peak_memory_mb"] for m in metrics]
    assert all(100 < p < 10_000 for p in peaks)  # each job's own: test_a_fit_reports_its_own_peak_memory below


def test_a_fit_reports_its_own_peak_memory_not_an_earlier_jobs(split):
    """A sweep runs its jobs one after another in one process (the basic launcher; each joblib worker too):
    a job's peak must be its own, not the process's running peak. Here an earlier 'job' holds 600 MiB and
    frees them; the fit after it reports a peak far below them (without fit's reset_peak it reports them)."""
    import gc

    import torch

    from tabtune_cli import TabularPipeline
    from tabtune_cli.memory import peak_mb

    X_train, y_train, _, _ = split
    spike = torch.ones(600 * 2**20 // 4)  # written, so resident
    during = peak_mb(torch.device("cpu"))
    del spike
    gc.collect()
    pipe = TabularPipeline("nano", model_params={"n_estimators": 1}, device="cpu").fit(X_train, y_train)
    assert during > pipe.peak_memory_mb_ + 400, (during, pipe.peak_memory_mb_)


def test_report_of_a_rank_sweep_plots_the_trade_off(joblib_sweep, capsys):
    frame, printed = report(joblib_sweep, capsys)
    assert list(frame["lora.r"]) == [2, 4, 8, 16]
    assert "model" not in frame and "strategy" not in frame  # only what varied
    for _, row in frame.iterrows():
        assert_row_is_its_metrics(row)
    assert "4 complete" in printed
    for image in ("report_runs.png", "report_lora_rank.png"):
        assert_picture(joblib_sweep / image)
        assert f"]({image})" in (joblib_sweep / "report.md").read_text()


# ---- hyperparameter search: hparams_search=optuna -------------------------------------------------

def test_an_optuna_search_finishes_and_its_best_trial_is_reported(tmp_path, capsys):
    result = tabtune("train", "hparams_search=optuna", *SMOKE, "threads=1", "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert len(job_dirs(sweep)) == 3 and set(best["best_params"]) == {"strategy.learning_rate", "lora.r"}
    frame, printed = report(sweep, capsys)
    (winner,) = frame.index[frame["best"]]
    config = yaml.safe_load((Path(frame.loc[winner, "path"]) / "config.yaml").read_text())
    assert config["lora"]["r"] == best["best_params"]["lora.r"]
    assert config["strategy"]["learning_rate"] == pytest.approx(best["best_params"]["strategy.learning_rate"])
    assert frame.loc[winner, "val_log_loss"] == pytest.approx(best["best_value"])  # what each trial returned
    assert f"best trial: {frame.loc[winner, 'run']}" in printed


# ---- configs ------------------------------------------------------------------------------------------

def test_experiments_compose_into_their_setup():
    _, model, strategy, lora, dataset, values = plain_configs(compose_train(["experiment=lora_ranks", "lora.r=4"]))
    assert (model.name, strategy.name, lora.r, lora.lora_alpha, strategy.epochs) == ("tabicl", "peft", 4, 8, 5)
    _, model, strategy, *_ = plain_configs(compose_train(["experiment=strategies", "debug=smoke"]))
    assert (model.name, strategy.name) == ("nano", "peft")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        sweeps = {name: compose("train", [f"experiment={name}"], return_hydra_config=True).hydra.sweeper.params
                  for name in ("lora_ranks", "strategies")}
    assert sweeps == {"lora_ranks": {"lora.r": "2,4,8,16"}, "strategies": {"strategy": "inference,base-ft,peft"}}


def test_objectives_are_the_metrics_and_have_a_direction():
    assert {o.value for o in Objective} == {"auto", *METRICS["classification"], *METRICS["regression"]}
    assert [direction(m) for m in ("auto", "log_loss", "rmse", "roc_auc", "r2")] == [
        "minimize", "minimize", "minimize", "maximize", "maximize"]
    with pytest.raises(TabTuneError, match="'objective'"):
        compose_train(["objective=auc"])


@pytest.mark.parametrize("configs,expected", [
    ([{"lora.r": 2, "seed": 0}, {"lora.r": 4, "seed": 0}], ["lora.r"]),
    # a group option's own defaults follow the option: only its name is what varied ...
    ([{"model.name": "nano", "model.n_estimators": 64}, {"model.name": "tabicl", "model.n_estimators": 4}],
     ["model.name"]),
    # ... unless runs of one option differ in it too
    ([{"model.name": "nano", "model.n_estimators": 64}, {"model.name": "nano", "model.n_estimators": 8},
      {"model.name": "tabicl", "model.n_estimators": 4}], ["model.name", "model.n_estimators"]),
    ([{"lora.r": 2}, {}], []),  # a run without config.yaml says nothing about what varied
])
def test_varying_keys(configs, expected):
    assert varying_keys(configs) == expected
