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
from tabtune_cli.models.tabdpt import _cfg
from tabtune_cli.tuning.episodes import epoch_episodes

from conftest import SEED, TUNE_PARAMS
from test_cli import run_dirs, tabtune

CPU = torch.device("cpu")


def official_checkpoint(path, *, seed=0) -> TabDPTModel:
    """Write a random-weight checkpoint in TabDPT's official format; return the package's own model loaded from it."""
    cfg = _cfg(emsize=16, nlayers=2, nhead=2, ff_dim=32, max_num_features=16, regression_bin_count=24)
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
                max_len=m["max_eval_context"], y_encoder_dim=m["y_encoder_dim"], use_flash=False)


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
    retrieved = adapter.predict(module, Xc, yc, Xq, task, ModelConfig(name="tabdpt", n_estimators=1,
                                softmax_temperature=1.0, max_context_rows=24), CPU)
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
        config = ModelConfig(name="tabdpt", n_estimators=1, max_context_rows=cap)
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
    adapter, config = get_adapter("tabdpt"), ModelConfig(name="tabdpt", max_context_rows=50)
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
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0


