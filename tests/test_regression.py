"""Regression through the engine: target units, fine-tuning round trips, official quantile checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tabicl._model.tabicl import TabICL

from tabtune_cli import TabTuneError
from tabtune_cli.models.tabicl import TabICLAdapter

from conftest import SEED, TINY_MODEL, TUNE_PARAMS, make_table
from tabicl_engine import TabularPipeline, base_weights, changed_keys, initial_module


# ---- regression ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regression_table():
    X, _ = make_table(n=200, seed=4)
    y = pd.Series(100.0 + 20.0 * X["f0"] + np.random.default_rng(4).normal(size=len(X)), name="price")
    return X, y


def test_regression_predictions_follow_the_target_units(regression_table):
    X, y = regression_table
    fit = lambda target: TabularPipeline(model_params=TINY_MODEL, tuning_params={"show_progress": False},  # noqa: E731
                                         device="cpu", seed=SEED).fit(X.iloc[:150], target.iloc[:150])
    base = fit(y)
    assert base.task_.kind == "regression"  # a float target with many values
    pred = base.predict(X.iloc[150:])
    # the model sees standardised targets, so shifting or scaling the target moves predictions alike
    np.testing.assert_allclose(fit(y + 1000.0).predict(X.iloc[150:]), pred + 1000.0, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(fit(y * 10.0).predict(X.iloc[150:]), pred * 10.0, rtol=1e-5, atol=1e-3)
    metrics = base.evaluate(X.iloc[150:], y.iloc[150:])
    errors = pred - y.iloc[150:].to_numpy()
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean(errors ** 2)), rel=1e-5)
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(errors)), rel=1e-5)
    with pytest.raises(TabTuneError, match="predict_proba is for classification"):
        base.predict_proba(X.iloc[150:])


def test_regression_fine_tuning_round_trips(regression_table, tmp_path):
    X, y = regression_table
    params = {**TUNE_PARAMS["base-ft"], "epochs": 2}
    pipe = TabularPipeline(tuning_strategy="base-ft", tuning_params=params, model_params=TINY_MODEL,
                           device="cpu", seed=SEED).fit(X.iloc[:150], y.iloc[:150])
    assert pipe.train_result_.steps > 0 and math.isfinite(pipe.train_result_.best_val)
    assert changed_keys(base_weights(pipe.module_), initial_module(pipe).state_dict())
    loaded = TabularPipeline.load(pipe.save(tmp_path / "reg"))
    np.testing.assert_array_equal(loaded.predict(X.iloc[150:]), pipe.predict(X.iloc[150:]))
    assert loaded.target_scale_ == pipe.target_scale_



def test_official_regression_checkpoint_loads_and_predicts_the_official_quantiles(tmp_path):
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": 0, "zero_init": False}
    torch.manual_seed(7)
    official = TabICL(**architecture)
    path = tmp_path / "tabicl-regressor-tiny.ckpt"
    torch.save({"config": architecture, "state_dict": official.state_dict()}, path)
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(160, 4)), columns=list("abcd"))
    y = pd.Series(3.0 * X["a"] + rng.normal(scale=0.1, size=160) + 50.0, name="strength")
    pipe = TabularPipeline(task_type="regression", model_params={"checkpoint": str(path), "n_estimators": 1},
                           device="cpu").fit(X.iloc[:120], y.iloc[:120])
    assert changed_keys(pipe.module_.state_dict(), official.state_dict()) == []
    # the pipeline's point prediction is the official regressor's: the mean of its quantiles, in the target's units,
    # from the package's own estimator on the same file and the same raw table
    from tabicl import TabICLRegressor

    expected = TabICLRegressor(model_path=str(path), n_estimators=1, device="cpu", allow_auto_download=False) \
        .fit(X.iloc[:120], y.iloc[:120]).predict(X.iloc[120:])
    np.testing.assert_allclose(pipe.predict(X.iloc[120:]), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(TabTuneError, match="regression checkpoint, but the task is classification"):
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X.iloc[:120], (y.iloc[:120] > 50))


def test_regression_validation_is_in_the_targets_own_units_everywhere():
    """history.jsonl, the training summary and val metrics report RMSE in one unit: the target's (a target in
    the thousands, so standardised units would be off by three orders of magnitude)."""
    X, _ = make_table(n=200)
    y = 1000.0 + 300.0 * X["f0"] + 50.0 * X["f1"]
    params = {**TUNE_PARAMS["base-ft"], "epochs": 2, "val_max_rows": None, "val_n_estimators": None}
    records = []
    pipe = TabularPipeline(model_name="tabicl", task_type="regression", tuning_strategy="base-ft",
                           tuning_params=params, model_params=dict(TINY_MODEL), device="cpu",
                           seed=SEED).fit(X.iloc[:160], y.iloc[:160], on_record=records.append)
    val_rmse = [r["val_rmse"] for r in records if "val_rmse" in r]
    assert len(val_rmse) == 3 and min(val_rmse) > 10  # the target's std is about 300
    result = pipe.train_result_
    assert result.best_val == min(val_rmse) or result.best_epoch == 0
    # the kept weights scored on the same rows with the same context: the same number as val metrics
    assert pipe.val_metrics_["rmse"] == pytest.approx(result.best_val, rel=1e-5)
