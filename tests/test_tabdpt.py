"""TabDPT: official checkpoints load and predict like the tabdpt package's own estimators; retrieval; errors; CLI.

The shared promises (episodes, live LoRA, strategies, reload) are in test_adapters.py. Checkpoints are
written here, with random weights, in the official format (``tabdpt1_3.safetensors``: the state dict with the
training config as JSON under the ``cfg`` metadata key), because downloads are not possible in tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tabdpt import TabDPTClassifier, TabDPTRegressor
from tabdpt.model import TabDPTModel

from tabtune_cli import TabularPipeline
from tabtune_cli.config import ModelConfig
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.models.specs.tabdpt import TabDPTConfig
from tabtune_cli.models.tabdpt import _cfg
from tabtune_cli.data.episodes import epoch_episodes

from conftest import SEED, TUNE_PARAMS, breast_cancer, check_run
from test_cli import run_dirs, tabtune

CPU = torch.device("cpu")


def official_checkpoint(path, *, seed=0, **sizes) -> TabDPTModel:
    """Write a random-weight checkpoint in TabDPT's official format; return the package's own model loaded from it."""
    cfg = _cfg(**{**dict(emsize=16, nlayers=2, nhead=2, ff_dim=32, max_num_features=16, regression_bin_count=24),
                  **sizes})
    cfg["env"] = {"device": "cpu"}
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = TabDPTModel.load(TabDPTModel(**_model_kwargs(cfg)).state_dict(), OmegaConf.create(cfg), use_flash=False)
    with torch.no_grad():  # zero-initialised projections would hide wrong loading
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    # the released file was saved from a compiled model: its keys carry the "_orig_mod." prefix the package strips
    state = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"cfg": json.dumps(cfg)})
    return model


def _model_kwargs(cfg):
    m = cfg["model"]
    return dict(dropout=0.0, enc_cell_dim=m["enc_cell_dim"], n_out=m["max_num_classes"],
                regression_bin_count=m["regression_bin_count"], regression_bin_min=m["regression_bin_min"],
                regression_bin_max=m["regression_bin_max"], nhead=m["nhead"], nhid=m["ff_dim"], ninp=m["emsize"],
                nlayers=m["nlayers"], num_features=m["max_num_features"], base_len=m["min_eval_context"],
                max_len=m["max_eval_context"], y_encoder_dim=m["y_encoder_dim"],
                n_thinking_rows=m["n_thinking_rows"], use_flash=False)


def table(n_context=80, n_query=20, n_features=5, seed=0):
    rng = np.random.default_rng(seed)
    Xc, Xq = rng.normal(size=(n_context, n_features)), rng.normal(size=(n_query, n_features))
    yc = (Xc[:, 0] > 0).astype(int) + (Xc[:, 1] > 0.5).astype(int)
    return Xc.astype(np.float32), yc, Xq.astype(np.float32)


def package_estimator(cls, path, X, y, **kwargs):
    """The package's own estimator on the checkpoint at ``path``, fitted on ``(X, y)`` (its ``fit`` returns None)."""
    estimator = cls(model_weight_path=str(path), device="cpu", normalizer="standard", compile=False, use_flash=False,
                    verbose=False, **kwargs)
    estimator.fit(X, y)
    return estimator


def test_official_checkpoint_loads_and_predicts_like_the_package(tmp_path):
    path = tmp_path / "tabdpt1_3.safetensors"
    package_model = official_checkpoint(path)
    adapter, task = get_adapter("tabdpt"), Task("classification", 3)
    module, architecture = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    for key, value in package_model.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    json.dumps(architecture)  # a run saves it as JSON
    Xc, yc, Xq = table()
    config = ModelConfig(name="tabdpt", n_estimators=1, softmax_temperature=1.0)
    proba = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    expected = package_estimator(TabDPTClassifier, path, Xc, yc).predict_proba(Xq)
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    # past max_context_rows both retrieve each query's nearest training rows (the package with FAISS)
    retrieved = adapter.predict(module, Xc, yc, Xq, task, TabDPTConfig(n_estimators=1,
                                softmax_temperature=1.0, max_context_rows=24, context_reduction="retrieval"), CPU)
    expected_retrieved = package_estimator(TabDPTClassifier, path, Xc, yc, context_reduction="retrieval") \
        .predict_proba(Xq, context_size=24)
    np.testing.assert_allclose(retrieved, expected_retrieved, atol=1e-5)
    assert np.abs(retrieved - proba).max() > 1e-3  # retrieval changed the context
    # the weights mattered: another checkpoint predicts otherwise
    other = tmp_path / "other.safetensors"
    official_checkpoint(other, seed=1)
    assert np.abs(package_estimator(TabDPTClassifier, other, Xc, yc).predict_proba(Xq) - expected).max() > 1e-3


def test_regression_predicts_the_package_mean_and_trains_on_bins(tmp_path):
    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path)
    adapter, task = get_adapter("tabdpt"), Task("regression")
    module, _ = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    Xc, _, Xq = table()
    yc = (3.0 * Xc[:, 0] + 10.0).astype(np.float32)
    for cap, reduction in ((2048, "subsample"), (24, "retrieval")):
        config = TabDPTConfig(n_estimators=1, max_context_rows=cap, context_reduction=reduction)
        values = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
        expected = package_estimator(TabDPTRegressor, path, Xc, yc, context_reduction=reduction) \
            .predict(Xq, n_ensembles=1, context_size=cap)
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4)
    module.train()
    out = adapter.episode_logits(module, torch.as_tensor(Xc)[None], torch.as_tensor(yc)[None],
                                 torch.as_tensor(Xq)[None], task)
    assert out.shape == (1, len(Xq), 24)
    loss = adapter.episode_loss(out, torch.as_tensor(3.0 * Xq[:, 0] + 10.0)[None], task)
    loss.backward()
    assert torch.isfinite(loss) and module.head[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_members, temperature", [(4, 0.9), (1, 0.7)])
@pytest.mark.parametrize("context_size", [2048, 24])
def test_ensembles_equal_the_package_estimator_at_equal_settings(tmp_path, n_members, temperature, context_size):
    """Feature shuffles, class permutations, logit averaging, temperature and retrieval are the package's own."""
    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path)
    adapter, task = get_adapter("tabdpt"), Task("classification", 3)
    module, _ = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    Xc, yc, Xq = table(n_features=6)
    Xc[::7, 2] = np.nan  # the estimator's mean imputation
    config = TabDPTConfig(context_reduction="retrieval", n_estimators=n_members, softmax_temperature=temperature,
                         max_context_rows=context_size)
    ours = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    package = package_estimator(TabDPTClassifier, path, Xc, yc, context_reduction="retrieval")
    seed = None if n_members == 1 else 0  # tabtune's fixed seed (the package's default draws one per call)
    expected = package.ensemble_predict_proba(Xq, n_ensembles=n_members, temperature=temperature,
                                              context_size=context_size, seed=seed)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    if n_members > 1:  # the members are not all the table as given
        plain = package.predict_proba(Xq, temperature=temperature, context_size=context_size)
        assert np.abs(plain - expected).max() > 1e-3
    regression = Task("regression")
    yr = (2.0 * Xc[:, 0] - 1.0).astype(np.float32)
    values = adapter.predict(module, Xc, yr, Xq, regression, config, CPU)
    expected = package_estimator(TabDPTRegressor, path, Xc, yr, context_reduction="retrieval") \
        .predict(Xq, n_ensembles=n_members, context_size=context_size, seed=seed)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)


def test_a_lora_wrapped_module_drives_the_estimator_and_its_adapters_count(tmp_path):
    from tabtune_cli.config import LoraSettings
    from tabtune_cli.tuning import lora

    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path)
    adapter, task = get_adapter("tabdpt"), Task("classification", 3)
    module, _ = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    Xc, yc, Xq = table()
    config = ModelConfig(name="tabdpt", n_estimators=2)
    before = adapter.predict(wrapped, Xc, yc, Xq, task, config, CPU)  # lora_B starts at zero: the checkpoint's answers
    expected = package_estimator(TabDPTClassifier, path, Xc, yc, context_reduction="retrieval") \
        .ensemble_predict_proba(Xq, n_ensembles=2, temperature=0.9, context_size=2048, seed=0)
    np.testing.assert_allclose(before, expected, atol=1e-6)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    tuned = adapter.predict(wrapped, Xc, yc, Xq, task, config, CPU)
    assert np.abs(tuned - before).max() > 1e-3
    hits = adapter.context_cache.hits  # peft's forward leaves the fitted estimator valid
    np.testing.assert_array_equal(adapter.predict(wrapped, Xc, yc, Xq, task, config, CPU), tuned)
    assert adapter.context_cache.hits == hits + 1


def test_the_fitted_estimator_is_cached_per_context_and_rebuilt_for_new_weights(tmp_path):
    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path)
    adapter, task = get_adapter("tabdpt"), Task("classification", 3)
    module, _ = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    Xc, yc, Xq = table()
    config = TabDPTConfig(n_estimators=2, max_context_rows=24, context_reduction="retrieval")  # retrieval: the FAISS index too
    cache = adapter.context_cache
    first = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    assert (cache.hits, cache.misses) == (0, 1)
    for start in range(0, len(Xq), 5):  # small repeated predicts reuse the fitted estimator and its index
        np.testing.assert_array_equal(adapter.predict(module, Xc, yc, Xq[start:start + 5], task, config, CPU),
                                      first[start:start + 5])
    assert (cache.hits, cache.misses) == (4, 1)
    estimator = next(iter(cache.entries.values()))
    assert estimator.faiss_knn is not None and estimator.model.model is module
    adapter.predict(module, Xc[:-1], yc[:-1], Xq, task, config, CPU)  # another context
    assert cache.misses == 2
    with torch.no_grad():
        module.head[2].weight.add_(torch.randn_like(module.head[2].weight))  # new weights (a fine-tuning step)
    moved = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    assert cache.misses == 3 and np.abs(moved - first).max() > 1e-3
    # a context missing a class still answers for every class of the task
    absent = adapter.predict(module, Xc[yc != 1], yc[yc != 1], Xq, task, config, CPU)
    assert absent.shape == (len(Xq), 3)
    np.testing.assert_allclose(absent.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("n_thinking_rows", [0, 4])
def test_the_context_pass_then_the_query_pass_equal_the_package_forward(tmp_path, n_thinking_rows):
    from tabtune_cli.models.tabdpt import encode_context, query_outputs

    # 300 context rows: past min_eval_context (128), so the layers' attention scaling is at work too
    model = official_checkpoint(tmp_path / "tabdpt1_3.safetensors", n_thinking_rows=n_thinking_rows)
    Xc, yc, Xq = (torch.as_tensor(a)[None] for a in table(n_context=300, n_query=30))
    Xc, Xq, yc = torch.nn.functional.pad(Xc, (0, 11)), torch.nn.functional.pad(Xq, (0, 11)), yc.float()  # 16 wide
    with torch.no_grad():
        for is_cls, labels in ((True, yc), (False, (yc - yc.mean()) / yc.std())):
            joint = model(x_src=torch.cat([Xc, Xq], dim=1), y_src=labels, is_cls=is_cls)
            encoded = encode_context(model, Xc, labels, is_cls)
            torch.testing.assert_close(query_outputs(model, encoded, Xq), joint, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(query_outputs(model, encoded, Xq[:, 7:9]), joint[7:9], atol=1e-5, rtol=1e-5)


def test_repeated_predicts_encode_each_members_context_once(tmp_path):
    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path, n_thinking_rows=4)
    adapter, task = get_adapter("tabdpt"), Task("classification", 3)
    module, _ = adapter.build(ModelConfig(name="tabdpt", checkpoint=str(path)), task)
    Xc, yc, Xq = table(n_context=200, n_query=30)
    config = ModelConfig(name="tabdpt", n_estimators=3)
    first = adapter.predict(module, Xc, yc, Xq, task, config, CPU)
    expected = package_estimator(TabDPTClassifier, path, Xc, yc, context_reduction="retrieval") \
        .ensemble_predict_proba(Xq, n_ensembles=3, temperature=0.9, context_size=2048, seed=0)
    np.testing.assert_allclose(first, expected, atol=1e-6)
    keys_values = next(iter(adapter.context_cache.entries.values())).model
    assert (keys_values.hits, keys_values.misses) == (0, 3)  # one context pass per member
    uncached = get_adapter("tabdpt")
    uncached.cache_context = False
    for start in range(0, len(Xq), 10):
        rows = Xq[start:start + 10]
        again = adapter.predict(module, Xc, yc, rows, task, config, CPU)
        np.testing.assert_array_equal(again, uncached.predict(module, Xc, yc, rows, task, config, CPU))
        np.testing.assert_allclose(again, first[start:start + 10], atol=1e-6)
    assert (keys_values.hits, keys_values.misses) == (9, 3)


def test_inference_pipeline_equals_the_package_estimator_on_its_own_arrays(tmp_path, split):
    path = tmp_path / "tabdpt1_3.safetensors"
    official_checkpoint(path)
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_name="tabdpt", tuning_strategy="inference", tuning_params=TUNE_PARAMS["inference"],
                           model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 3,
                                         "softmax_temperature": 0.8},
                           device="cpu", seed=SEED).fit(X_train, y_train)
    package = package_estimator(TabDPTClassifier, path, pipe.context_X_, pipe.context_y_,
                                context_reduction="retrieval")
    expected = package.ensemble_predict_proba(pipe.preprocessor_.transform(X_test), n_ensembles=3,
                                              temperature=0.8, context_size=2048, seed=0)
    np.testing.assert_allclose(pipe.predict_proba(X_test), expected, atol=1e-6)


def test_pipeline_takes_the_checkpoint_through_model_params(tmp_path, split):
    path = tmp_path / "tabdpt1_3.safetensors"
    package_model = official_checkpoint(path)
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_name="tabdpt", tuning_strategy="inference", tuning_params=TUNE_PARAMS["inference"],
                           model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 2},
                           device="cpu", seed=SEED).fit(X_train, y_train)
    for key, value in package_model.state_dict().items():
        assert torch.equal(pipe.module_.state_dict()[key], value), key
    proba = pipe.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    pipe.save(tmp_path / "saved")
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path / "saved").predict_proba(X_test), proba)


def test_retrieval_episodes_are_local_disjoint_and_cover_every_row():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    adapter, config = get_adapter("tabdpt"), TabDPTConfig(max_context_rows=50, context_reduction="retrieval")
    episodes = epoch_episodes(None, 200, 40, 16, rng, n_features=4)
    assert adapter.plan_episodes(episodes, X, ModelConfig(name="tabdpt"), rng) is episodes  # small split: as sampled
    planned = adapter.plan_episodes(episodes, X, config, rng)
    assert len(planned) == len(episodes)
    assert set(np.concatenate([e.query for e in planned])) == set(range(200))
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    for e, original in zip(planned, episodes):
        assert len(e.query) == 16 and len(e.context) == 40 and not set(e.query) & set(e.context)
        assert e.feature_order is original.feature_order
        # the context is the rows nearest the queries' neighbourhood, not a random draw
        centre = Z[e.query].mean(0)
        others = np.setdiff1d(np.arange(200), e.query)
        assert np.linalg.norm(Z[e.context] - centre, axis=1).mean() < np.linalg.norm(Z[others] - centre, axis=1).mean()


def test_bad_and_missing_checkpoints_name_the_file(tmp_path, monkeypatch):
    adapter, task = get_adapter("tabdpt"), Task("classification", 2)
    with pytest.raises(TabTuneError, match="nowhere.safetensors"):
        adapter.build(ModelConfig(name="tabdpt", checkpoint=str(tmp_path / "nowhere.safetensors")), task)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TabTuneError, match="garbage.safetensors.*not a TabDPT checkpoint"):
        adapter.build(ModelConfig(name="tabdpt", checkpoint=str(garbage)), task)
    no_cfg = tmp_path / "no_cfg.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(no_cfg))
    with pytest.raises(TabTuneError, match="no_cfg.safetensors.*no 'cfg'"):
        adapter.build(ModelConfig(name="tabdpt", checkpoint=str(no_cfg)), task)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(mismatched),
              metadata={"cfg": json.dumps(_cfg(emsize=16, nlayers=1, nhead=2, ff_dim=32, max_num_features=8))})
    with pytest.raises(TabTuneError, match="mismatched.safetensors.*weights do not match"):
        adapter.build(ModelConfig(name="tabdpt", checkpoint=str(mismatched)), task)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TabTuneError, match=r"tabdpt1_3\.safetensors.*huggingface.co/Layer6/TabDPT.*model.checkpoint"):
        adapter.build(ModelConfig(name="tabdpt"), task)


def test_cli_peft_smoke_run_end_to_end(tmp_path):
    result = tabtune("train", "debug=smoke", "model=tabdpt", "strategy=peft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in run_dir.iterdir()}
    lora_layers = {n.split(".lora_")[0] for n, _ in TabularPipeline.load(run_dir).module_.named_parameters()
                   if ".lora_" in n}
    prefix = "base_model.model"
    for block in range(2):
        for name in ("q_proj", "q_gate", "k_proj", "v_proj", "out_proj", "ff.up", "ff.down"):
            assert f"{prefix}.transformer_encoder.{block}.{name}" in lora_layers
        assert f"{prefix}.cls_y_encoders.{block}" in lora_layers
    assert {f"{prefix}.encoder", f"{prefix}.head.0", f"{prefix}.head.2"} <= lora_layers
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    check_run(run_dir, "peft", *breast_cancer())  # its metrics are its predictions', which it reproduces


