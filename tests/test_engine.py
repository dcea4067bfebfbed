"""The engine: strategies, training, checkpoints, save/load, episodes and the errors a user sees."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from safetensors.torch import load_file
from tabicl._model.layers import MultiheadAttention
from tabicl._model.tabicl import TabICL

from tabtune_cli import TabTuneError
from tabtune_cli.pipeline import TabularPipeline as _TabularPipeline
from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.models.tabicl import TabICLAdapter
from tabtune_cli.tuning import lora
from tabtune_cli.data.episodes import epoch_episodes, episode_sizes

from conftest import SEED, TINY_MODEL, TUNE_PARAMS, fit_pipeline, make_table


class TabularPipeline(_TabularPipeline):
    """These tests exercise the engine on TabICL (the library's default model is nano)."""

    def __init__(self, model_name="tabicl", *args, **kwargs):
        super().__init__(model_name, *args, **kwargs)

CPU = torch.device("cpu")


# ---- helpers -------------------------------------------------------------------------------------
def initial_module(pipe) -> torch.nn.Module:
    """The module ``pipe.fit`` started from: fit seeds torch with ``pipe.seed`` right before building."""
    torch.manual_seed(pipe.seed)
    module, _ = get_adapter("tabicl").build(pipe.model_config_, pipe.task_)
    return module


def base_weights(module) -> dict[str, torch.Tensor]:
    """State dict of the underlying model under its own key names (peft's wrapping and adapters removed)."""
    if not isinstance(module, PeftModel):
        return dict(module.state_dict())
    out = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            continue
        out[key.removeprefix("base_model.model.").replace(".base_layer", "")] = value
    return out


def lora_weights(module: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def changed_keys(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def noisy_tiny_module(seed: int = 1):
    """A tiny TabICL whose all-zero tensors (biases, ssmax output layers) hold small noise, like trained weights."""
    torch.manual_seed(seed)
    adapter = TabICLAdapter()
    module, architecture = adapter.build(ModelConfig(pretrained=False, size="tiny"), Task("classification", 2))
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    assert not any(t.is_floating_point() and not t.any() for t in module.state_dict().values())
    return adapter, module, architecture


def toy_inputs(n_context=40, n_query=10, n_features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1, n_context + n_query, n_features, generator=g)
    y = (X[0, :n_context, 0] > 0).float()[None]
    return X, y


# ---- 1. strategy invariants ------------------------------------------------------------------
def test_rebuilding_with_the_fit_seed_reproduces_the_start_and_another_seed_does_not(fitted):
    pipe = fitted["inference"]
    a, b = initial_module(pipe), initial_module(pipe)
    assert changed_keys(a.state_dict(), b.state_dict()) == []
    torch.manual_seed(pipe.seed + 1)
    other, _ = get_adapter("tabicl").build(pipe.model_config_, pipe.task_)
    assert changed_keys(a.state_dict(), other.state_dict()), "a different seed should give different weights"


def test_inference_changes_no_weight(fitted):
    pipe = fitted["inference"]
    assert pipe.train_result_ is None
    assert changed_keys(base_weights(pipe.module_), initial_module(pipe).state_dict()) == []
    assert not any(p.requires_grad for p in pipe.module_.parameters())


def test_base_ft_changes_weights(fitted):
    pipe = fitted["base-ft"]
    start = initial_module(pipe).state_dict()
    changed = changed_keys(base_weights(pipe.module_), start)
    # every trainable tensor with a gradient moves under AdamW; a handful of changes would mean a frozen model
    assert len(changed) > len(start) // 2
    assert any(k.startswith("icl_predictor.decoder") for k in changed)
    assert any(k.startswith("col_embedder") for k in changed)


def test_peft_changes_only_lora_weights(fitted):
    pipe = fitted["peft"]
    module = pipe.module_
    assert isinstance(module, PeftModel)
    # base weights bitwise equal to the start
    assert changed_keys(base_weights(module), initial_module(pipe).state_dict()) == []
    # only adapter weights are trainable, and training moved them (lora_B starts at zero)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    lora_b = {k: v for k, v in lora_weights(module).items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())


def test_lora_covers_attention_in_proj_and_out_proj():
    adapter, module, _ = noisy_tiny_module()
    attention_modules = [n for n, m in module.named_modules() if isinstance(m, MultiheadAttention)]
    peft_model = lora.wrap(adapter, module, LoraSettings())
    wrappers = {n for n, m in peft_model.named_modules() if isinstance(m, ParamWrapper)}
    assert all(m.parameter_name == "in_proj_weight" for n, m in peft_model.named_modules()
               if isinstance(m, ParamWrapper))
    out_projs = {n for n, m in peft_model.named_modules()
                 if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper) and n.endswith(".out_proj")}
    # every attention under the default prefixes: one packed in_proj adapter and one out_proj adapter
    assert len(attention_modules) == 5
    assert {n.removeprefix("base_model.model.") for n in wrappers} == set(attention_modules)
    assert {n.removeprefix("base_model.model.").replace(".base_layer", "") for n in out_projs} == \
        {f"{n}.out_proj" for n in attention_modules}


def test_every_lora_adapter_is_live():
    """Perturbing any single adapter's lora_B changes the model output (none is dead weight)."""
    adapter, module, _ = noisy_tiny_module()
    peft_model = lora.wrap(adapter, module, LoraSettings())
    peft_model.eval()
    X, y = toy_inputs()
    with torch.no_grad():
        baseline = peft_model(X, y)
        lora_bs = [(n, p) for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert len(lora_bs) == 22  # 5 attentions x (in_proj, out_proj) + 5 FFNs x 2 + decoder x 2
        assert any("out_proj" in n for n, _ in lora_bs) and any(n.endswith("attn.lora_B.default.weight")
                                                                 for n, _ in lora_bs)
        dead = []
        for name, param in lora_bs:
            assert not param.any()  # peft starts B at zero: the wrapped model equals the base model
            param.normal_(0.0, 0.5)
            if torch.allclose(peft_model(X, y), baseline, atol=1e-6, rtol=0):
                dead.append(name)
            param.zero_()
        assert torch.equal(peft_model(X, y), baseline)
    assert dead == []


def test_live_attention_matches_official_tabicl_forward():
    """Routing out_proj through its own forward keeps TabICL's maths: same outputs as the official model."""
    _, module, architecture = noisy_tiny_module()
    official = TabICL(**architecture)
    official.load_state_dict(module.state_dict())
    module.eval(), official.eval()
    X, y = toy_inputs()
    with torch.no_grad():
        torch.testing.assert_close(module(X, y), official(X, y), atol=1e-5, rtol=1e-5)
    # and in training mode (the fine-tuning forward)
    module.train(), official.train()
    torch.testing.assert_close(module(X, y), official(X, y), atol=1e-5, rtol=1e-5)


# ---- 2. training learns ------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["base-ft", "peft"])
def test_training_lowers_validation_and_test_log_loss(fitted, holdout, strategy):
    X_test, y_test = holdout
    pipe, start = fitted[strategy], fitted["inference"]
    r = pipe.train_result_
    assert r.best_epoch >= 1 and r.steps >= r.epochs_run
    assert r.best_val < r.val_before - 0.1
    history = [h["val_log_loss"] for h in r.history if "val_log_loss" in h]
    assert history[0] == r.val_before and min(history[1:]) == r.best_val
    # both strategies start from the same weights (same seed), so their starting validation loss agrees
    other = fitted["peft" if strategy == "base-ft" else "base-ft"]
    assert r.val_before == pytest.approx(other.train_result_.val_before)
    # on unseen rows the tuned pipeline beats the untuned start by a clear margin
    tuned, untuned = pipe.evaluate(X_test, y_test), start.evaluate(X_test, y_test)
    assert tuned["log_loss"] < untuned["log_loss"] - 0.1
    assert tuned["brier"] < untuned["brier"]


def test_best_epoch_weights_are_restored(fitted):
    """After training, the pipeline's weights are the best epoch's: re-validating reproduces best_val."""
    from tabtune_cli.tuning.trainer import Split, validate

    pipe = fitted["base-ft"]
    X, y = make_table()
    X_train, y_train = X.iloc[:240], y.iloc[:240]
    # the same hold-out fit() made (seeded split), rebuilt through the public objects
    from tabtune_cli.data.split import split_frame
    rest, held = split_frame(X_train.assign(__target__=y_train.to_numpy()), "__target__", fraction=0.1,
                             stratify=True, seed=SEED)
    train = Split(pipe.preprocessor_.transform(rest.drop(columns="__target__")),
                  pipe.label_encoder_.transform(rest["__target__"]))
    val = Split(pipe.preprocessor_.transform(held.drop(columns="__target__")),
                pipe.label_encoder_.transform(held["__target__"]))
    # after training, the held-out rows join the prediction context: every row given to fit() is used
    np.testing.assert_array_equal(np.concatenate([train.X, val.X]), pipe.context_X_)
    np.testing.assert_array_equal(np.concatenate([train.y, val.y]), pipe.context_y_)
    again = validate(pipe.adapter_, pipe.module_, pipe.task_, train, val, pipe.model_config_, CPU, SEED)
    assert again["log_loss"] == pytest.approx(pipe.train_result_.best_val, abs=1e-6)


def test_training_keeps_the_start_when_no_epoch_beats_it(monkeypatch, split):
    from tabtune_cli.tuning import trainer

    X_train, y_train, _, _ = split
    scores = iter([0.5, 0.9, 0.8, 0.85])  # before training, then after epochs 1..3: all worse than the start
    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: {"log_loss": next(scores)})
    params = {**TUNE_PARAMS["base-ft"], "epochs": 3, "early_stopping_patience": None}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    r = pipe.train_result_
    assert r.val_before == 0.5 and r.epochs_run == 3
    assert r.best_val <= r.val_before
    assert changed_keys(base_weights(pipe.module_), initial_module(pipe).state_dict()) == []


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(monkeypatch, split):
    from tabtune_cli.tuning import trainer

    X_train, y_train, _, _ = split
    snapshots = []

    def fake_validate(adapter, module, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return {"log_loss": [0.9, 0.6, 0.7, 0.8, 0.75, 0.1][len(snapshots) - 1]}

    monkeypatch.setattr(trainer, "validate", fake_validate)
    params = {**TUNE_PARAMS["base-ft"], "epochs": 5, "early_stopping_patience": 3}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    r = pipe.train_result_
    # epoch 1 is best (0.6); epochs 2-4 do not improve, so patience 3 stops after epoch 4 (never sees 0.1)
    assert (r.best_epoch, r.best_val, r.epochs_run, len(snapshots)) == (1, 0.6, 4, 5)
    assert changed_keys(pipe.module_.state_dict(), snapshots[1]) == []
    assert changed_keys(pipe.module_.state_dict(), snapshots[4])  # not the last epoch's weights
    assert [h["val_log_loss"] for h in r.history if "val_log_loss" in h] == [0.9, 0.6, 0.7, 0.8, 0.75]


def test_early_stopping_can_watch_a_metric_where_higher_is_better(monkeypatch, split):
    """strategy.early_stopping_metric {classification: roc_auc} (tabicl's and tabpfn's recipes): the highest
    ROC AUC is the best epoch, patience counts epochs without a higher one, metrics name what was watched."""
    from tabtune_cli.tuning import trainer

    X_train, y_train, _, _ = split
    snapshots, asked = [], []

    def fake_validate(adapter, module, *args, **kwargs):
        asked.append(args[-1])  # the metric the trainer asks for
        snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return {"roc_auc": [0.60, 0.70, 0.90, 0.80, 0.85, 0.88, 0.99][len(snapshots) - 1]}

    monkeypatch.setattr(trainer, "validate", fake_validate)
    params = {**TUNE_PARAMS["base-ft"], "epochs": 6, "early_stopping_patience": 3,
              "early_stopping_metric": {"classification": "roc_auc"}}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    r = pipe.train_result_
    # epoch 2 is best (0.90); 3-5 stay below it, so patience 3 stops after epoch 5 (never sees 0.99)
    assert (r.best_epoch, r.best_val, r.val_before, r.epochs_run) == (2, 0.90, 0.60, 5)
    assert set(asked) == {"roc_auc"} and r.val_metric == "roc_auc"
    assert changed_keys(pipe.module_.state_dict(), snapshots[2]) == []
    assert pipe.summary()["training"]["val_metric"] == "roc_auc"
    with pytest.raises(TabTuneError, match=r"strategy.early_stopping_metric.classification: unknown metric 'auc'"):
        fit_pipeline("base-ft", X_train, y_train,
                     tuning_params={**params, "early_stopping_metric": {"classification": "auc"}})


@pytest.mark.parametrize("model_name,model_params,best_epoch", [
    ("nano", {"n_estimators": 1}, 2),  # pretrained: epochs 1 and 3 rank the validation rows worse than the start
    ("tabicl", TINY_MODEL, 3)])        # random weights: no ranking to keep, the lowest log loss wins
def test_a_pretrained_start_is_replaced_only_by_weights_that_rank_as_well(monkeypatch, split, model_name,
                                                                         model_params, best_epoch):
    from tabtune_cli.tuning import trainer

    X_train, y_train, _, _ = split
    scores = iter([(0.5, 0.8), (0.4, 0.79), (0.45, 0.81), (0.3, 0.7)])
    monkeypatch.setattr(trainer, "validate", lambda *a, **k: dict(zip(("log_loss", "roc_auc"), next(scores))))
    params = {**TUNE_PARAMS["base-ft"], "epochs": 3, "steps_per_epoch": 1, "early_stopping_patience": None}
    r = fit_pipeline("base-ft", X_train, y_train, tuning_params=params, model_name=model_name,
                     model_params=model_params).train_result_
    assert (r.best_epoch, r.best_val, r.best_step) == (best_epoch, [0.5, 0.4, 0.45, 0.3][best_epoch], best_epoch)
    assert [h["val_roc_auc"] for h in r.history if "val_roc_auc" in h] == [0.8, 0.79, 0.81, 0.7]


def test_on_record_streams_every_step_and_validation(split):
    X_train, y_train, _, _ = split
    records = []
    params = {**TUNE_PARAMS["base-ft"], "epochs": 2, "early_stopping_patience": None}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    TabularPipeline(tuning_strategy="base-ft", tuning_params=params, model_params=TINY_MODEL,
                    device="cpu", seed=SEED).fit(X_train, y_train, on_record=records.append)
    # streamed as training goes: a callback that stops the fit at the 5th record has seen exactly 5
    seen = []

    def stop_at_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TabularPipeline(tuning_strategy="base-ft", tuning_params=params, model_params=TINY_MODEL, device="cpu",
                        seed=SEED).fit(X_train, y_train, on_record=stop_at_five)
    assert seen == records[:5]
    steps = [h for h in records if "loss" in h]
    # steps_per_epoch 7: a validation after every 7th step
    assert [h["step"] for h in steps] == list(range(1, 15))
    assert [h["step"] for h in records if "val_log_loss" in h] == [0, 7, 14]
    assert [h["epoch"] for h in records if "val_log_loss" in h] == [0, 1, 2]
    assert all(h["lr"] == params["learning_rate"] for h in steps)  # constant schedule
    assert pipe.train_result_.history == records  # same seed, same run
    assert pipe.rows_ == {"train": 216, "val": 24}


@pytest.mark.parametrize("n_rows,steps_per_epoch,accumulation,expected", [
    (100, 3, 1, 3), (240, 3, 1, 3),       # the same steps per epoch whatever the table's size
    (100, 3, 2, 3),                        # optimizer steps, each of `accumulation` batches
    (100, None, 1, 3), (240, None, 1, 7),  # null: one pass; 90 or 216 training rows, query 32
    (240, None, 2, 4)])
def test_an_epoch_is_steps_per_epoch_optimizer_steps(monkeypatch, n_rows, steps_per_epoch, accumulation, expected):
    from tabtune_cli.tuning import trainer

    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: {"log_loss": 0.5})
    X, y = make_table(n=n_rows)
    batches = []
    real = trainer._episode_tensors
    monkeypatch.setattr(trainer, "_episode_tensors", lambda batch, *a: batches.append(len(batch)) or real(batch, *a))
    params = {**TUNE_PARAMS["base-ft"], "epochs": 2, "early_stopping_patience": None,
              "steps_per_epoch": steps_per_epoch, "gradient_accumulation_steps": accumulation}
    r = fit_pipeline("base-ft", X, y, tuning_params=params).train_result_
    assert r.steps == 2 * expected and r.epochs_run == 2
    assert [h["step"] for h in r.history if "val_log_loss" in h] == [0, expected, 2 * expected]
    if steps_per_epoch is not None:  # full batches, drawn from pass after pass over the rows
        assert batches == [1] * (2 * expected * accumulation)


def test_training_walks_every_row_as_a_query_pass_after_pass(monkeypatch):
    """Episodes run on across epochs: each pass over the training rows queries every row once."""
    from tabtune_cli.tuning import trainer

    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: {"log_loss": 0.5})
    real, queries = trainer._episode_tensors, []

    def collect(batch, *args):
        queries.extend(e.query for e in batch)
        return real(batch, *args)

    monkeypatch.setattr(trainer, "_episode_tensors", collect)
    X, y = make_table(n=100)  # 90 training rows, query 32 -> 3 episodes a pass (the last reaches back)
    params = {**TUNE_PARAMS["base-ft"], "epochs": 3, "steps_per_epoch": 2, "early_stopping_patience": None}
    fit_pipeline("base-ft", X, y, tuning_params=params)
    assert len(queries) == 6
    for start in (0, 3):  # two passes of three episodes, across the epochs' boundaries
        assert set(np.concatenate(queries[start:start + 3])) == set(range(90))


def test_validation_predicts_a_capped_stratified_subset_with_few_members(monkeypatch, split):
    from tabtune_cli.tuning import trainer

    X_train, y_train, _, _ = split
    seen = []

    def fake_validate(adapter, module, task, train, val, model_config, device, seed, target_scale=None, name=None):
        seen.append((len(val.y), sorted(set(val.y.tolist())), model_config.n_estimators))
        return {"log_loss": 0.5}

    monkeypatch.setattr(trainer, "validate", fake_validate)
    params = {**TUNE_PARAMS["base-ft"], "epochs": 1, "steps_per_epoch": 1, "val_max_rows": 10,
              "val_n_estimators": 2}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params, model_params={**TINY_MODEL, "n_estimators": 3})
    assert seen == [(10, [0, 1], 2)] * 2  # the start and epoch 1; both classes kept
    assert pipe.model_config_.n_estimators == 3  # prediction keeps the model's members
    seen.clear()
    fit_pipeline("base-ft", X_train, y_train, model_params={**TINY_MODEL, "n_estimators": 3},
                 tuning_params={**params, "val_max_rows": None, "val_n_estimators": None})
    assert seen == [(24, [0, 1], 3)] * 2  # null: every validation row (10% of 240), the model's members
    seen.clear()
    fit_pipeline("base-ft", X_train, y_train, tuning_params={**params, "val_n_estimators": 4})
    assert seen[0][2] == 1  # never more members than the model's own


def test_predict_and_evaluate_agree_with_predict_proba(fitted, split):
    _, _, X_test, y_test = split
    pipe = fitted["base-ft"]
    proba = pipe.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    labels = pipe.predict(X_test)
    np.testing.assert_array_equal(labels, np.asarray(pipe.classes_)[proba.argmax(axis=1)])
    metrics = pipe.evaluate(X_test, y_test)
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == y_test.to_numpy()))
    codes = (y_test.to_numpy() == "yes").astype(int)  # classes_ are sorted: ["no", "yes"]
    assert list(pipe.classes_) == ["no", "yes"]
    expected_ll = -np.mean(np.log(np.clip(proba[np.arange(len(codes)), codes], 1e-15, 1)))
    assert metrics["log_loss"] == pytest.approx(expected_ll, rel=1e-4)


# ---- 3a. official checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": 10, "zero_init": False}
    torch.manual_seed(123)
    model = TabICL(**architecture)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tabicl-tiny.ckpt"
    torch.save({"config": architecture, "state_dict": model.state_dict()}, path)
    return path, architecture, {k: v.clone() for k, v in model.state_dict().items()}


def test_official_checkpoint_loads_and_predicts_like_the_official_model(official_checkpoint, split):
    path, architecture, state = official_checkpoint
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    assert pipe.architecture_ == architecture
    assert changed_keys(pipe.module_.state_dict(), state) == []

    # TabICL's own estimator on the same file and the same numbers (its members' recipe, its softmax)
    from tabicl import TabICLClassifier

    official = TabICLClassifier(n_estimators=1, softmax_temperature=pipe.model_config_.softmax_temperature,
                                model_path=str(path), allow_auto_download=False, device="cpu")
    expected = official.fit(pipe.context_X_, pipe.context_y_).predict_proba(pipe.preprocessor_.transform(X_test))
    got = pipe.predict_proba(X_test)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got[:, 1]) > 1e-3  # not a constant output: the comparison has teeth


def test_checkpoint_pipeline_save_load_reads_the_checkpoint_again(official_checkpoint, split, tmp_path):
    path, _, _ = official_checkpoint
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    pipe.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "pipeline.json").read_text())
    assert meta["base_weights"] == "checkpoint" and not (tmp_path / "saved" / "model.safetensors").exists()
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path / "saved").predict_proba(X_test),
                                  pipe.predict_proba(X_test))


def test_saving_over_an_earlier_save_does_not_mix_weights(official_checkpoint, fitted, split, tmp_path):
    path, _, _ = official_checkpoint
    X_train, y_train, X_test, _ = split
    folder = tmp_path / "model"
    fitted["base-ft"].save(folder)
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    pipe.save(folder)
    np.testing.assert_array_equal(TabularPipeline.load(folder).predict_proba(X_test), pipe.predict_proba(X_test))


def test_checkpoint_without_config_is_refused_naming_the_file(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "weights-only.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(TabTuneError, match="config") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_checkpoint_that_is_not_a_torch_file_is_refused_naming_the_file(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(TabTuneError, match="not a TabICL checkpoint") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_missing_checkpoint_file_is_named(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(TabTuneError, match="no such file") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_regression_checkpoint_for_a_classification_task_is_refused(tmp_path, split):
    X_train, y_train, _, _ = split
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": 0}
    path = tmp_path / "regressor.ckpt"
    torch.save({"config": architecture, "state_dict": TabICL(**architecture).state_dict()}, path)
    with pytest.raises(TabTuneError, match="regression checkpoint") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused(tmp_path, split):
    X_train, y_train, _, _ = split
    tiny = {**TabICLAdapter.sizes["tiny"], "max_classes": 10}
    path = tmp_path / "mismatch.ckpt"
    torch.save({"config": {**tiny, "embed_dim": 32}, "state_dict": TabICL(**tiny).state_dict()}, path)
    with pytest.raises(TabTuneError, match="do not match") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


# ---- 3b/3c. save and load ------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["inference", "base-ft", "peft"])
def test_save_load_round_trip_gives_identical_probabilities(fitted, split, tmp_path, strategy):
    _, _, X_test, y_test = split
    pipe = fitted[strategy]
    folder = pipe.save(tmp_path / strategy)
    loaded = TabularPipeline.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), pipe.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.predict(X_test), pipe.predict(X_test))
    assert list(loaded.classes_) == list(pipe.classes_)
    assert loaded.evaluate(X_test, y_test)["log_loss"] == pipe.evaluate(X_test, y_test)["log_loss"]
    assert loaded.tuning_strategy == strategy




@pytest.mark.parametrize("strategy", ["inference", "base-ft",
                                      "peft"])
def test_a_loaded_pipeline_saves_and_loads_again_unchanged(fitted, split, tmp_path, strategy):
    _, _, X_test, _ = split
    pipe = fitted[strategy]
    once = TabularPipeline.load(pipe.save(tmp_path / "once"))
    twice = TabularPipeline.load(once.save(tmp_path / "twice"))
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == \
        sorted(p.name for p in (tmp_path / "once").iterdir())
    np.testing.assert_array_equal(twice.predict_proba(X_test), pipe.predict_proba(X_test))


@pytest.mark.parametrize("strategy", ["inference", "base-ft", "peft"])
def test_saved_folder_holds_no_pickle(fitted, tmp_path, strategy):
    folder = fitted[strategy].save(tmp_path / strategy)
    files = sorted(p.name for p in Path(folder).rglob("*") if p.is_file())
    allowed = [f for f in files if f.endswith((".json", ".safetensors")) or (strategy == "peft" and f == "README.md")]
    assert files == allowed, f"unexpected files: {sorted(set(files) - set(allowed))}"
    assert "pipeline.json" in files and "preprocessor.json" in files and "context.safetensors" in files
    if strategy == "peft":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    for name in files:
        data = (Path(folder) / name).read_bytes()
        assert not data.startswith(b"PK"), f"{name} is a zip (torch.save format)"
        if name.endswith(".safetensors"):
            # safetensors: 8-byte little-endian header length, then a JSON header; nothing executable
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            assert header and all("dtype" in v for k, v in header.items() if k != "__metadata__")
            assert load_file(Path(folder) / name)
    for name in (f for f in files if f.endswith(".json")):
        json.loads((Path(folder) / name).read_text())  # plain JSON, nothing else


def test_load_of_a_folder_without_pipeline_json_names_it(tmp_path):
    with pytest.raises(TabTuneError, match="pipeline.json") as err:
        TabularPipeline.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_peft_adapters_load_with_peft_own_loader(fitted, split, tmp_path):
    _, _, X_test, _ = split
    pipe = fitted["peft"]
    folder = pipe.save(tmp_path / "peft")
    meta = json.loads((folder / "pipeline.json").read_text())
    adapter = TabICLAdapter()
    base = adapter.from_architecture(meta["architecture"])
    base.load_state_dict(load_file(folder / "model.safetensors"))
    Xq = pipe.preprocessor_.transform(X_test)
    args = (pipe.context_X_, pipe.context_y_, Xq, pipe.task_, pipe.model_config_, CPU)
    without_adapters = adapter.predict(base, *args)

    restored = PeftModel.from_pretrained(base, str(folder))
    got = adapter.predict(restored, *args)
    np.testing.assert_allclose(got, adapter.predict(pipe.module_, *args), atol=1e-6)
    np.testing.assert_allclose(got, pipe.predict_proba(X_test), atol=1e-6)
    # the adapters matter: without them the outputs are those of the untrained start
    assert np.abs(got - without_adapters).max() > 1e-3
    np.testing.assert_allclose(without_adapters, adapter.predict(initial_module(pipe), *args), atol=1e-6)


# ---- 4. episodes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_rows,context_size,query_size,n_classes",
                         [(216, 64, 32, 2), (100, 128, 48, 3), (57, 20, 10, 5), (10, 64, 64, 2)])
def test_episodes_are_disjoint_cover_every_row_and_hold_every_class(n_rows, context_size, query_size, n_classes):
    rng_labels = np.random.default_rng(7)
    labels = np.concatenate([np.arange(n_classes), rng_labels.integers(0, n_classes, n_rows - n_classes)])
    labels = rng_labels.permutation(labels)
    episodes = epoch_episodes(labels, n_rows, context_size, query_size, np.random.default_rng(0))
    # as asked when the table holds an episode; otherwise both parts shrink in proportion (48 of 176 rows are
    # query: 27 of 100), the table's every row in one of them
    c, q = {216: (64, 32), 100: (73, 27), 57: (20, 10), 10: (5, 5)}[n_rows]
    assert episode_sizes(n_rows, context_size, query_size) == (c, q)
    queried = np.zeros(n_rows, dtype=int)
    for e in episodes:
        assert len(e.query) == q and len(set(e.query)) == q
        assert len(e.context) == c and len(set(e.context)) == len(e.context)
        assert set(e.context).isdisjoint(e.query)
        assert e.context.min() >= 0 and e.context.max() < n_rows
        # every class that has rows outside this query is in the context
        assert set(labels[e.context]) == set(np.delete(labels, e.query))
        queried[e.query] += 1
    assert (queried >= 1).all()
    assert len(episodes) == -(-n_rows // q)


def test_episode_relabelling_is_a_consistent_bijection():
    """Each episode permutes features and renames classes; context and query get the same mapping."""
    from tabtune_cli.tuning.trainer import _episode_tensors

    rng = np.random.default_rng(0)
    X_all = torch.as_tensor(rng.normal(size=(60, 5)).astype(np.float32))
    y_np = rng.integers(0, 3, 60)
    y_all = torch.as_tensor(y_np)
    episodes = epoch_episodes(y_np, 60, 20, 10, np.random.default_rng(1), n_features=5, n_classes=3)
    assert any(not np.array_equal(e.feature_order, np.arange(5)) for e in episodes)
    assert any(not np.array_equal(e.class_order, np.arange(3)) for e in episodes)
    batch = episodes[:4]
    Xc, yc, Xq, yq = _episode_tensors(batch, X_all, y_all, CPU)
    for b, e in enumerate(batch):
        assert sorted(e.feature_order) == list(range(5)) and sorted(e.class_order) == list(range(3))
        np.testing.assert_array_equal(Xc[b].numpy(), X_all.numpy()[e.context][:, e.feature_order])
        np.testing.assert_array_equal(Xq[b].numpy(), X_all.numpy()[e.query][:, e.feature_order])
        np.testing.assert_array_equal(yc[b].numpy(), e.class_order[y_np[e.context]])
        np.testing.assert_array_equal(yq[b].numpy(), e.class_order[y_np[e.query]])


def test_episodes_without_labels_are_disjoint_and_cover_every_row():
    episodes = epoch_episodes(None, 90, 30, 20, np.random.default_rng(3))
    seen = set()
    for e in episodes:
        assert set(e.context).isdisjoint(e.query) and len(e.context) == 30
        seen |= set(e.query)
    assert seen == set(range(90))


def test_episodes_stratified_context_keeps_a_rare_class():
    labels = np.zeros(200, dtype=int)
    labels[:2] = 1  # two rows of a rare class
    for seed in range(20):
        for e in epoch_episodes(labels, 200, 16, 32, np.random.default_rng(seed)):
            outside = np.setdiff1d(np.arange(2), e.query)
            if len(outside):
                assert 1 in labels[e.context]


def test_episodes_same_seed_same_episodes_other_seed_different():
    labels = np.random.default_rng(0).integers(0, 3, 150)
    a = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11))
    b = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11))
    c = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(12))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.context, y.context)
        np.testing.assert_array_equal(x.query, y.query)
    a = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11), n_features=4, n_classes=3)
    b = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11), n_features=4, n_classes=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.feature_order, y.feature_order)
        np.testing.assert_array_equal(x.class_order, y.class_order)
    assert any(not np.array_equal(x.query, z.query) for x, z in zip(a, c))


def test_episodes_need_two_rows():
    with pytest.raises(ValueError, match="two"):
        epoch_episodes(np.array([0]), 1, 4, 4, np.random.default_rng(0))


# ---- 5. errors -------------------------------------------------------------------------------
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


def test_many_class_episodes_hold_one_group_of_classes_each():
    labels = np.arange(520) % 26
    episodes = epoch_episodes(labels, len(labels), 64, 16, np.random.default_rng(0), n_features=3, n_classes=26,
                              max_classes=10)
    queried = set()
    for e in episodes:
        classes = set(labels[e.context]) | set(labels[e.query])
        assert len(classes) <= 10 and e.n_classes == len(set(labels[e.context]))
        assert set(labels[e.query]) <= set(labels[e.context])  # every query class is in the context
        assert not set(e.context) & set(e.query)
        local = e.class_order[sorted(classes)]
        assert sorted(local) == list(range(len(classes)))  # a bijection onto 0..k-1
        queried |= set(e.query)
    assert queried == set(range(len(labels)))
    assert {e.context.shape for e in episodes} == {(64,)} and {e.query.shape for e in episodes} == {(16,)}


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
