"""Mitra (Tab2D): the official folder layout loads strictly, padding is honoured, chunked prediction and LoRA
merge agree with the plain forward, and the numbers reach the model as AutoGluon's wrapper hands them over."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task
from tabtune_cli.models.mitra import QUERY_CHUNK, MitraAdapter, Tab2D, quantile_normalise
from tabtune_cli.tuning import lora

CLS, REG = Task("classification", 3), Task("regression")


def random_tab2d(task: str = "CLASSIFICATION", dim_output: int = 10, seed: int = 0) -> Tab2D:
    torch.manual_seed(seed)
    module = Tab2D(dim=16, dim_output=dim_output, n_layers=2, n_heads=2, task=task)
    with torch.no_grad():  # noise everywhere, so no weight is trivially zero or one
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def write_folder(module: Tab2D, folder, rename: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    state = {(rename or {}).get(k, k): v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(module.official_config()))
    return folder


def table(seed=0, n_context=60, n_query=20, n_features=4, n_classes=3):
    rng = np.random.default_rng(seed)
    Xc, Xq = rng.normal(size=(n_context, n_features)), rng.normal(size=(n_query, n_features))
    yc = np.arange(n_context) % n_classes
    return Xc.astype(np.float32), yc, Xq.astype(np.float32)


def test_the_official_folder_layout_loads_strictly_and_predicts_as_the_module_it_was_written_from(tmp_path):
    module = random_tab2d()
    folder = write_folder(module, tmp_path / "mitra-classifier")
    adapter = MitraAdapter()
    Xc, yc, Xq = table()
    config = ModelConfig(name="mitra", n_estimators=3, softmax_temperature=1.0)
    expected = adapter.predict(module, Xc, yc, Xq, CLS, config, torch.device("cpu"))
    for given in (folder, folder / "model.safetensors"):  # the folder, or its weights file
        loaded, architecture = adapter.build(ModelConfig(name="mitra", checkpoint=str(given)), CLS)
        assert architecture == module.official_config()
        np.testing.assert_array_equal(adapter.predict(loaded, Xc, yc, Xq, CLS, config, torch.device("cpu")), expected)
    # one member, no feature shift: the probabilities are the plain softmax of the forward's first 3 logits
    logits = module(torch.as_tensor(Xc)[None], torch.as_tensor(yc)[None], torch.as_tensor(Xq)[None])[0, :, :3]
    one = adapter.predict(module, Xc, yc, Xq, CLS, ModelConfig(name="mitra", n_estimators=1, softmax_temperature=1.0),
                          torch.device("cpu"))
    np.testing.assert_allclose(one, torch.softmax(logits, -1).detach().numpy(), atol=1e-6)


def test_a_renamed_key_or_a_wrong_task_or_a_missing_file_is_refused_naming_it(tmp_path):
    module = random_tab2d()
    renamed = write_folder(module, tmp_path / "renamed", rename={"layers.1.attention2.q.weight": "layers.1.attention2.query.weight"})
    adapter = MitraAdapter()
    with pytest.raises(TabTuneError, match=r"missing key 'layers\.1\.attention2\.q\.weight'"):
        adapter.build(ModelConfig(name="mitra", checkpoint=str(renamed)), CLS)
    with pytest.raises(TabTuneError, match="Mitra classification checkpoint, but the task is regression"):
        adapter.build(ModelConfig(name="mitra", checkpoint=str(renamed)), REG)
    (tmp_path / "half").mkdir()
    save_file({"a": torch.zeros(1)}, tmp_path / "half" / "model.safetensors")
    with pytest.raises(TabTuneError, match=r"half/config\.json' is missing"):
        adapter.build(ModelConfig(name="mitra", checkpoint=str(tmp_path / "half")), CLS)


def test_no_official_weights_offline_fails_fast_naming_file_repo_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for task, repo in ((CLS, "autogluon/mitra-classifier"), (REG, "autogluon/mitra-regressor")):
        with pytest.raises(TabTuneError) as err:
            MitraAdapter().build(ModelConfig(name="mitra"), task)
        message = str(err.value)
        assert "'config.json'" in message and repo in message and "model.checkpoint=" in message


def test_padding_gives_the_real_rows_the_unpadded_outputs():
    for task, dim_output in (("CLASSIFICATION", 10), ("REGRESSION", 1)):
        module = random_tab2d(task, dim_output)
        g = torch.Generator().manual_seed(1)
        # two tables of different sizes in one batch: 30 and 22 context rows, 5 and 3 features, 7 and 4 queries
        shapes = [(30, 5, 7), (22, 3, 4)]
        tables = [(torch.randn(s, f, generator=g), torch.randint(0, 3, (s,), generator=g).float(),
                   torch.randn(q, f, generator=g)) for s, f, q in shapes]
        xs, ys, xq = torch.zeros(2, 30, 5), torch.full((2, 30), -100.0), torch.zeros(2, 7, 5)
        pad_s, pad_f, pad_q = torch.ones(2, 30, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
        for i, (x_s, y_s, x_q) in enumerate(tables):
            (s, f), q = x_s.shape, len(x_q)
            xs[i, :s, :f], ys[i, :s], xq[i, :q, :f] = x_s, y_s, x_q
            pad_s[i, :s], pad_f[i, :f], pad_q[i, :q] = False, False, False
        xs[1, 22:] = 1e3  # padding that would shift quantiles and means if it were counted
        batched = module(xs, ys if task == "CLASSIFICATION" else ys.clamp_min(0), xq, pad_f, pad_s, pad_q)
        for i, (x_s, y_s, x_q) in enumerate(tables):
            alone = module(x_s[None], y_s[None], x_q[None])[0]
            torch.testing.assert_close(batched[i, : len(x_q)], alone, atol=1e-5, rtol=1e-5)


def test_quantile_normalisation_without_padding_is_the_ranks_among_999_context_quantiles():
    x_support = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    x_query = torch.tensor([[[0.0], [2.5], [9.0]]])
    support, query = quantile_normalise(x_support, x_query, None)
    # quantiles of 1..4 at 0.001..0.999: below 2.5 lie those with q*3 < 1.5, i.e. q < 0.5: 499 of them
    ranks = torch.tensor([0.0, 333.0, 666.0, 999.0]) / 4
    mean, std = ranks.mean(), ranks.var(unbiased=False).sqrt()
    torch.testing.assert_close(support[0, :, 0], (ranks - mean) / std)
    torch.testing.assert_close(query[0, :, 0], (torch.tensor([0.0, 499.0, 999.0]) / 4 - mean) / std)
    constant, _ = quantile_normalise(torch.ones(1, 4, 1), x_query, None)
    assert torch.equal(constant, torch.zeros(1, 4, 1))


def test_prediction_in_query_chunks_equals_one_row_at_a_time_and_regression_comes_back_in_units():
    adapter = MitraAdapter()
    config = ModelConfig(name="mitra", n_estimators=2, softmax_temperature=1.0)
    module = random_tab2d("REGRESSION", 1)
    rng = np.random.default_rng(0)
    Xc = rng.normal(size=(40, 3)).astype(np.float32)
    yc = (Xc[:, 0] * 10 + 100).astype(np.float32)
    Xq = rng.normal(size=(QUERY_CHUNK + 5, 3)).astype(np.float32)
    many = adapter.predict(module, Xc, yc, Xq, REG, config, torch.device("cpu"))
    few = adapter.predict(module, Xc, yc, Xq[-7:], REG, config, torch.device("cpu"))
    np.testing.assert_allclose(many[-7:], few, atol=1e-5)
    # min-max scaled by the context and mapped back: inside the context's range, not around 0
    assert many.shape == (len(Xq),) and (many > yc.min() - 1).all() and (many < yc.max() + 1).all()


def test_peft_merge_and_unload_gives_the_adapter_models_outputs():
    adapter = MitraAdapter()
    module = random_tab2d()
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    targets = {n.split(".base_layer")[0] for n, _ in wrapped.named_parameters() if "base_layer" in n}
    # every attention projection and feed-forward linear of every layer, the cell embedding and the head
    expected = {f"base_model.model.layers.{i}.{name}" for i in range(2) for name in
                [f"attention{a}.{p}" for a in (1, 2) for p in "qkvo"] + [f"linear{j}" for j in range(1, 5)]}
    assert expected | {"base_model.model.x_embedding.x_embedding", "base_model.model.final_layer"} == targets
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    Xc, yc, Xq = (torch.as_tensor(a)[None] for a in table())
    wrapped.eval()
    with torch.no_grad():
        with_adapters = wrapped(Xc, yc, Xq)
        merged = wrapped.merge_and_unload()(Xc, yc, Xq)
        base = random_tab2d()(Xc, yc, Xq)
    assert type(wrapped.merge_and_unload()) is Tab2D
    torch.testing.assert_close(merged, with_adapters, atol=1e-5, rtol=1e-5)
    assert (with_adapters - base).abs().max() > 1e-3


def test_numbers_reach_the_model_as_given_and_a_gap_takes_the_context_mean(tmp_path):
    """As AutoGluon's wrapper: no standardising or 4-sigma clipping before the model (it reads ranks, and clipped
    outliers would tie), and a gap is filled with its column's mean over the context rows."""
    from tabtune_cli import TabularPipeline

    module = random_tab2d()
    folder = write_folder(module, tmp_path / "mitra-classifier")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(100, 3)) * np.array([1.0, 1e3, 5.0])
    X[:2, 0] = [1e4, 2e4]  # two context outliers beyond 4 standard deviations, query rows between them
    X[80:90, 0] = np.linspace(1.1e4, 1.9e4, 10)
    X[rng.random(100) < 0.1, 1] = np.nan
    y = np.arange(100) % 3
    columns = ["a", "b", "c"]
    pipe = TabularPipeline(model_name="mitra", tuning_strategy="inference", device="cpu",
                           tuning_params={"show_progress": False}, model_params={"checkpoint": str(folder)})
    pipe.fit(pd.DataFrame(X[:80], columns=columns), pd.Series(y[:80], name="label"))
    ours = pipe.predict_proba(pd.DataFrame(X[80:], columns=columns))
    filled = np.where(np.isnan(X), np.nanmean(X[:80], axis=0), X)
    adapter, cpu = MitraAdapter(), torch.device("cpu")
    expected = adapter.predict(module, filled[:80], y[:80], filled[80:], CLS, pipe.model_config_, cpu)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    # clipping at 4 standard deviations would have tied the outliers and the query rows between them
    mean, std = filled[:80].mean(0), filled[:80].std(0)
    clipped = np.clip((filled - mean) / std, -4, 4)
    moved = adapter.predict(module, clipped[:80], y[:80], clipped[80:], CLS, pipe.model_config_, cpu)
    assert np.abs(moved - expected)[:10].max() > 5e-5 and np.abs(moved - expected)[10:].max() < 1e-6
