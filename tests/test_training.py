"""The strategies' invariants (what changes, what stays) and that training learns: validation, early
stopping, the best epoch restored, the epoch and episode schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from tabicl._model.layers import MultiheadAttention
from tabicl._model.tabicl import TabICL

from tabtune_cli import TabTuneError
from tabtune_cli.config import LoraSettings
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.models.tabicl import TabICLAdapter
from tabtune_cli.tuning import lora

from conftest import SEED, TINY_MODEL, TUNE_PARAMS, fit_pipeline, make_table
from tabicl_engine import (CPU, TabularPipeline, base_weights, changed_keys, initial_module, lora_weights,
                          noisy_tiny_module, toy_inputs)


# ---- strategy invariants ------------------------------------------------------------------
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


# ---- training learns ------------------------------------------------------------------------
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


def test_on_record_streams_every_step_and_validation(split, monkeypatch):
    X_train, y_train, _, _ = split
    records = []
    params = {**TUNE_PARAMS["base-ft"], "epochs": 2, "early_stopping_patience": None}
    pipe = fit_pipeline("base-ft", X_train, y_train, tuning_params=params)
    TabularPipeline(tuning_strategy="base-ft", tuning_params=params, model_params=TINY_MODEL,
                    device="cpu", seed=SEED).fit(X_train, y_train, on_record=records.append)
    # streamed as training goes: a callback that stops the fit at the 5th record (step 4) stops it there,
    # after 4 training forwards, not after all 14 (records handed over at the end would let it run on)
    seen, forwards = [], []
    episode_logits = TabICLAdapter.episode_logits
    monkeypatch.setattr(TabICLAdapter, "episode_logits",
                        lambda self, *a, **k: forwards.append(1) or episode_logits(self, *a, **k))

    def stop_at_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TabularPipeline(tuning_strategy="base-ft", tuning_params=params, model_params=TINY_MODEL, device="cpu",
                        seed=SEED).fit(X_train, y_train, on_record=stop_at_five)
    assert seen == records[:5] and len(forwards) == 4
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
