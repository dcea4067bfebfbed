"""The shared adapter table: every registered model family keeps the same promises.

Adding a model adds nothing here: the tests run over ``ADAPTERS``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tabtune_cli import TabularPipeline
from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import ADAPTERS, get_adapter
from tabtune_cli.tuning import lora

from conftest import SEED, TUNE_PARAMS

NAMES = sorted(ADAPTERS)
TASK = Task("classification", 3)


def tiny(name):
    adapter = get_adapter(name)
    torch.manual_seed(0)
    module, architecture = adapter.build(ModelConfig(name=name, pretrained=False, size="tiny"), TASK)
    with torch.no_grad():  # a trained checkpoint has no all-zero tensors; neither should the test model
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    return adapter, module, architecture


def episode(seed=0, n_context=48, n_query=16, n_features=5):
    g = torch.Generator().manual_seed(seed)
    Xc, Xq = torch.randn(2, n_context, n_features, generator=g), torch.randn(2, n_query, n_features, generator=g)
    yc = torch.randint(0, 3, (2, n_context), generator=g)
    yc[:, :3] = torch.arange(3)
    return Xc, yc, Xq


@pytest.mark.parametrize("name", NAMES)
def test_episode_outputs_depend_on_context_labels_not_on_other_queries(name):
    adapter, module, _ = tiny(name)
    module.train()
    Xc, yc, Xq = episode()
    # OrionMSP's reference lets query rows meet (its default, the computation its weights know): its option
    # to keep them apart is what this promise is tested on (tests/test_orion_msp.py tests the default)
    config = adapter.config_class(name=name, **({"isolate_queries": True} if name == "orionmsp" else {}))
    out = adapter.episode_logits(module, Xc, yc, Xq, TASK, config)
    assert out.shape == (2, 16, 3) and torch.isfinite(out).all()
    # a query row's output ignores the other query rows: no row sees another query's features
    alone = adapter.episode_logits(module, Xc, yc, Xq[:, :1], TASK, config)
    torch.testing.assert_close(alone[:, 0], out[:, 0], atol=1e-4, rtol=1e-4)
    # ...and it reads the labels of the context
    relabelled = adapter.episode_logits(module, Xc, (yc + 1) % 3, Xq, TASK, config)
    assert (relabelled - out).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_every_lora_adapter_is_live(name):
    adapter, module, _ = tiny(name)
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    wrapped.train()
    Xc, yc, Xq = episode()
    base = adapter.episode_logits(wrapped, Xc, yc, Xq, TASK).detach()
    lora_b = [(n, p) for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert len(lora_b) >= 4
    dead = []
    for n, p in lora_b:
        with torch.no_grad():
            saved = p.clone()
            p.normal_(0.0, 0.5)
        moved = (adapter.episode_logits(wrapped, Xc, yc, Xq, TASK) - base).abs().max().item()
        with torch.no_grad():
            p.copy_(saved)
        if moved < 1e-6:
            dead.append(n)
    assert dead == []
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", ["inference", "base-ft", "peft"])
def test_strategy_invariants_and_reload(name, strategy, split, tmp_path):
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_name=name.upper(), tuning_strategy=strategy, tuning_params=TUNE_PARAMS[strategy],
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 2}, device="cpu",
                           seed=SEED).fit(X_train, y_train)
    torch.manual_seed(SEED)
    start, _ = get_adapter(name).build(ModelConfig(name=name, pretrained=False, size="tiny"),
                                       Task("classification", 2))
    start = start.state_dict()
    now = pipe.module_.get_base_model().state_dict() if strategy == "peft" else pipe.module_.state_dict()
    base_now = {k.replace("base_layer.", ""): v for k, v in now.items() if "lora_" not in k}
    changed = [k for k, v in start.items() if not torch.equal(v, base_now[k])]
    if strategy == "base-ft" and pipe.train_result_.best_epoch > 0:
        assert changed
    else:
        assert changed == []
    proba = pipe.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    pipe.save(tmp_path)
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path).predict_proba(X_test), proba)


class NearestAdapter:
    """A stand-in model: 0.9 on the label of the nearest context row, the rest spread evenly."""

    max_classes = 10
    native_many_classes = False

    @staticmethod
    def predict(module, X_context, y_context, X_query, task, config, device):
        nearest = ((X_query[:, None, :] - X_context[None]) ** 2).sum(-1).argmin(1)
        probs = np.full((len(X_query), task.n_classes), 0.1 / (task.n_classes - 1))
        probs[np.arange(len(X_query)), y_context[nearest]] = 0.9
        return probs


def test_the_class_hierarchy_reaches_every_class_and_sums_to_one():
    from tabtune_cli.models.base import predict_classes

    rng = np.random.default_rng(0)
    X_context = rng.normal(size=(260, 3))
    y_context = np.arange(260) % 26
    X_query = X_context[:52] + 1e-3
    probs = predict_classes(NearestAdapter(), torch.nn.Identity(), X_context, y_context, X_query, Task("classification", 26),
                            None, None)
    assert probs.shape == (52, 26)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(probs.argmax(axis=1), y_context[:52])
    assert probs.max(axis=1).min() == pytest.approx(0.81)  # 0.9 for the group x 0.9 within it


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", ["inference", "peft"])
def test_more_classes_than_the_head_work(name, strategy):
    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.normal(size=(390, 4)), columns=list("abcd"))
    y = pd.Series(pd.qcut(X["a"], 13, labels=False).map(lambda k: f"k{k:02d}"), name="label")
    records = []
    pipe = TabularPipeline(model_name=name, tuning_strategy=strategy, tuning_params=TUNE_PARAMS[strategy],
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 1}, device="cpu",
                           seed=SEED).fit(X.iloc[:300], y.iloc[:300], on_record=records.append)
    proba = pipe.predict_proba(X.iloc[300:])
    assert proba.shape == (90, 13) and len(pipe.classes_) == 13
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    if strategy == "peft":
        assert any("loss" in r and np.isfinite(r["loss"]) for r in records)


CONCRETE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "concrete.parquet"
# an epoch is one pass over the rows (13 steps of one 64-query episode), constant learning rate
CONCRETE_TUNING = {"epochs": 20, "steps_per_epoch": None, "context_size": 256, "query_size": 64, "batch_size": 1,
                   "learning_rate": 3e-3, "scheduler": "constant", "early_stopping_patience": None,
                   "show_progress": False}


@pytest.mark.skipif(not CONCRETE.is_file(), reason=f"{CONCRETE} is absent (the shared real-data tables)")
@pytest.mark.parametrize("name", [n for n in NAMES if "regression" in ADAPTERS[n].tasks])
def test_base_ft_from_tiny_random_weights_learns_concrete_regression(name):
    data = pd.read_parquet(CONCRETE)
    y, X = data.pop("compressive_strength"), data
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[: int(0.8 * len(X))], order[int(0.8 * len(X)):]
    # ContextTab's post-LN (RoBERTa-style) layers diverge at 3e-3 from random weights; 1e-3 learns (r2 0.85)
    tuning = {**CONCRETE_TUNING, "learning_rate": 1e-3} if name == "contexttab" else CONCRETE_TUNING
    pipe = TabularPipeline(model_name=name, task_type="regression", tuning_strategy="base-ft",
                           tuning_params=tuning,
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 1},
                           device="cpu", seed=SEED).fit(X.iloc[train], y.iloc[train])
    metrics = pipe.evaluate(X.iloc[test], y.iloc[test])
    assert pipe.train_result_.best_epoch > 0 and pipe.train_result_.best_val < pipe.train_result_.val_before
    assert metrics["r2"] > 0.0, metrics
    # predictions come back in the target's own units
    assert abs(float(np.mean(pipe.predict(X.iloc[test]))) - float(y.mean())) < float(y.std())


def test_nano_takes_tables_wider_than_its_input_in_training_and_prediction():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 130)), columns=[f"x{i}" for i in range(130)])
    y = pd.Series(np.where(X["x0"] > 0, "a", "b"), name="label")
    records = []
    pipe = TabularPipeline(model_name="nano", tuning_strategy="peft", tuning_params=TUNE_PARAMS["peft"],
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 2}, device="cpu",
                           seed=SEED).fit(X.iloc[:160], y.iloc[:160], on_record=records.append)
    assert any("loss" in r for r in records)
    proba = pipe.predict_proba(X.iloc[160:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


# nano's member is one view of the table (its training averages the logits of all its views) and its prediction
# calibrates the ensemble's probabilities (models/nano.py): one view, uncalibrated, is the member compared
ONE_MEMBER = {"nano": dict(preprocessing=["standard"], calibrate=False)}


@pytest.mark.parametrize("name", NAMES)
def test_the_training_forward_is_the_prediction_forward(name):
    """In eval mode, an episode's training outputs are prediction's own for the same context, query and member:
    the softmax of the logits at the model's temperature is ``predict``'s answer with one member (TabICL: its
    estimator's member preprocessing; TabPFN: its estimator's members' transforms;
    TabDPT: its estimator's imputation and scaling)."""
    import dataclasses

    from scipy.special import softmax

    adapter, module, _ = tiny(name)
    module.eval()
    Xc, yc, Xq = episode()
    Xc[0, ::5, 1] = torch.nan if adapter.raw_numbers else 0.0  # a gap reaches the packages that fill gaps themselves
    config = adapter.config_class(name=name, pretrained=False, size="tiny")
    config = dataclasses.replace(config, n_estimators=1, softmax_temperature=config.softmax_temperature or 0.9,
                                 **ONE_MEMBER.get(name, {}))
    with torch.no_grad():
        logits = adapter.episode_logits(module, Xc[:1], yc[:1], Xq[:1], TASK, config)[0].double().numpy()
    expected = adapter.predict(module, Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), TASK, config,
                               torch.device("cpu"))
    np.testing.assert_allclose(softmax(logits / config.softmax_temperature, axis=-1), expected, atol=1e-4, rtol=0)
