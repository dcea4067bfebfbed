"""TabICL's inference is tabicl's own: the estimator's probabilities, and a context encoded once.

Random-weight tiny checkpoints in TabICL's official format (``{"config", "state_dict"}``) are read
by tabtune (``model.checkpoint=``) and by the package's own ``TabICLClassifier`` /
``TabICLRegressor`` (``model_path=``). Both sides see the same numbers: a numeric table, which the
estimator receives as tabtune's preprocessed matrix (the documented boundary: tabtune's shared
preprocessor runs first). Timings live in ``benchmarks/inference_tabicl.py``, not here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tabicl import TabICLClassifier, TabICLRegressor
from tabicl._model.tabicl import TabICL

from tabtune_cli import TabularPipeline
from tabtune_cli.config import ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.specs.tabicl import TabICLConfig
from tabtune_cli.models.tabicl import TabICLAdapter

from conftest import SEED, TUNE_PARAMS

TOLERANCE = 1e-4  # the bar; measured differences are printed (pytest -s)
CPU = torch.device("cpu")


def write_official(path, max_classes: int, seed: int):
    """A random tiny TabICL saved as TabICL's own container; zero tensors get noise, like trained weights."""
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": max_classes, "zero_init": False}
    torch.manual_seed(seed)
    model = TabICL(**architecture)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    torch.save({"config": architecture, "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tabicl-official")
    return {"classification": write_official(folder / "tabicl-classifier.ckpt", 10, 11),
            "regression": write_official(folder / "tabicl-regressor.ckpt", 0, 12)}


def numeric_table(n: int, n_classes: int = 3, seed: int = 0):
    """``n`` rows of five numeric features; a label of ``n_classes`` classes (None: a regression target)."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + [0, 1, 0, -2, 5],
                     columns=[f"x{i}" for i in range(5)])
    X["x4"] = np.exp(X["x4"] - 5)  # one skewed column, for the power-transformed members
    score = X["x0"] + 0.5 * X["x1"] + rng.normal(scale=0.3, size=n)
    if n_classes is None:
        return X, pd.Series(3.0 * score + 10.0, name="target")
    cuts = np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])
    return X, pd.Series(np.array([f"c{k:02d}" for k in range(n_classes)])[np.searchsorted(cuts, score)],
                        name="label")


def fit_pipe(path, X, y, task_type="classification", strategy="inference", **model):
    params = {"checkpoint": str(path), "pretrained": True, **model}
    return TabularPipeline(model_name="tabicl", task_type=task_type, tuning_strategy=strategy,
                           tuning_params=dict(TUNE_PARAMS[strategy]), model_params=params, device="cpu",
                           seed=SEED).fit(X, y)


def context_labels(pipe):
    """The pipeline's context rows and labels, as the estimator is handed them (labels in the user's terms)."""
    if pipe.task_.is_classification:
        return pipe.context_X_, pipe.label_encoder_.inverse(pipe.context_y_).astype(str)
    mean, std = pipe.target_scale_
    return pipe.context_X_, pipe.context_y_.astype(np.float64) * std + mean


# ---- 1. the estimator's answers ------------------------------------------------------------------
@pytest.mark.parametrize("n_estimators,temperature,n_classes", [(1, 0.9, 3), (4, 0.9, 3), (5, 0.5, 4), (3, 0.9, 2)])
def test_classification_equals_the_estimators_predict_proba(checkpoints, n_estimators, temperature, n_classes):
    X, y = numeric_table(260, n_classes)
    pipe = fit_pipe(checkpoints["classification"], X.iloc[:200], y.iloc[:200], n_estimators=n_estimators,
                    softmax_temperature=temperature)
    got = pipe.predict_proba(X.iloc[200:])
    Xc, yc = context_labels(pipe)
    Xq = pipe.preprocessor_.transform(X.iloc[200:])
    differences = {}
    for kv_cache in (False, True):
        estimator = TabICLClassifier(n_estimators=n_estimators, softmax_temperature=temperature, kv_cache=kv_cache,
                                     model_path=checkpoints["classification"], allow_auto_download=False,
                                     device="cpu").fit(Xc, yc)
        assert list(estimator.classes_) == list(pipe.classes_)
        differences[kv_cache] = np.abs(got - estimator.predict_proba(Xq)).max()
    print(f"\nTabICL classification, {n_estimators} members, T={temperature}, {n_classes} classes: "
          f"max |diff| vs estimator {differences[False]:.2e} (kv_cache=True: {differences[True]:.2e})")
    assert max(differences.values()) <= TOLERANCE
    assert np.ptp(got[:, 0]) > 1e-3  # not a constant output: the comparison has teeth


@pytest.mark.parametrize("n_estimators", [1, 4])
def test_regression_equals_the_estimators_predict(checkpoints, n_estimators):
    X, y = numeric_table(260, None)
    pipe = fit_pipe(checkpoints["regression"], X.iloc[:200], y.iloc[:200], task_type="regression",
                    n_estimators=n_estimators)
    got = pipe.predict(X.iloc[200:])
    Xc, yc = context_labels(pipe)
    estimator = TabICLRegressor(n_estimators=n_estimators, model_path=checkpoints["regression"],
                                allow_auto_download=False, device="cpu").fit(Xc, yc)
    expected = estimator.predict(pipe.preprocessor_.transform(X.iloc[200:]))
    difference = np.abs(got - expected).max()
    print(f"\nTabICL regression, {n_estimators} members: max |diff| vs estimator {difference:.2e} "
          f"(target std {y.std():.2f})")
    assert difference <= TOLERANCE * max(1.0, float(y.std()))
    assert np.ptp(got) > 1e-3


def test_more_classes_than_the_head_follow_the_estimators_own_hierarchy(checkpoints):
    X, y = numeric_table(390, 12)
    pipe = fit_pipe(checkpoints["classification"], X.iloc[:300], y.iloc[:300], n_estimators=2)
    got = pipe.predict_proba(X.iloc[300:])
    Xc, yc = context_labels(pipe)
    estimator = TabICLClassifier(n_estimators=2, model_path=checkpoints["classification"],
                                 allow_auto_download=False, device="cpu").fit(Xc, yc)
    difference = np.abs(got - estimator.predict_proba(pipe.preprocessor_.transform(X.iloc[300:]))).max()
    print(f"\nTabICL 12 classes (head: 10): max |diff| vs estimator {difference:.2e}")
    assert got.shape == (90, 12) and difference <= TOLERANCE


def test_fine_tuned_weights_predict_like_the_estimator_on_the_written_checkpoint(checkpoints, tmp_path):
    """base-ft then predict: the same recipe on the new weights (validation runs this same ``predict``)."""
    X, y = numeric_table(260, 3)
    tuning = {**TUNE_PARAMS["base-ft"], "epochs": 2}
    pipe = TabularPipeline(model_name="tabicl", tuning_strategy="base-ft", tuning_params=tuning,
                           model_params={"checkpoint": str(checkpoints["classification"]), "n_estimators": 3},
                           device="cpu", seed=SEED).fit(X.iloc[:200], y.iloc[:200])
    assert pipe.train_result_.steps > 0
    path = pipe.adapter_.write_checkpoint(pipe.module_, pipe.architecture_, pipe.task_, tmp_path)
    Xc, yc = context_labels(pipe)
    estimator = TabICLClassifier(n_estimators=3, model_path=path, allow_auto_download=False, device="cpu").fit(Xc, yc)
    got = pipe.predict_proba(X.iloc[200:])
    assert np.abs(got - estimator.predict_proba(pipe.preprocessor_.transform(X.iloc[200:]))).max() <= TOLERANCE


# ---- 2. the context, encoded once ------------------------------------------------------------------
def tiny_module(task: Task, seed: int = 3):
    adapter = TabICLAdapter()
    torch.manual_seed(seed)
    module, _ = adapter.build(ModelConfig(pretrained=False, size="tiny"), task)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    return adapter, module.eval()


def arrays(seed: int = 0, n_context: int = 150, n_query: int = 40, n_classes: int | None = 3):
    rng = np.random.default_rng(seed)
    Xc = rng.normal(size=(n_context, 6)).astype(np.float32)
    Xq = rng.normal(size=(n_query, 6)).astype(np.float32)
    yc = rng.integers(0, n_classes, n_context) if n_classes else rng.normal(size=n_context).astype(np.float32)
    return Xc, yc, Xq


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_cached_predictions_equal_uncached_ones(kind):
    task = Task(kind, 3 if kind == "classification" else 0)
    adapter, module = tiny_module(task)
    Xc, yc, Xq = arrays(n_classes=3 if task.is_classification else None)
    config = TabICLConfig(n_estimators=4, kv_cache=True)
    first = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    again = adapter.predict(module, Xc, yc, Xq[:7], task, config, CPU)
    cache = adapter.context_cache
    assert (cache.misses, cache.hits) == (1, 1)
    adapter.cache_context = False
    uncached = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    assert (cache.misses, cache.hits) == (1, 1)  # the uncached path leaves the cache alone
    np.testing.assert_allclose(first, uncached, atol=1e-5)
    np.testing.assert_allclose(again, uncached[:7], atol=1e-5)


def test_like_the_package_the_default_keeps_no_key_value_cache():
    """The package's kv_cache=False unless model.kv_cache=true: the cache costs about 50 KB a context row a
    member at the default size, 1.8x the package's peak memory at 10,000 rows (bench/results.md)."""
    task = Task("classification", 3)
    adapter, module = tiny_module(task)
    Xc, yc, Xq = arrays()
    default = adapter.predict(module, Xc, yc, Xq, task, TabICLConfig(n_estimators=2), CPU)
    (estimator,) = adapter.context_cache.entries.values()
    assert estimator.kv_cache is False and estimator.model_kv_cache_ is None
    cached = adapter.predict(module, Xc, yc, Xq, task, TabICLConfig(n_estimators=2, kv_cache=True), CPU)
    estimator = list(adapter.context_cache.entries.values())[-1]
    assert estimator.kv_cache is True and len(estimator.model_kv_cache_) > 0
    np.testing.assert_allclose(cached, default, atol=1e-5)


def test_a_weight_change_another_context_or_other_settings_rebuild_the_cache():
    task = Task("classification", 3)
    adapter, module = tiny_module(task)
    Xc, yc, Xq = arrays()
    config = TabICLConfig(n_estimators=2, kv_cache=True)
    cache = adapter.context_cache

    def predict(X_context=Xc, y_context=yc, settings=config):
        return adapter.predict(module, X_context, y_context, Xq, task, settings, CPU)

    before = predict()
    predict()
    assert (cache.misses, cache.hits) == (1, 1)
    with torch.no_grad():  # an optimizer step, in effect: an in-place update of one weight
        module.icl_predictor.decoder[0].weight.add_(0.5)
    moved = predict()
    assert (cache.misses, cache.hits) == (2, 1)
    assert np.abs(moved - before).max() > 1e-4
    adapter.cache_context = False
    np.testing.assert_allclose(moved, predict(), atol=1e-5)  # the rebuilt entry holds the new weights
    adapter.cache_context = True
    other = predict(Xc[::-1].copy(), yc[::-1].copy())  # the same rows in another order: another context
    assert (cache.misses, cache.hits) == (3, 1)
    predict(settings=TabICLConfig(n_estimators=3, kv_cache=True))
    assert (cache.misses, cache.hits) == (4, 1)
    predict(settings=TabICLConfig(n_estimators=3, kv_cache=True))
    assert (cache.misses, cache.hits) == (4, 2)
    assert other.shape == before.shape


def test_the_pipeline_encodes_its_context_once_and_lora_changes_invalidate_it():
    X, y = numeric_table(200, 3)
    pipe = TabularPipeline(model_name="tabicl", tuning_strategy="peft", tuning_params=dict(TUNE_PARAMS["peft"]),
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 2, "kv_cache": True},
                           device="cpu", seed=SEED).fit(X.iloc[:160], y.iloc[:160])
    cache = pipe.adapter_.context_cache
    misses = cache.misses
    first = [pipe.predict_proba(X.iloc[160 + i:161 + i]) for i in range(5)]
    assert cache.misses == misses + 1 and cache.hits >= 4
    pipe.adapter_.cache_context = False
    np.testing.assert_allclose(np.concatenate(first), pipe.predict_proba(X.iloc[160:165]), atol=1e-5)
    pipe.adapter_.cache_context = True
    lora_b = next(p for n, p in pipe.module_.named_parameters() if "lora_B" in n and "icl_predictor" in n)
    with torch.no_grad():
        lora_b.normal_(0.0, 0.5)
    moved = pipe.predict_proba(X.iloc[160:165])
    assert cache.misses == misses + 2
    assert np.abs(moved - np.concatenate(first)).max() > 1e-4
