"""The errors a user of the Python API sees: each names the key, value or column at fault."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from peft.tuners.lora.layer import LoraLayer, ParamWrapper

from tabtune_cli import TabTuneError

from conftest import TINY_MODEL, TUNE_PARAMS, fit_pipeline, make_table
from tabicl_engine import TabularPipeline, base_weights, changed_keys, initial_module, lora_weights


# ---- errors -------------------------------------------------------------------------------
def test_unknown_tuning_param_is_named(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="'epochz'"):
        TabularPipeline(tuning_params={"epochz": 3}, model_params=TINY_MODEL).fit(X_train, y_train)


def test_wrong_typed_tuning_param_is_named(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="learning_rate"):
        TabularPipeline(tuning_strategy="base-ft", tuning_params={"learning_rate": "fast"},
                        model_params=TINY_MODEL).fit(X_train, y_train)


def test_unknown_strategy_lists_the_known_ones(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="'lora-ft'.*inference, base-ft, peft"):
        TabularPipeline(tuning_strategy="lora-ft", model_params=TINY_MODEL).fit(X_train, y_train)


def test_unknown_model_is_named(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="unknown model 'tabpfn-x'.*tabicl"):
        TabularPipeline(model_name="tabpfn-x", model_params=TINY_MODEL).fit(X_train, y_train)




@pytest.mark.parametrize("strategy", ["inference", "base-ft"])
def test_single_class_target_is_refused_naming_the_target(split, strategy):
    X_train, _, _, _ = split
    y = pd.Series(["yes"] * len(X_train), name="churn")
    with pytest.raises(TabTuneError, match="target 'churn' has a single class"):
        fit_pipeline(strategy, X_train, y)


@pytest.mark.parametrize("strategy", ["inference", "base-ft"])
def test_non_numeric_regression_target_is_refused_naming_the_target(split, strategy):
    X_train, _, _, _ = split
    y = pd.Series(np.arange(len(X_train), dtype=float), name="price").astype(object)
    y.iloc[4] = "n/a"
    with pytest.raises(TabTuneError, match="target 'price' has non-numeric values"):
        fit_pipeline(strategy, X_train, y, task_type="regression")


def test_unknown_task_type_is_named(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="task_type: 'ranking'"):
        TabularPipeline(task_type="ranking", model_params=TINY_MODEL).fit(X_train, y_train)


def test_empty_table_is_refused(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="X is empty"):
        TabularPipeline(model_params=TINY_MODEL).fit(X_train.iloc[:0], y_train.iloc[:0])


def test_missing_target_values_are_counted(split):
    X_train, y_train, _, _ = split
    y = y_train.astype(object).copy()
    y.iloc[[3, 5, 8]] = None
    with pytest.raises(TabTuneError, match="3 missing values"):
        TabularPipeline(model_params=TINY_MODEL).fit(X_train, y)


def test_inference_handles_more_than_ten_classes():
    X, _ = make_table(n=240, seed=3)
    y = pd.Series([f"c{i % 12:02d}" for i in range(len(X))], name="label")
    pipe = TabularPipeline(model_params=TINY_MODEL, tuning_params={"show_progress": False}, device="cpu").fit(X, y)
    proba = pipe.predict_proba(X.iloc[:20])
    assert proba.shape == (20, 12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert set(pipe.predict(X.iloc[:20])) <= set(y)


@pytest.mark.parametrize("peft_config,message", [
    ({"target_modules": ["icl_predictor.nowhere"]}, "'icl_predictor.nowhere' is not a module of TabICL"),
    ({"r": 0}, "lora.r': expected a whole number >= 1 or 'auto', got 0"),
    ({"rank": 4}, "unknown peft_config key 'rank'"),
])
def test_bad_lora_settings_are_named(split, peft_config, message):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match=message):
        fit_pipeline("peft", X_train, y_train, peft_config=peft_config)


def test_lora_target_modules_restrict_the_adapters(split):
    X_train, y_train, _, _ = split
    params = {**TUNE_PARAMS["peft"], "epochs": 1}
    pipe = fit_pipeline("peft", X_train, y_train, tuning_params=params,
                        peft_config={"target_modules": ["icl_predictor.decoder"], "r": 2})
    trainable = {n for n, p in pipe.module_.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.icl_predictor.decoder.{i}.lora_{ab}.default.weight"
                         for i in (0, 2) for ab in "AB"}
    assert changed_keys(base_weights(pipe.module_), initial_module(pipe).state_dict()) == []


def test_fp16_trains_on_cpu_with_a_loss_scaler(split, monkeypatch):
    """fp16 autocast runs on CPU too (torch >= 2.3), with the gradient scaler fp16 needs."""
    X_train, y_train, _, _ = split
    scalers = []
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: scalers.append(device) or real(device))
    params = {**TUNE_PARAMS["base-ft"], "mixed_precision": "fp16", "epochs": 1}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    assert scalers == ["cpu"]
    assert all(p.dtype == torch.float32 for p in pipe.module_.parameters())  # autocast, not fp16 weights
    losses = [r["loss"] for r in pipe.train_result_.history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def test_lora_dropout_reaches_the_linear_targets_of_a_packed_attention_model(split):
    """peft cannot put dropout on packed in_proj weights; the linear targets get it, the packed ones train without."""
    X_train, y_train, _, _ = split
    pipe = fit_pipeline("peft", X_train, y_train, tuning_params={**TUNE_PARAMS["peft"], "epochs": 1},
                        peft_config={"lora_dropout": 0.1})
    layers = [m for m in pipe.module_.modules() if isinstance(m, LoraLayer)]
    linear = [m for m in layers if not isinstance(m, ParamWrapper)]
    packed = [m for m in layers if isinstance(m, ParamWrapper)]
    assert linear and packed
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Dropout) and m.lora_dropout["default"].p == 0.1
               for m in linear)
    assert all(not isinstance(m.lora_dropout["default"], torch.nn.Dropout) for m in packed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="no CUDA device is available"):
        TabularPipeline(model_params=TINY_MODEL, device="cuda").fit(X_train, y_train)


@pytest.mark.parametrize("key,value,message", [("epochs", 0, "strategy.epochs must be at least 1"),
                                               ("steps_per_epoch", 0, "strategy.steps_per_epoch must be at least 1"),
                                               ("val_n_estimators", 0, "strategy.val_n_estimators must be at least"),
                                               ("learning_rate", -1e-3, "learning_rate must be positive"),
                                               ("optimizer", "adam", "'adam' is not one of: adamw, sgd")])
def test_bad_strategy_values_are_named(split, key, value, message):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match=message):
        fit_pipeline("base-ft", X_train, y_train, tuning_params={**TUNE_PARAMS["base-ft"], key: value})


def test_summary_counts_trainable_parameters_per_strategy(fitted):
    counts = {name: pipe.summary() for name, pipe in fitted.items()}
    total = counts["inference"]["total_params"]
    assert counts["inference"]["trainable_params"] == 0
    # base-ft trains what TabICL trains: all but its 4 fixed rotary frequencies, built frozen
    frozen = {n for n, p in fitted["base-ft"].module_.named_parameters() if not p.requires_grad}
    assert frozen == {"row_interactor.tf_row.rope.freqs"}
    assert counts["base-ft"]["trainable_params"] == total - 4 and counts["base-ft"]["total_params"] == total
    lora_numel = sum(v.numel() for v in lora_weights(fitted["peft"].module_).values())
    assert counts["peft"]["trainable_params"] == lora_numel
    assert counts["peft"]["total_params"] == total + lora_numel
    assert counts["base-ft"]["training"]["val_best"] == fitted["base-ft"].train_result_.best_val
    assert "training" not in counts["inference"]


def test_predict_before_fit_is_refused(split):
    _, _, X_test, y_test = split
    pipe = TabularPipeline(model_params=TINY_MODEL)
    for call in (lambda: pipe.predict(X_test), lambda: pipe.predict_proba(X_test),
                 lambda: pipe.evaluate(X_test, y_test), lambda: pipe.save("unused")):
        with pytest.raises(TabTuneError, match="not fitted yet"):
            call()


def test_unseen_label_at_evaluate_is_named(fitted, split):
    _, _, X_test, y_test = split
    y = y_test.copy()
    y.iloc[0] = "maybe"
    with pytest.raises(TabTuneError, match="'maybe' was not seen in training"):
        fitted["inference"].evaluate(X_test, y)


def test_missing_feature_column_at_predict_is_named(fitted, split):
    _, _, X_test, _ = split
    with pytest.raises(TabTuneError, match="lacks 1 column\\(s\\) the model was trained with: 'f3'"):
        fitted["inference"].predict(X_test.drop(columns="f3"))
