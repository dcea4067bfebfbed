"""TabPFN: official checkpoints load and predict like the tabpfn package's own model; regression; errors; CLI.

Prediction equals the package's own estimator (``TabPFNClassifier`` / ``TabPFNRegressor`` on the same
checkpoint file, same settings) within 1e-4, fine-tuned and LoRA weights included, and the fitted context
is reused until the weights, the context or the settings change.

The shared promises (episodes, live LoRA, strategies, reload) are in test_adapters.py. Checkpoints are
written here, with random weights, in the layout of the released TabPFN v2 files (the older multi-file
architecture's key names, which the package renames on load), because downloads are not possible in tests.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tabpfn.architectures import tabpfn_v2
from tabpfn.architectures.shared.bar_distribution import FullSupportBarDistribution
from tabpfn.constants import ModelVersion
from tabpfn.inference_config import InferenceConfig
from tabpfn.model_loading import load_model

from tabtune_cli import TabularPipeline
from tabtune_cli.config import LoraSettings
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.models.tabpfn import TabPFNConfig
from tabtune_cli.tuning import lora

from conftest import SEED, TUNE_PARAMS, breast_cancer, check_run, make_table
from test_cli import run_dirs, tabtune

EMSIZE, NHEAD, NLAYERS, BUCKETS = 16, 2, 2, 24


def released_v2_checkpoint(path, *, regression=False, seed=0):
    """Write a random-weight TabPFN v2 checkpoint in the released files' format; return the package's model."""
    config = tabpfn_v2.TabPFNV2Config(emsize=EMSIZE, nhead=NHEAD, nlayers=NLAYERS, features_per_group=2,
                                      max_num_classes=0 if regression else 10,
                                      num_buckets=BUCKETS if regression else -1)
    torch.manual_seed(seed)
    model = tabpfn_v2.get_architecture(config)
    with torch.no_grad():  # the zero-initialised output projections would hide wrong loading
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    state = model.state_dict()
    old = {}  # the inverse of tabpfn_v2._replace_keys_from_base_architecture
    head = EMSIZE // NHEAD
    for key, value in state.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            layer = f"transformer_encoder.layers.{i}"
            attn = {"per_sample_attention_between_features": "self_attn_between_features",
                    "per_column_attention_between_cells": "self_attn_between_items"}
            part = rest.split(".")[0]
            if part in attn:
                if "q_projection" in rest:
                    qkv = [state[f"blocks.{i}.{part}.{p}_projection.weight"] for p in "qkv"]
                    old[f"{layer}.{attn[part]}._w_qkv"] = torch.stack([w.unflatten(0, (NHEAD, head)) for w in qkv])
                elif "out_projection" in rest:
                    old[f"{layer}.{attn[part]}._w_out"] = value.T.unflatten(0, (NHEAD, head)).contiguous()
            elif rest.startswith("mlp."):
                old[f"{layer}.mlp.linear{1 if rest.startswith('mlp.0') else 2}.weight"] = value
        elif key.startswith("feature_group_embedder."):
            old["encoder.5.layer.weight"] = value
        elif key.startswith("target_embedder."):
            old[key.replace("target_embedder", f"y_encoder.{1 if regression else 2}.layer")] = value
        elif key.startswith("output_projection."):
            old[key.replace("output_projection", "decoder_dict.standard")] = value
        else:
            old[key] = value
    assert any(k.startswith("transformer_encoder.") for k in old) and not any(k.startswith("blocks.") for k in old)
    if regression:
        levels = torch.linspace(0.001, 0.999, BUCKETS + 1, dtype=torch.float64)
        borders = torch.distributions.Normal(0.0, 1.0).icdf(levels).float()
        # as tabpfn's save_tabpfn_model writes it: the bar distribution's state under "criterion."
        old.update({f"criterion.{k}": v for k, v in FullSupportBarDistribution(borders).state_dict().items()})
    # released v2 files: no architecture_name; the config carries extra keys the architecture ignores
    config_dict = {**dataclasses.asdict(config), "emsize": EMSIZE, "dropout": 0.0, "recompute_attn": False}
    torch.save({"state_dict": old, "config": config_dict}, path)
    estimator = "regressor" if regression else "classifier"
    package_model, criterion, _, _ = load_model(path=path, estimator_type=estimator)
    return package_model, criterion


def episode(n_context=40, n_query=12, n_features=5, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    Xc, Xq = torch.randn(1, n_context, n_features, generator=g), torch.randn(1, n_query, n_features, generator=g)
    yc = torch.randn(1, n_context, generator=g) if regression else torch.arange(n_context)[None] % 3
    return Xc, yc, Xq


def package_estimator(path, regression, n_estimators=4, softmax_temperature=0.9, **kwargs):
    """The package's own estimator on the checkpoint file, at tabtune's settings (random_state 0, CPU)."""
    from tabpfn import TabPFNClassifier, TabPFNRegressor

    common = dict(model_path=str(path), n_estimators=n_estimators, random_state=0, device="cpu",
                  ignore_pretraining_limits=True, **kwargs)
    if regression:
        return TabPFNRegressor(**common)
    return TabPFNClassifier(softmax_temperature=softmax_temperature, **common)


def package_outputs(model, Xc, yc, Xq):
    with torch.no_grad():
        return model(torch.cat([Xc, Xq], 1).transpose(0, 1), yc.transpose(0, 1).float()).transpose(0, 1)[0]


def test_released_v2_checkpoint_loads_and_predicts_like_the_package(tmp_path):
    path = tmp_path / "tabpfn-v2-classifier-finetuned-zk73skhh.ckpt"
    package_model, _ = released_v2_checkpoint(path)
    adapter, task = get_adapter("tabpfn"), Task("classification", 3)
    module, architecture = adapter.build(TabPFNConfig(checkpoint=str(path), pretrained=True), task)
    for key, value in package_model.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    json.dumps(architecture)  # a run saves it as JSON
    Xc, yc, Xq = episode()
    expected = package_outputs(package_model, Xc, yc, Xq)
    module.eval()
    torch.testing.assert_close(adapter._forward(module, Xc, yc, Xq)[0][:, :3], expected[:, :3])
    # prediction is the package's estimator on the same file (its per-member preprocessing included)
    config = TabPFNConfig(checkpoint=str(path), n_estimators=1, softmax_temperature=0.9)
    proba = adapter.predict(module, Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), task, config, torch.device("cpu"))
    theirs = package_estimator(path, False, n_estimators=1).fit(Xc[0].numpy(), yc[0].numpy())
    np.testing.assert_allclose(proba, theirs.predict_proba(Xq[0].numpy()), atol=1e-5)
    # the weights mattered: another checkpoint predicts otherwise
    other, _ = released_v2_checkpoint(tmp_path / "other.ckpt", seed=1)
    assert (package_outputs(other, Xc, yc, Xq)[:, :3] - expected[:, :3]).abs().max() > 1e-3


def test_pipeline_takes_the_checkpoint_through_model_params(tmp_path, split):
    path = tmp_path / "v2.ckpt"
    package_model, _ = released_v2_checkpoint(path)
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_name="tabpfn", tuning_strategy="inference", tuning_params=TUNE_PARAMS["inference"],
                           model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 1},
                           device="cpu", seed=SEED).fit(X_train, y_train)
    for key, value in package_model.state_dict().items():
        assert torch.equal(pipe.module_.state_dict()[key], value), key
    proba = pipe.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    pipe.save(tmp_path / "saved")
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path / "saved").predict_proba(X_test), proba)


def test_regression_checkpoint_predicts_the_bar_distribution_mean_and_trains_on_its_loss(tmp_path):
    path = tmp_path / "tabpfn-v2-regressor.ckpt"
    package_model, criterion = released_v2_checkpoint(path, regression=True)
    adapter, task = get_adapter("tabpfn"), Task("regression")
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    torch.testing.assert_close(module.regression_borders, criterion.borders, rtol=0, atol=0)
    Xc, yc, Xq = episode(regression=True)
    expected = criterion.mean(package_outputs(package_model, Xc, yc, Xq))
    torch.testing.assert_close(criterion.mean(adapter._forward(module, Xc, yc, Xq)[0]), expected)
    # prediction: the package's regressor on the same file (its target and feature transforms included)
    config = TabPFNConfig(checkpoint=str(path), n_estimators=1)
    pred = adapter.predict(module, Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), task, config, torch.device("cpu"))
    theirs = package_estimator(path, True, n_estimators=1).fit(Xc[0].numpy(), yc[0].numpy())
    np.testing.assert_allclose(pred, theirs.predict(Xq[0].numpy()), rtol=1e-4, atol=1e-4)
    # training: the estimator's bar distribution's negative log density (through its members:
    # test_the_regression_training_forward_is_the_estimators_distribution), and a step lowers it
    module.train()
    yq = torch.randn(1, 12, generator=torch.Generator().manual_seed(3))
    optimiser = torch.optim.SGD(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = adapter.episode_loss(adapter.episode_logits(module, Xc, yc, Xq, task), yq, task)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_regression_peft_trains_adapters_only_and_reloads(tmp_path):
    path = tmp_path / "regressor.ckpt"
    released_v2_checkpoint(path, regression=True)
    X, _ = make_table(n=200)
    y = X["f0"] * 2.0 + X["f1"]
    X_train, y_train, X_test = X.iloc[:160], y.iloc[:160], X.iloc[160:]
    pipe = TabularPipeline(model_name="tabpfn", task_type="regression", tuning_strategy="peft",
                           tuning_params={**TUNE_PARAMS["peft"], "epochs": 2},
                           model_params={"checkpoint": str(path), "n_estimators": 1}, device="cpu",
                           seed=SEED).fit(X_train, y_train)
    start = torch.load(path, weights_only=True)["state_dict"]
    base = pipe.module_.get_base_model()
    torch.testing.assert_close(base.regression_borders, start["criterion.borders"], rtol=0, atol=0)
    assert torch.equal(base.target_embedder.base_layer.weight, start["y_encoder.1.layer.weight"])
    # it trained on the bar distribution's loss (the engine keeps the start weights if validation did not improve)
    result = pipe.train_result_
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.steps > 0 and losses and np.isfinite(losses).all() and np.isfinite(result.val_before)
    pred = pipe.predict(X_test)
    assert np.isfinite(pred).all() and pred.std() > 0
    pipe.save(tmp_path)
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path).predict(X_test), pred)


LATER = {  # tiny configs of later architectures, saved as tabpfn's save_tabpfn_model writes them
    "v2.6": ("tabpfn_v2_6", dict(emsize=16, nlayers=2, nhead=2, features_per_group=3, num_thinking_rows=4,
                                 encoder_mlp_hidden_dim=16)),
    "v3": ("tabpfn_v3", dict(embed_dim=16, dist_embed_num_blocks=1, dist_embed_num_heads=2,
                             dist_embed_num_inducing_points=8, feat_agg_num_blocks=1, feat_agg_num_heads=2,
                             feat_agg_num_cls_tokens=2, nlayers=2, icl_num_heads=2, decoder_head_dim=8,
                             decoder_num_heads=2, softmax_scaling_mlp_hidden_dim=8)),
}


@pytest.mark.parametrize("version", sorted(LATER))
def test_later_versions_load_predict_like_the_package_and_take_live_lora(version, tmp_path):
    from tabpfn.architectures import ARCHITECTURES

    architecture_name, sizes = LATER[version]
    architecture = ARCHITECTURES[architecture_name]
    config, _ = architecture.parse_config({**sizes, "max_num_classes": 10})
    torch.manual_seed(0)
    model = architecture.get_architecture(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path / f"{version}.ckpt"
    # from v2.6 a checkpoint carries its inference config (here v2.5's, for a small test)
    inference_config = dataclasses.asdict(InferenceConfig.get_default("multiclass", ModelVersion.V2_5))
    torch.save({"state_dict": model.state_dict(), "config": dataclasses.asdict(config),
                "architecture_name": architecture_name, "inference_config": inference_config}, path)
    package_model, *_ = load_model(path=path, estimator_type="classifier")
    adapter, task = get_adapter("tabpfn"), Task("classification", 3)
    with pytest.raises(TabTuneError, match=f"TabPFN {version} checkpoint, but model.version=v2"):
        adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path), version=version), task)
    Xc, yc, Xq = episode()
    module.eval()
    expected = package_outputs(package_model, Xc, yc, Xq)[:, :3]
    torch.testing.assert_close(adapter._forward(module, Xc, yc, Xq)[0][:, :3], expected)
    # prediction: the package's estimator on the file, with the file's inference config
    Xc_, yc_, Xq_, _ = recipe_episode()
    config = TabPFNConfig(checkpoint=str(path), version=version, n_estimators=2)
    proba = adapter.predict(module, Xc_, yc_, Xq_, Task("classification", 4), config, torch.device("cpu"))
    theirs = package_estimator(path, False, 2).fit(Xc_, yc_).predict_proba(Xq_)
    np.testing.assert_allclose(proba, theirs, rtol=0, atol=1e-4)
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert len(lora_b) >= 8
    for p in lora_b:
        with torch.no_grad():
            p.normal_(0.0, 0.5)
        moved = (adapter.episode_logits(wrapped, Xc, yc, Xq, task)[0] - expected).abs().max()
        with torch.no_grad():
            p.zero_()
        assert moved > 1e-6


def test_bad_and_missing_checkpoints_name_the_file(tmp_path):
    adapter, task = get_adapter("tabpfn"), Task("classification", 2)
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(TabTuneError, match="nowhere.ckpt"):
        adapter.build(TabPFNConfig(checkpoint=str(missing)), task)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TabTuneError, match="garbage.ckpt.*not a TabPFN checkpoint"):
        adapter.build(TabPFNConfig(checkpoint=str(garbage)), task)
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"weights": torch.zeros(2)}, wrong)
    with pytest.raises(TabTuneError, match="wrong.ckpt.*'config' and 'state_dict'"):
        adapter.build(TabPFNConfig(checkpoint=str(wrong)), task)
    regressor = tmp_path / "regressor.ckpt"
    released_v2_checkpoint(regressor, regression=True)
    with pytest.raises(TabTuneError, match="regressor.ckpt.*no classification head"):
        adapter.build(TabPFNConfig(checkpoint=str(regressor)), task)
    with pytest.raises(TabTuneError, match="regressor.ckpt.*TabPFN v2 checkpoint, but model.version=v2.5"):
        adapter.build(TabPFNConfig(checkpoint=str(regressor), version="v2.5"), Task("regression"))


def test_missing_official_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter, task = get_adapter("tabpfn"), Task("classification", 2)
    with pytest.raises(TabTuneError, match="tabpfn-v2-classifier-finetuned-zk73skhh.ckpt.*model.checkpoint"):
        adapter.build(TabPFNConfig(), task)
    with pytest.raises(TabTuneError) as gated:
        adapter.build(TabPFNConfig(version="v2.6"), task)
    message = str(gated.value)
    assert "tabpfn-v2.6-classifier-v2.6_default.ckpt" in message and "gated" in message
    assert "huggingface.co/Prior-Labs/tabpfn_2_6" in message and "model.checkpoint=" in message
    with pytest.raises(TabTuneError, match="model.version: unknown TabPFN version 'v9'"):
        adapter.build(TabPFNConfig(version="v9"), task)


def test_cli_peft_smoke_run_end_to_end(tmp_path):
    result = tabtune("train", "debug=smoke", "model=tabpfn", "strategy=peft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path / "runs")
    files = {p.name for p in run_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    # the saved adapters sit on the real attention projections and block MLPs
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in TabularPipeline.load(run_dir).module_.named_parameters()
                   if ".lora_A" in n}
    for block in range(2):
        for attention in ("per_sample_attention_between_features", "per_column_attention_between_cells"):
            for projection in ("q_projection", "k_projection", "v_projection", "out_projection"):
                assert f"base_model.model.blocks.{block}.{attention}.{projection}" in lora_layers
        assert {f"base_model.model.blocks.{block}.mlp.0", f"base_model.model.blocks.{block}.mlp.2"} <= lora_layers
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    check_run(run_dir, "peft", *breast_cancer())  # its metrics are its predictions', which it reproduces


# ---- inference: the package's own recipe, the context encoded once ---------------------------------------

def recipe_episode(n_context=150, n_query=40, regression=False, seed=0):
    """Numpy context/query rows like tabtune's matrix: standardised numbers, a 3-level code column (the
    package's modality detection reads it as categorical past 100 rows), a 0/1 indicator."""
    rng = np.random.default_rng(seed)
    n = n_context + n_query
    X = np.column_stack([rng.normal(size=(n, 4)), (rng.integers(0, 3, n) - 1.0) / 0.8, rng.integers(0, 2, n)])
    X = X.astype(np.float32)
    if regression:
        y = (X[:, 0] + 0.5 * X[:, 4] + 0.1 * rng.normal(size=n)).astype(np.float32)
    else:
        y = np.digitize(X[:, 0] + 0.5 * X[:, 4], [-0.7, 0.0, 0.7])
    return X[:n_context], y[:n_context], X[n_context:], y[n_context:]


@pytest.mark.parametrize("regression,n_estimators,temperature",
                         [(False, 1, 0.9), (False, 3, 0.7), (True, 1, 0.9), (True, 3, 0.9)])
def test_predict_equals_the_package_estimator_on_the_same_checkpoint(tmp_path, regression, n_estimators,
                                                                     temperature):
    path = tmp_path / ("tabpfn-v2-regressor.ckpt" if regression else "tabpfn-v2-classifier.ckpt")
    released_v2_checkpoint(path, regression=regression)
    adapter = get_adapter("tabpfn")
    task = Task("regression") if regression else Task("classification", 4)
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    Xc, yc, Xq, _ = recipe_episode(regression=regression)
    config = TabPFNConfig(checkpoint=str(path), n_estimators=n_estimators, softmax_temperature=temperature)
    ours = adapter.predict(module, Xc, yc, Xq, task, config, torch.device("cpu"))
    estimator = package_estimator(path, regression, n_estimators, temperature).fit(Xc, yc)
    theirs = estimator.predict(Xq) if regression else estimator.predict_proba(Xq)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # the recipe did something: the raw forward alone (no per-member preprocessing) answers otherwise
    raw = adapter.episode_logits(module, *(torch.as_tensor(a)[None] for a in (Xc, yc, Xq)), task)[0]
    raw = bar_mean(module, raw) if regression else torch.softmax(raw / temperature, -1).detach().numpy()
    assert np.abs(raw - theirs).max() > 1e-3


def bar_mean(module, outputs):
    from tabtune_cli.models.tabpfn import bar_distribution

    return bar_distribution(module).mean(outputs).detach().numpy()


def test_a_class_the_context_lacks_gets_no_probability(tmp_path):
    path = tmp_path / "v2.ckpt"
    released_v2_checkpoint(path)
    adapter, task = get_adapter("tabpfn"), Task("classification", 5)
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    Xc, yc, Xq, _ = recipe_episode()  # labels 0..3: class 4 is absent
    config = TabPFNConfig(checkpoint=str(path), n_estimators=2)
    proba = adapter.predict(module, Xc, yc, Xq, task, config, torch.device("cpu"))
    theirs = package_estimator(path, False, 2).fit(Xc, yc).predict_proba(Xq)
    assert proba.shape == (len(Xq), 5) and (proba[:, 4] == 0).all()
    np.testing.assert_allclose(proba[:, :4], theirs, atol=1e-4)
    one_class = adapter.predict(module, Xc, np.full(len(Xc), 2), Xq, task, config, torch.device("cpu"))
    np.testing.assert_array_equal(one_class, np.eye(5)[[2] * len(Xq)])


@pytest.mark.parametrize("regression", [False, True])
def test_the_pipeline_predicts_what_the_estimator_predicts_on_tabtunes_matrix(tmp_path, split, regression):
    """The boundary: tabtune's shared preprocessor makes the matrix (the colour column becomes a code), then
    the package's recipe runs on it; so the pipeline equals the estimator fitted on that matrix."""
    path = tmp_path / "tabpfn-v2.ckpt"
    released_v2_checkpoint(path, regression=regression)
    X_train, y_train, X_test, _ = split
    if regression:
        y_train = X_train["f0"] * 3.0 + 10.0 + X_train["f1"]
    pipe = TabularPipeline(model_name="tabpfn", task_type="regression" if regression else "classification",
                           tuning_strategy="inference", tuning_params=TUNE_PARAMS["inference"],
                           model_params={"checkpoint": str(path), "n_estimators": 3}, device="cpu",
                           seed=SEED).fit(X_train, y_train)
    M_train, M_test = pipe.preprocessor_.transform(X_train), pipe.preprocessor_.transform(X_test)
    if regression:
        theirs = package_estimator(path, True, 3).fit(M_train, y_train.to_numpy(np.float32)).predict(M_test)
        # tabtune standardises the target, the estimator normalises it again: equal up to float rounding
        np.testing.assert_allclose(pipe.predict(X_test), theirs, rtol=0, atol=1e-4 * float(y_train.std()))
    else:
        codes = pipe.label_encoder_.transform(y_train)
        theirs = package_estimator(path, False, 3).fit(M_train, codes).predict_proba(M_test)
        np.testing.assert_allclose(pipe.predict_proba(X_test), theirs, rtol=0, atol=1e-4)


def noisy_tiny(adapter, task):
    """A tiny random-weight TabPFN with noise in every weight (its zero-initialised projections would hide
    mistakes): ``(module, architecture)``."""
    torch.manual_seed(0)
    module, architecture = adapter.build(TabPFNConfig(pretrained=False, size="tiny"), task)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module, architecture


def test_the_context_is_encoded_once_and_any_change_rebuilds_it():
    adapter, task = get_adapter("tabpfn"), Task("classification", 4)
    module, _ = noisy_tiny(adapter, task)
    Xc, yc, Xq, _ = recipe_episode()
    config, cpu = TabPFNConfig(pretrained=False, n_estimators=2, kv_cache=True), torch.device("cpu")
    cache = adapter.context_cache

    def predict(X=Xq, y=yc, cfg=config):
        return adapter.predict(module, Xc, y, X, task, cfg, cpu)

    first = predict()
    assert (cache.misses, cache.hits) == (1, 0)
    np.testing.assert_array_equal(predict(), first)
    part = predict(Xq[:7])
    assert (cache.misses, cache.hits) == (1, 2)
    # cached == uncached: a fresh estimator per call (no cache kept), and the package's uncached fit mode
    uncached = get_adapter("tabpfn")
    uncached.context_cache.size = 0
    np.testing.assert_array_equal(uncached.predict(module, Xc, yc, Xq[:7], task, config, cpu), part)
    plain = uncached.fitted_estimator(module, Xc, yc, task, config, cpu, fit_mode="fit_preprocessors")
    np.testing.assert_allclose(plain.predict_proba(Xq), first, rtol=0, atol=1e-5)
    assert uncached.context_cache.entries == {}
    # another context, other settings, other weights: each rebuilds, and the answers follow
    relabelled = predict(y=(yc + 1) % 4)
    assert cache.misses == 2 and np.abs(relabelled - first).max() > 1e-3
    predict(cfg=TabPFNConfig(pretrained=False, n_estimators=3, kv_cache=True))
    assert cache.misses == 3
    with torch.no_grad():
        module.blocks[0].mlp[0].weight.mul_(1.5)  # in place, as an optimizer step changes weights
    moved = predict()
    assert cache.misses == 4 and np.abs(moved - first).max() > 1e-4
    np.testing.assert_array_equal(predict(), moved)
    assert cache.misses == 4 and len(cache.entries) <= cache.size


def test_like_the_package_the_default_fits_without_a_key_value_cache():
    """The package's fit_mode="fit_preprocessors" unless model.kv_cache=true ("fit_with_cache")."""
    adapter, task = get_adapter("tabpfn"), Task("classification", 4)
    module, _ = noisy_tiny(adapter, task)
    Xc, yc, Xq, _ = recipe_episode()
    cpu = torch.device("cpu")
    modes = {}
    for kv_cache in (False, True):
        out = adapter.predict(module, Xc, yc, Xq, task, TabPFNConfig(pretrained=False, n_estimators=2,
                                                                     kv_cache=kv_cache), cpu)
        modes[list(adapter.context_cache.entries.values())[-1].fit_mode] = out
    assert set(modes) == {"fit_preprocessors", "fit_with_cache"}
    np.testing.assert_allclose(modes["fit_with_cache"], modes["fit_preprocessors"], rtol=0, atol=1e-5)


def test_lora_and_fine_tuned_weights_get_the_package_recipe(tmp_path, split):
    """Predicting through LoRA adapters equals the package's estimator on the merged weights' checkpoint; a
    LoRA update invalidates the cache; a base-ft pipeline predicts (and validated) with the same recipe."""
    import copy

    adapter, task = get_adapter("tabpfn"), Task("classification", 4)
    module, architecture = noisy_tiny(adapter, task)
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0.0, 0.3)
    Xc, yc, Xq, _ = recipe_episode()
    config, cpu = TabPFNConfig(pretrained=False, n_estimators=2), torch.device("cpu")
    ours = adapter.predict(wrapped, Xc, yc, Xq, task, config, cpu)
    merged, _ = lora.fold(copy.deepcopy(wrapped))
    path = adapter.write_checkpoint(merged, architecture, task, tmp_path / "merged")
    theirs = package_estimator(path, False, 2).fit(Xc, yc).predict_proba(Xq)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    with torch.no_grad():
        lora_b[0].add_(0.5)
    assert np.abs(adapter.predict(wrapped, Xc, yc, Xq, task, config, cpu) - ours).max() > 1e-5
    assert adapter.context_cache.misses == 2

    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_name="tabpfn", tuning_strategy="base-ft",
                           tuning_params={**TUNE_PARAMS["base-ft"], "epochs": 2},
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 2}, device="cpu",
                           seed=SEED).fit(X_train, y_train)
    assert pipe.adapter_.context_cache.misses >= 2  # validation before and after training went through it
    tuned = adapter.write_checkpoint(pipe.module_, pipe.architecture_, pipe.task_, tmp_path / "tuned")
    estimator = package_estimator(tuned, False, 2).fit(pipe.context_X_, pipe.context_y_)
    theirs = estimator.predict_proba(pipe.preprocessor_.transform(X_test))
    np.testing.assert_allclose(pipe.predict_proba(X_test), theirs, rtol=0, atol=1e-4)


def test_on_a_bf16_cpu_tabtune_takes_the_packages_autocast_too(tmp_path, monkeypatch):
    """Where the CPU has native bf16 (AVX512-BF16, AMX), the package's default precision is bf16 autocast; tabtune
    gives the estimator the package's default, so it predicts in bf16 there as the package does (simulated here:
    this CPU has none, and the suite otherwise computes in float32, see conftest)."""
    import tabpfn.utils

    monkeypatch.setattr(tabpfn.utils, "_cpu_supports_fast_bf16", lambda: True)
    path = tmp_path / "tabpfn-v2-classifier.ckpt"
    released_v2_checkpoint(path)
    adapter, task = get_adapter("tabpfn"), Task("classification", 4)
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    Xc, yc, Xq, _ = recipe_episode()
    config = TabPFNConfig(checkpoint=str(path), n_estimators=2)
    ours = adapter.fitted_estimator(module, Xc, yc, task, config, torch.device("cpu"))
    theirs = package_estimator(path, False, 2).fit(Xc, yc)
    assert ours.use_autocast_ is True and theirs.use_autocast_ is True
    bf16 = ours.predict_proba(Xq)
    monkeypatch.setattr(tabpfn.utils, "_cpu_supports_fast_bf16", lambda: False)
    float32 = adapter.fitted_estimator(module, Xc, yc, task, config, torch.device("cpu"))
    assert float32.use_autocast_ is False
    # bf16 moves the answers by far more than the 1e-4 the float32 equality tests hold: why they pin float32
    assert np.abs(float32.predict_proba(Xq) - bf16).max() > 1e-4


def test_a_class_the_episode_context_lacks_trains_against_the_right_columns():
    """The estimator numbers the classes its context holds (0, 2 -> columns 0, 1): the training logits are
    mapped back to the task's classes, and a query of a class the context lacks is left out of the loss."""
    adapter, task = get_adapter("tabpfn"), Task("classification", 3)
    module, _ = noisy_tiny(adapter, task)
    module.eval()
    Xc, _, Xq = episode(n_context=30, n_query=9)
    yc = (torch.arange(30)[None] % 2) * 2  # classes 0 and 2 only
    estimator, members = adapter.member_logits(module, Xc[0], yc[0], Xq[0], task, TabPFNConfig())
    assert list(estimator.classes_) == [0, 2]
    raw = members.mean(0)  # the members' columns: 0 -> class 0, 1 -> class 2
    logits = adapter.episode_logits(module, Xc, yc, Xq, task)[0]
    torch.testing.assert_close(logits[:, [0, 2]], raw, rtol=0, atol=1e-6)
    assert torch.isneginf(logits[:, 1]).all()
    yq = torch.tensor([[0, 2, 1, 2, 0, 1, 0, 2, 2]])
    loss = adapter.episode_loss(logits[None], yq, task)
    keep = yq[0] != 1
    expected = torch.nn.functional.cross_entropy(raw[keep], (yq[0][keep] == 2).long())
    torch.testing.assert_close(loss, expected)
    only_absent = adapter.episode_loss(logits[None], torch.ones(1, 9, dtype=torch.long), task)
    assert only_absent.item() == 0.0


@pytest.mark.parametrize("n_estimators", [1, 3])
def test_the_regression_training_forward_is_the_estimators_distribution(tmp_path, n_estimators):
    """A regression episode goes through the estimator's members (their feature and target transforms): in eval
    mode the training outputs' mean is ``predict``'s answer, and in training the loss reaches the weights."""
    path = tmp_path / "tabpfn-v2-regressor.ckpt"
    released_v2_checkpoint(path, regression=True)
    adapter, task = get_adapter("tabpfn"), Task("regression")
    module, _ = adapter.build(TabPFNConfig(checkpoint=str(path)), task)
    Xc, yc, Xq, yq = recipe_episode(regression=True)
    yc = yc * 40.0 + 300.0  # a target on its own scale: the estimator standardises it itself
    config = TabPFNConfig(checkpoint=str(path), n_estimators=n_estimators)
    module.eval()
    with torch.no_grad():
        log_probs = adapter.episode_logits(module, *(torch.as_tensor(a)[None] for a in (Xc, yc, Xq)), task, config)
    criterion, mean, std = adapter._episode_targets[0]
    values = criterion.mean(log_probs[0]).numpy() * std + mean
    np.testing.assert_allclose(values, adapter.predict(module, Xc, yc, Xq, task, config, torch.device("cpu")),
                               rtol=0, atol=1e-4 * 40.0)
    module.train()
    out = adapter.episode_logits(module, *(torch.as_tensor(a)[None] for a in (Xc, yc, Xq)), task, config)
    loss = adapter.episode_loss(out, torch.as_tensor(yq * 40.0 + 300.0)[None], task)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0
                                        for n, p in module.named_parameters() if n.startswith("output_projection"))
