"""What nano's adapter shows the model of a user's table (the columns it keeps, the views it takes), its calibration,
and its context encoded once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.feature_selection import f_classif
from sklearn.metrics import roc_auc_score

from tabtune_cli import TabularPipeline
from tabtune_cli.config import from_dict
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task, ensemble_predict
from tabtune_cli.models.nano import (NanoAdapter, NanoConfig, View, class_separation, fit_calibration, normalise,
                                     pca_view, quantile_view, rescale, select_features, table_views)


def test_class_separation_is_the_anova_f_statistic_up_to_its_constant():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 7))
    y = rng.integers(0, 3, size=120)
    X[:, 2] += y  # one informative column
    ours = class_separation(torch.tensor(X)[None], torch.tensor(y)[None])[0].numpy()
    f, _ = f_classif(X, y)
    n, k = len(y), 3
    np.testing.assert_allclose(ours * (n - k) / (k - 1), f, rtol=1e-6)
    assert ours.argmax() == 2


def test_wide_tables_keep_the_separating_columns_in_their_order_and_narrow_ones_stay_whole():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.normal(size=(2, 150, 60)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, size=(2, 150)))
    X[0, :, 42] += 3 * y[0]
    X[0, :, 7] -= 3 * y[0]
    X[1, :, 11] += 3 * y[1]
    Xc, Xq = select_features(X[:, :100], y[:, :100], X[:, 100:], limit=30)
    assert Xc.shape == (2, 100, 30) and Xq.shape == (2, 50, 30)
    # each table keeps its own columns, context and query alike, in the order given
    kept = [[j for j in range(60) if any(torch.equal(X[b, :100, j], Xc[b, :, i]) for i in range(30))]
            for b in range(2)]
    assert {7, 42} <= set(kept[0]) and 11 in kept[1] and len(kept[0]) == len(kept[1]) == 30
    torch.testing.assert_close(Xq[0], X[0, 100:][:, kept[0]])
    narrow_c, narrow_q = select_features(X[:, :100, :30], y[:, :100], X[:, 100:, :30], limit=30)
    assert narrow_c is not None and torch.equal(narrow_c, X[:, :100, :30]) and torch.equal(narrow_q, X[:, 100:, :30])


def test_the_quantile_view_ranks_against_the_context_only():
    rng = np.random.default_rng(2)
    context = np.c_[rng.normal(size=200), rng.integers(0, 2, size=200), rng.exponential(size=200)]
    query = np.c_[rng.normal(size=40) * 3, rng.integers(0, 2, size=40), rng.exponential(size=40)]
    c, q = (t[0].numpy() for t in quantile_view(torch.tensor(context)[None], torch.tensor(query)[None]))
    for j in range(3):
        order = np.argsort(context[:, j], kind="stable")
        assert np.all(np.diff(c[order, j]) >= 0)  # monotone
    # tied values share one value: a 0/1 column takes exactly two
    assert len(np.unique(c[:, 1])) == 2 and set(np.unique(q[:, 1])) <= set(np.unique(c[:, 1]))
    # a skewed column comes out symmetric, and the view lies on [-5.2, 5.2]
    assert abs(np.median(c[:, 2])) < 0.05 and np.abs(np.r_[c, q]).max() <= 5.2
    # beyond the context's range: the far tails
    assert q[:, 0].max() == pytest.approx(5.199, abs=1e-3) and q[:, 0].min() == pytest.approx(-5.199, abs=1e-3)
    # one query's view does not depend on the other queries
    _, alone = quantile_view(torch.tensor(context)[None], torch.tensor(query[:3])[None])
    np.testing.assert_allclose(alone[0].numpy(), q[:3])


def test_the_pca_view_is_the_standardised_context_on_its_principal_axes():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    mixing = rng.normal(size=(6, 6)) * np.array([100.0, 1, 1, 0.01, 1, 1])  # columns on very different scales
    X = rng.normal(size=(80, 6)) @ mixing
    X = np.c_[X, 3 * X[:, 0] - X[:, 1]]  # a dependent column adds no axis
    context, query = X[:50], X[50:]
    c, q = (t[0].double().numpy() for t in pca_view(torch.tensor(context)[None], torch.tensor(query)[None], 30))
    assert c.shape == (50, 6)  # seven columns, rank six
    mean, std = context.mean(axis=0), context.std(axis=0)
    reference = PCA(n_components=6).fit((context - mean) / std)
    expected_c, expected_q = reference.transform((context - mean) / std), reference.transform((query - mean) / std)
    signs = np.sign((c * expected_c).sum(axis=0))  # an axis is defined up to its sign
    np.testing.assert_allclose(c * signs, expected_c, atol=1e-4)
    np.testing.assert_allclose(q * signs, expected_q, atol=1e-4)
    # at most `limit` axes, the leading ones; one query's view does not depend on the others
    c3, q3 = (t[0].double().numpy() for t in pca_view(torch.tensor(context)[None], torch.tensor(query[:4])[None], 3))
    np.testing.assert_allclose(np.abs(c3), np.abs(c[:, :3]), atol=1e-5)
    np.testing.assert_allclose(np.abs(q3), np.abs(q[:4, :3]), atol=1e-5)


def test_episode_logits_average_the_views():
    adapter = NanoAdapter()
    torch.manual_seed(0)
    module = adapter.from_architecture(dict(adapter.sizes["tiny"])).eval()
    rng = np.random.default_rng(3)
    X = torch.tensor(rng.normal(size=(1, 90, 40)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, size=(1, 90)))
    Xc, yc, Xq = X[:, :60], y[:, :60], X[:, 60:]
    task = Task("classification", 3)
    config = NanoConfig(max_input_features=30)
    assert config.preprocessing == [View.standard, View.quantile, View.pca]
    kept_c, kept_q = select_features(Xc, yc, Xq, 30)
    (quant_c, quant_q), (pca_c, pca_q) = quantile_view(kept_c, kept_q), pca_view(Xc, Xq, 30)
    assert pca_c.shape[-1] == 30  # all 40 columns seen, 30 axes kept
    expected = (module(kept_c, yc, kept_q) + module(quant_c, yc, quant_q) + module(pca_c, yc, pca_q)) / 3
    torch.testing.assert_close(adapter.episode_logits(module, Xc, yc, Xq, task, config), expected[..., :3])
    standard_only = NanoConfig(max_input_features=30, preprocessing=[View.standard])
    torch.testing.assert_close(adapter.episode_logits(module, Xc, yc, Xq, task, standard_only),
                               module(kept_c, yc, kept_q)[..., :3])


def test_the_shipped_nano_finds_the_signal_in_a_wide_table():
    # 120 columns, three of them carry the label: keeping the separating ones is what lets nano see it
    rng = np.random.default_rng(4)
    X = pd.DataFrame(rng.normal(size=(900, 120)), columns=[f"x{i}" for i in range(120)])
    score = X["x5"] - X["x60"] + 0.5 * X["x111"]
    y = pd.Series(np.where(score + 0.3 * rng.normal(size=900) > 0, "yes", "no"), name="label")
    auc = {}
    for limit in (30, 100):
        pipe = TabularPipeline(model_name="nano", model_params={"max_input_features": limit}, device="cpu", seed=0)
        proba = pipe.fit(X.iloc[:600], y.iloc[:600]).predict_proba(X.iloc[600:])
        auc[limit] = roc_auc_score(y.iloc[600:] == "yes", proba[:, list(pipe.classes_).index("yes")])
    assert auc[30] > 0.9 and auc[30] > auc[100] + 0.03, auc


def test_calibration_recovers_the_scale_and_offsets_that_flattened_the_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 3))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    flat = rescale(truth, np.array([0.25, 0.5, -1.0]))   # a quarter of the scale, classes 1 and 2 shifted
    params = fit_calibration(flat, labels)
    np.testing.assert_allclose(params, [4.0, -2.0, 4.0], atol=0.4)
    np.testing.assert_allclose(rescale(flat, params).sum(axis=1), 1.0)
    rows = np.arange(len(labels))
    assert -np.log(rescale(flat, params)[rows, labels]).mean() < -np.log(flat[rows, labels]).mean() - 0.2


def test_calibration_trusts_a_few_rows_little_and_many_rows_more():
    # rows that the hedged probabilities all rank right: the more of them, the surer the fit lets it be
    sure = {}
    for n in (4, 40, 400):
        proba, labels = np.tile([[0.6, 0.4], [0.4, 0.6]], (n // 2, 1)), np.tile([0, 1], n // 2)
        sure[n] = rescale(proba, fit_calibration(proba, labels))[0, 0]
    assert 0.6 < sure[4] < 0.7 < sure[40] < 0.8 < 0.9 < sure[400] < 0.97, sure


def test_calibrated_nano_predicts_from_a_context_of_a_few_rows():
    X = pd.DataFrame({"a": [0.1, 0.3, 2.0, 2.2, 4.1, 3.9], "b": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]})
    y = pd.Series(["low", "low", "mid", "mid", "high", "high"], name="level")
    pipe = TabularPipeline(model_name="nano", model_params={"n_estimators": 4, "calibrate": True}, device="cpu",
                           seed=0).fit(X, y)
    proba = pipe.predict_proba(pd.DataFrame({"a": [0.0, 4.0], "b": [1.0, 0.0]}))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # two rows a class: the halves must each hold every class, or the fit flattens it all to a third
    assert list(pipe.classes_[proba.argmax(axis=1)]) == ["low", "high"] and proba.max(axis=1).min() > 0.9, proba


def test_calibrated_nano_keeps_the_binary_ranking_and_lowers_the_log_loss():
    # an imbalanced binary table: zero-shot nano hedges towards the majority; calibration sharpens it
    rng = np.random.default_rng(5)
    X = pd.DataFrame(rng.normal(size=(1200, 6)), columns=[f"x{i}" for i in range(6)])
    y = pd.Series(np.where(X["x0"] + X["x1"] + 0.5 * rng.normal(size=1200) > 1.4, "rich", "poor"), name="income")
    test_y = y.iloc[800:] == "rich"
    result = {}
    for calibrate in (False, True):
        pipe = TabularPipeline(model_name="nano", model_params={"n_estimators": 4, "calibrate": calibrate},
                               device="cpu", seed=0).fit(X.iloc[:800], y.iloc[:800])
        proba = pipe.predict_proba(X.iloc[800:])[:, list(pipe.classes_).index("rich")]
        result[calibrate] = (roc_auc_score(test_y, proba), pipe.evaluate(X.iloc[800:], y.iloc[800:]))
    (auc_raw, raw), (auc_cal, cal) = result[False], result[True]
    assert auc_cal == pytest.approx(auc_raw, abs=1e-12)      # a monotone map of a binary score
    assert cal["log_loss"] < raw["log_loss"] - 0.01, (raw, cal)
    assert cal["balanced_accuracy"] > raw["balanced_accuracy"] + 0.02, (raw, cal)   # the minority is found more


def test_nano_config_names_the_key_at_fault():
    config = from_dict(NanoConfig, {"preprocessing": ["quantile"]}, "model")
    assert config.preprocessing == [View.quantile]
    with pytest.raises(TabTuneError, match=r"model\.preprocessing: 'foo' is not one of: standard, quantile, pca"):
        from_dict(NanoConfig, {"preprocessing": ["foo"]}, "model")
    with pytest.raises(TabTuneError, match="model.max_input_features: must be at least 1"):
        from_dict(NanoConfig, {"max_input_features": 0}, "model")
    with pytest.raises(TabTuneError, match="model.preprocessing: name at least one view"):
        from_dict(NanoConfig, {"preprocessing": []}, "model")


def test_nano_takes_few_level_categories_one_hot_and_other_models_codes():
    # the label hangs on four of twelve unordered levels
    rng = np.random.default_rng(5)
    n = 900
    X = pd.DataFrame({"shop": rng.choice(list("abcdefghijkl"), size=n), "noise": rng.normal(size=n)})
    y = pd.Series(np.where(X["shop"].isin(list("behk")) ^ (rng.random(n) < 0.1), "yes", "no"), name="label")
    kinds = {}
    for levels in (16, 0):
        pipe = TabularPipeline(model_name="nano", model_params={"one_hot_max_levels": levels}, device="cpu", seed=0)
        proba = pipe.fit(X.iloc[:600], y.iloc[:600]).predict_proba(X.iloc[600:])
        kinds[levels] = [s["kind"] for s in pipe.preprocessor_.state["columns"]]
        if levels:  # twelve 0/1 columns and the noise: the shipped nano finds the four levels (0.9 is the ceiling)
            assert len(pipe.preprocessor_.feature_names) == 13
            assert roc_auc_score(y.iloc[600:] == "yes", proba[:, list(pipe.classes_).index("yes")]) > 0.85
    assert kinds == {16: ["one-hot", "numeric"], 0: ["categorical", "numeric"]}
    tabicl = TabularPipeline(model_name="tabicl", model_params={"pretrained": False, "n_estimators": 1}, device="cpu")
    assert tabicl.fit(X.iloc[:100], y.iloc[:100]).preprocessor_.state["columns"][0]["kind"] == "categorical"


# ---- the context encoded once ---------------------------------------------------------------------------

def joint_forward(network, X_context, y_context, X_query):
    """nano's forward as one pass over context and query rows together (tabtune 0.2's): the reference."""
    Xc, Xq = normalise(X_context, X_query, None, network.max_features)
    h = torch.cat([network.encoder(Xc) + network.label_embedding(y_context.long()), network.encoder(Xq)], dim=1)
    for block in network.blocks:
        h = block(h, X_context.shape[1])
    return network.decoder(network.norm(h[:, X_context.shape[1]:]))


@torch.no_grad()
def reference_predict(network, X_context, y_context, X_query, task, config):
    """nano's predict before the context cache: every member's context and the calibration computed anew
    (on a table whose every class has rows in both halves of the context)."""
    def forward(Xc, yc, Xq):
        logits = joint_forward(network, torch.as_tensor(Xc)[None], torch.as_tensor(yc)[None],
                               torch.as_tensor(Xq)[None])[0, :, : task.n_classes].float()
        return torch.softmax(logits / config.softmax_temperature, dim=-1).numpy()

    def ensemble(Xc, yc, Xq, n_estimators):
        total = 0.0
        views = table_views(config.preprocessing, torch.as_tensor(Xc)[None], torch.as_tensor(yc)[None],
                            torch.as_tensor(Xq)[None], min(config.max_input_features, network.max_features))
        for i, (Xc_view, Xq_view) in enumerate(views):
            members = len(range(i, n_estimators, len(config.preprocessing)))
            if members:
                total = total + members * ensemble_predict(Xc_view[0].numpy(), yc, Xq_view[0].numpy(), task,
                                                           members, forward, chunk=4096)
        return total / n_estimators

    proba = ensemble(X_context, y_context, X_query, config.n_estimators)
    if not config.calibrate:
        return proba
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(np.flatnonzero(y_context == c)) for c in np.unique(y_context)])
    halves = order[0::2], order[1::2]
    cross = np.empty((len(y_context), task.n_classes))
    for given, asked in (halves, halves[::-1]):
        cross[asked] = ensemble(X_context[given], y_context[given], X_context[asked], min(config.n_estimators, 16))
    return rescale(proba, fit_calibration(cross, y_context))


def shipped_nano():
    adapter = NanoAdapter()
    module, _ = adapter.build(NanoConfig(), Task("classification", 3))
    return adapter, module.eval()


def small_table(n_context=160, n_query=24, n_features=7, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_context + n_query, n_features)).astype(np.float32)
    y = np.digitize(X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.normal(size=len(X)), [-0.5, 0.5])[:n_context] % n_classes
    return X[:n_context], y, X[n_context:]


def test_the_forward_as_context_pass_then_query_pass_equals_one_joint_pass():
    _, network = shipped_nano()
    Xc, yc, Xq = (torch.as_tensor(a)[None] for a in small_table())
    with torch.no_grad():
        split = network(Xc, yc, Xq)
        torch.testing.assert_close(split, joint_forward(network, Xc, yc, Xq), atol=1e-5, rtol=1e-5)
        encoded = network.encode_context(Xc, yc)
        # the context's keys and values serve any queries: a query's logits do not depend on the others
        torch.testing.assert_close(network.query_logits(encoded, Xq[:, 5:9]), split[:, 5:9], atol=1e-6, rtol=1e-6)
        assert len(encoded.keys_values) == len(network.blocks)


@pytest.mark.parametrize("calibrate, n_features", [(True, 7), (False, 40)])
def test_predict_equals_the_recipe_computed_anew(calibrate, n_features):
    adapter, network = shipped_nano()
    Xc, yc, Xq = small_table(n_features=n_features)
    task, config = Task("classification", 3), NanoConfig(n_estimators=8, calibrate=calibrate)
    expected = reference_predict(network, Xc, yc, Xq, task, config)
    np.testing.assert_allclose(adapter.predict(network, Xc, yc, Xq, task, config, torch.device("cpu")), expected,
                               atol=1e-6, rtol=0)


def test_the_encoded_context_is_reused_until_the_context_weights_or_settings_change():
    from tabtune_cli.config import LoraSettings
    from tabtune_cli.tuning import lora

    adapter, network = shipped_nano()
    Xc, yc, Xq = small_table()
    task, config, cpu = Task("classification", 3), NanoConfig(n_estimators=6), torch.device("cpu")
    cache = adapter.context_cache
    uncached = NanoAdapter()
    uncached.cache_context = False
    first = adapter.predict(network, Xc, yc, Xq, task, config, cpu)
    np.testing.assert_array_equal(first, uncached.predict(network, Xc, yc, Xq, task, config, cpu))
    assert (cache.hits, cache.misses) == (0, 1)
    for start in range(0, len(Xq), 8):  # small repeated predicts: the same answers, bit for bit
        rows = Xq[start:start + 8]
        again = adapter.predict(network, Xc, yc, rows, task, config, cpu)
        np.testing.assert_array_equal(again, uncached.predict(network, Xc, yc, rows, task, config, cpu))
        np.testing.assert_allclose(again, first[start:start + 8], atol=1e-7, rtol=0)
    assert (cache.hits, cache.misses) == (3, 1)

    def misses_after(*args, **settings):
        before = cache.misses
        out = adapter.predict(*args[:3], Xq, task, NanoConfig(n_estimators=6, **settings), cpu)
        assert cache.misses == before + 1
        return out

    moved = misses_after(network, Xc[1:], yc[1:])                           # another context
    assert np.abs(moved - first).max() > 0
    misses_after(network, Xc, yc, softmax_temperature=0.5)                  # a setting that changes the answer
    assert len(cache.entries) == 1                                          # one context's keys and values kept
    wrapped = lora.wrap(adapter, network, LoraSettings(r=2))
    base = misses_after(wrapped, Xc, yc)                                    # the peft wrapper is another module
    np.testing.assert_allclose(base, first, atol=1e-6, rtol=0)              # whose adapters start at zero
    hits = cache.hits
    np.testing.assert_array_equal(adapter.predict(wrapped, Xc, yc, Xq, task, config, cpu), base)
    assert cache.hits == hits + 1                                           # peft's forward leaves it valid
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)                                         # a fine-tuning step
    tuned = misses_after(wrapped, Xc, yc)
    assert np.abs(tuned - base).max() > 1e-3
    np.testing.assert_array_equal(tuned, uncached.predict(wrapped, Xc, yc, Xq, task, NanoConfig(n_estimators=6), cpu))


def test_a_fitted_pipeline_encodes_its_context_once():
    X = pd.DataFrame(np.random.default_rng(6).normal(size=(300, 5)), columns=list("abcde"))
    y = pd.Series(np.where(X["a"] - X["b"] > 0, "up", "down"), name="move")
    pipe = TabularPipeline(model_name="nano", model_params={"n_estimators": 4}, device="cpu", seed=0)
    pipe.fit(X.iloc[:200], y.iloc[:200])
    proba = pipe.predict_proba(X.iloc[200:])
    np.testing.assert_allclose(pipe.predict_proba(X.iloc[200:210]), proba[:10], atol=1e-7, rtol=0)
    pipe.evaluate(X.iloc[210:], y.iloc[210:])
    cache = pipe.adapter_.context_cache
    assert cache.misses == 1 and cache.hits == 2
