"""Shared fixtures for the engine tests: a small learnable table and tiny random-weight TabICL settings.

Everything runs on CPU with TabICL's random-weight ``tiny`` size, so no checkpoint
or network is needed and the whole suite stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The suite never reaches the Hugging Face Hub: official checkpoints are written by the tests, and the download
# path is tested against a local mirror (test_downloads.py) in processes that set their own HF_* variables.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

# random-weight tiny TabICL, one ensemble member: deterministic and quick
TINY_MODEL = {"pretrained": False, "size": "tiny", "n_estimators": 1}

# Small episodes, one per step, 7 steps an epoch (one pass over the fixture's 216 training rows in
# query-sized slices). Training relabels classes and permutes features in every episode, so a
# random-weight model cannot memorise the rule; in 5 epochs it learns to read the class balance from the
# context (validation log loss falls from ~0.75 to ~0.45 on the fixture's 20/80 table).
# the tests watch the training objective (log loss) for early stopping, whatever a model's recipe watches
TUNE_PARAMS = {
    "base-ft": {"epochs": 5, "steps_per_epoch": 7, "context_size": 64, "query_size": 32, "batch_size": 1,
                "learning_rate": 1e-3, "scheduler": "constant", "warmup_steps": 0, "show_progress": False,
                "early_stopping_metric": {}},
    "peft": {"epochs": 5, "steps_per_epoch": 7, "context_size": 64, "query_size": 32, "batch_size": 1,
             "learning_rate": 3e-3, "scheduler": "constant", "warmup_steps": 0, "show_progress": False,
             "early_stopping_metric": {}},
    "inference": {"show_progress": False},
    "context": {"epochs": 5, "steps_per_epoch": 7, "context_size": 64, "query_size": 32, "batch_size": 1,
                "learning_rate": 0.1, "scheduler": "constant", "warmup_steps": 0, "show_progress": False,
                "early_stopping_metric": {}, "context_rows": 16},
}

SEED = 0
N_TRAIN = 240

# One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core machine torch's
# spinning worker threads make every step many times slower whenever another process is busy.
torch.set_num_threads(1)


def make_table(n: int = 300, seed: int = 0, threshold: float = 1.0) -> tuple[pd.DataFrame, pd.Series]:
    """``n`` rows: six numeric features and one string categorical; the label follows a simple rule.

    ``churn`` is ``"yes"`` exactly when ``f0 + 0.5 * (color == "red") > threshold``: f0 and colour carry the
    signal, f1..f5 are noise. The default threshold makes about 20% of the rows ``"yes"``.
    """
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"f{i}" for i in range(6)])
    X["color"] = rng.choice(["red", "green", "blue"], size=n)
    score = X["f0"] + np.where(X["color"] == "red", 0.5, 0.0)
    y = pd.Series(np.where(score > threshold, "yes", "no"), name="churn")
    return X, y


@pytest.fixture(scope="session")
def table():
    return make_table()


@pytest.fixture(scope="session")
def split(table):
    """(X_train, y_train, X_test, y_test): the first 240 rows train, the last 60 are held out."""
    X, y = table
    return (X.iloc[:N_TRAIN].reset_index(drop=True), y.iloc[:N_TRAIN].reset_index(drop=True),
            X.iloc[N_TRAIN:].reset_index(drop=True), y.iloc[N_TRAIN:].reset_index(drop=True))


def fit_pipeline(strategy: str, X, y, **overrides):
    from tabtune_cli import TabularPipeline

    kwargs = dict(model_name="tabicl", tuning_strategy=strategy, tuning_params=dict(TUNE_PARAMS[strategy]),
                  model_params=dict(TINY_MODEL), device="cpu", seed=SEED)
    kwargs.update(overrides)
    return TabularPipeline(**kwargs).fit(X, y)


@pytest.fixture(scope="session")
def holdout():
    """A larger independent draw from the same distribution, for comparing fitted pipelines."""
    return make_table(n=400, seed=1)


@pytest.fixture(scope="session")
def fitted(split):
    """One fitted pipeline per strategy, all from the same seed (hence the same initial weights).

    Shared by several tests: treat them as read-only.
    """
    X_train, y_train, _, _ = split
    return {name: fit_pipeline(name, X_train, y_train) for name in ("inference", "base-ft", "peft")}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(SEED)
    yield


@pytest.fixture(autouse=True)
def _float32_on_every_cpu(monkeypatch):
    """TabPFN's estimators (``inference_precision="auto"``) predict under bf16 autocast on CPUs with native bf16
    (AVX512-BF16, AMX: ``tabpfn.utils._cpu_supports_fast_bf16``) and in float32 elsewhere. bf16 keeps about
    three significant digits, so two paths equal in float32 (the estimator's cached and uncached fit modes)
    differ there by up to 5.4e-2 on the tests' random weights: that is why two TabPFN equality tests failed on
    a fresh machine with such a CPU and passed on this AMD EPYC (AVX2). The suite computes in float32 on every
    CPU; ``test_tabpfn.py::test_on_a_bf16_cpu_tabtune_takes_the_packages_autocast_too`` checks that tabtune
    follows the package's choice where the CPU has bf16."""
    import tabpfn.utils

    monkeypatch.setattr(tabpfn.utils, "_cpu_supports_fast_bf16", lambda: False)


class Bomb:
    """Unpickling this touches a file: proof that a loader executed it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``tabtune ARGS`` in this process: (exit code, stdout, stderr)."""
    from tabtune_cli.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tabtune(capsys, monkeypatch, tmp_path):
    """``tabtune ARGS`` in this process, from ``tmp_path``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tabtune"])  # train hands sys.argv to Hydra
    return lambda *args: cli(capsys, *args)


def assert_picture(path) -> None:
    """``path`` is a PNG that decodes to a picture with something drawn on it (not a blank canvas)."""
    from matplotlib.image import imread

    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, (path, pixels.shape)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    drawn = (np.abs(pixels - background).sum(axis=-1) > 0.1).mean()
    assert drawn > 0.01, (path, f"only {drawn:.2%} of the pixels differ from the background")


# ---- a finished command-line run -----------------------------------------------------------------

def breast_cancer() -> tuple[pd.DataFrame, str]:
    from tabtune_cli.data.builtin import TARGET, load_builtin

    return load_builtin("breast_cancer"), TARGET


def check_run(run_dir: Path, strategy: str, frame: pd.DataFrame, target: str) -> dict:
    """A finished run's promises; ``frame`` is the table it read (its test rows are ``predictions.parquet``'s
    ``row``), ``target`` its label column."""
    from tabtune_cli import TabularPipeline, rundir
    from tabtune_cli.config import recipe_defaults
    from tabtune_cli.evaluation.metrics import compute_metrics

    assert rundir.is_complete(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    classes = [c[len("proba_"):] for c in predictions.columns if c.startswith("proba_")]
    proba = predictions[[f"proba_{c}" for c in classes]].to_numpy()
    # the test metrics are the predictions' own, scored against the table's labels
    truth = frame.loc[predictions["row"].astype(int), target].astype(str).to_numpy()
    assert list(predictions["target"].astype(str)) == list(truth)
    again = compute_metrics("classification", np.searchsorted(classes, truth), proba)
    for key, value in again.items():
        if value is not None:
            assert metrics["test"][key] == pytest.approx(value, abs=1e-9), key
    assert metrics["rows"]["test"] == len(predictions)
    assert metrics["total_params"] > 0
    # the device the run used, not the setting (device=auto would not say): smoke runs set device=cpu, and the
    # run's manifest and saved pipeline say the same
    manifest = json.loads((run_dir / "run.json").read_text())
    saved = json.loads((run_dir / "pipeline.json").read_text())
    assert metrics["device"] == manifest["device"] == saved["summary"]["device"] == "cpu" and "gpu" not in metrics
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and f"name: {strategy}" in config
    files = {p.name for p in run_dir.iterdir()}
    assert {"preprocessor.json", "train.log", "context.safetensors"} <= files
    assert ("history.jsonl" in files) == (strategy != "inference")
    if strategy == "inference":
        assert metrics["trainable_params"] == 0 and "adapter_model.safetensors" not in files
    if strategy == "base-ft":
        # every weight but the few the model builds frozen (TabICL's 4 fixed rotary frequencies, OrionMSP's 12)
        frozen = metrics["total_params"] - metrics["trainable_params"]
        assert 0 <= frozen <= 0.001 * metrics["total_params"] and "model.safetensors" in files
    if strategy == "peft":
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert 0 < metrics["trainable_params"] < metrics["total_params"]
    if strategy != "inference":
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        # the watched metric is the model's recipe's (ROC AUC where it follows tabicl's and tabpfn's fine-tuners)
        model = run_dir.name.split("_")[1]
        recipe = recipe_defaults(model, strategy).get("early_stopping_metric") or {}
        watched = metrics["training"]["val_metric"]
        assert watched == recipe.get("classification", "log_loss"), (run_dir.name, watched)
        assert any("loss" in h for h in history) and any(f"val_{watched}" in h for h in history)
        assert_picture(run_dir / "training.png")
    else:
        assert not (run_dir / "training.png").exists()
    assert not any(p.suffix in (".pkl", ".pickle", ".pt") for p in run_dir.iterdir())
    assert not list(run_dir.glob(".*partial"))
    # the saved run reloads and reproduces its own test predictions
    pipeline = TabularPipeline.load(run_dir)
    assert pipeline.tuning_strategy == strategy and list(pipeline.classes_) == classes
    rows = frame.loc[predictions["row"].astype(int)].drop(columns=target)
    np.testing.assert_allclose(pipeline.predict_proba(rows), proba, atol=1e-6, rtol=0)
    return metrics
