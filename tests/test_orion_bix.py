"""OrionBix: official-layout checkpoints load strictly and predict as their source; live LoRA; the eval forward.

Checkpoints are written here, with random weights in the tiny size, in the official ``Orion-BiX-v1.1.ckpt``
layout (``torch.save({"config": ..., "state_dict": ...})``), because downloads are not possible in tests.
Equality with the reference implementation itself is in tests/parity/test_orion_bix_parity.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task, under_prefixes
from tabtune_cli.models.orion_bix import OrionBix, OrionBixAdapter
from tabtune_cli.models.orion_members import fitted_members, member_views
from tabtune_cli.tuning import lora

CPU = torch.device("cpu")
TASK = Task("classification", 3)


def tiny(seed=0):
    """The adapter, a tiny random-weight OrionBix with no all-zero tensor, and its architecture."""
    adapter = OrionBixAdapter()
    torch.manual_seed(seed)
    module, architecture = adapter.build(ModelConfig(name="orionbix", pretrained=False, size="tiny"), TASK)
    with torch.no_grad():  # zero-initialised projections would hide wrong loading and dead adapters
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.1)
    return adapter, module, architecture


def write_checkpoint(path, module, architecture, prefix=""):
    config = {**architecture, "a_future_option": True}  # the reference's loader ignores unknown config keys
    torch.save({"config": config, "state_dict": {prefix + k: v for k, v in module.state_dict().items()}}, path)


def table(n_context=40, n_query=12, n_features=5, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    Xc = rng.normal(size=(n_context, n_features)).astype(np.float32)
    Xq = rng.normal(size=(n_query, n_features)).astype(np.float32)
    return Xc, np.arange(n_context) % n_classes, Xq


def episode(seed=0, n_context=24, n_query=8, n_features=5):
    g = torch.Generator().manual_seed(seed)
    Xc, Xq = torch.randn(2, n_context, n_features, generator=g), torch.randn(2, n_query, n_features, generator=g)
    return Xc, torch.arange(n_context).repeat(2, 1) % 3, Xq


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_official_layout_loads_strictly_and_predicts_as_its_source(tmp_path, prefix):
    adapter, source, architecture = tiny()
    path = tmp_path / "Orion-BiX-v1.1.ckpt"
    write_checkpoint(path, source, architecture, prefix)
    module, loaded_architecture = adapter.build(ModelConfig(name="orionbix", checkpoint=str(path)), TASK)
    assert set(module.state_dict()) == set(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    assert "bi_axial_attention.out_ln.weight" in module.state_dict()  # kept for the keys, never applied
    assert loaded_architecture == architecture and json.loads(json.dumps(loaded_architecture)) == architecture

    Xc, yc, Xq = table()
    config = ModelConfig(name="orionbix", n_estimators=3, softmax_temperature=0.9)
    proba = adapter.predict(module, Xc, yc, Xq, TASK, config, CPU)
    np.testing.assert_array_equal(proba, adapter.predict(source, Xc, yc, Xq, TASK, config, CPU))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)

    # the ensemble is the reference wrapper's (its members: tests/test_orion_members.py): each member's
    # un-shifted logits averaged, then softmax(/T)
    total, members = 0.0, fitted_members(Xc, yc, 3)
    for X, y, shift in member_views(members, Xq, 1):
        with torch.no_grad():
            logits = source.eval()(torch.as_tensor(X, dtype=torch.float32)[None],
                                   torch.as_tensor(y, dtype=torch.float32)[None])[0].numpy()
        total = total + logits[:, shift]
    expected = torch.softmax(torch.as_tensor(total / 3 / 0.9), dim=-1).numpy()
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    assert np.abs(proba - 1 / 3).max() > 1e-3  # not uniform: the weights and the table mattered
    # one member is the table standard-scaled on the context
    one = adapter.predict(module, Xc, yc, Xq, TASK, ModelConfig(name="orionbix", n_estimators=1), CPU)
    X = torch.as_tensor((np.concatenate([Xc, Xq]) - Xc.mean(0)) / Xc.std(0), dtype=torch.float32)[None]
    with torch.no_grad():
        logits = source(X, torch.as_tensor(yc, dtype=torch.float32)[None])[0]
    np.testing.assert_allclose(one, torch.softmax(logits / 0.9, dim=-1).numpy(), atol=1e-5)

    # another seed's weights predict otherwise, so the comparison above is not vacuous
    _, other, _ = tiny(seed=1)
    assert np.abs(adapter.predict(other, Xc, yc, Xq, TASK, config, CPU) - proba).max() > 1e-3


def test_a_renamed_key_or_a_bare_state_dict_is_refused(tmp_path):
    adapter, source, architecture = tiny()
    state = source.state_dict()
    state["bi_axial_attention.out_norm.weight"] = state.pop("bi_axial_attention.out_ln.weight")
    renamed = tmp_path / "renamed.ckpt"
    torch.save({"config": architecture, "state_dict": state}, renamed)
    with pytest.raises(TabTuneError, match=r"missing key 'bi_axial_attention\.out_ln\.weight'"):
        adapter.build(ModelConfig(name="orionbix", checkpoint=str(renamed)), TASK)

    bare = tmp_path / "bare.ckpt"
    torch.save(source.state_dict(), bare)
    with pytest.raises(TabTuneError, match="not an OrionBix checkpoint") as info:
        adapter.build(ModelConfig(name="orionbix", checkpoint=str(bare)), TASK)
    assert "\n" not in str(info.value)

    with pytest.raises(TabTuneError, match="row_attention_type='linear' is not supported"):
        OrionBix(**architecture, row_attention_type="linear")


def test_lora_reaches_every_projection_under_the_defaults_and_merges_to_the_same_outputs():
    adapter, module, _ = tiny()
    prefixes = list(adapter.default_lora_prefixes)
    plain = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    expected_linears = sorted(n for n, m in module.named_modules() if under_prefixes(n, prefixes) and type(m) in plain)
    expected_packed = sorted(f"{n}.in_proj_weight" for n, m in module.named_modules()
                             if under_prefixes(n, prefixes) and isinstance(m, nn.MultiheadAttention))
    linears, packed = adapter.lora_targets(module, None)
    assert sorted(linears) == expected_linears and sorted(packed) == expected_packed
    assert any(".cls_attention.attn.out_proj" in n for n in linears)  # the CLS attention's out_proj too
    assert any(n.startswith("col_embedder.tf_col.") and n.endswith("attention.query_projection") for n in linears)

    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    wrapped.train()
    assert all(p.requires_grad == ("lora_" in n) for n, p in wrapped.named_parameters())
    lora_b = [(n, p) for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(expected_linears) + len(expected_packed)
    assert sum("bi_axial_attention" in n for n, _ in lora_b) >= 2 * 18

    # each adapter moving the output on its own: tests/test_adapters.py, for every model
    Xc, yc, Xq = episode()
    base = adapter.episode_logits(wrapped, Xc, yc, Xq, TASK).detach()
    with torch.no_grad():
        for _, p in lora_b:
            p.normal_(0.0, 0.05)
    tuned = adapter.episode_logits(wrapped, Xc, yc, Xq, TASK).detach()
    assert (tuned - base).abs().max() > 1e-2
    # peft (0.21) merges and unloads every adapter except an out_proj inside an attention whose
    # in_proj_weight it parametrizes: that one stays an active, unmerged LoRA layer; outputs are equal
    merged = wrapped.merge_and_unload()
    assert type(merged) is OrionBix
    torch.testing.assert_close(adapter.episode_logits(merged, Xc, yc, Xq, TASK), tuned, atol=1e-5, rtol=0)


def test_eval_forward_gives_test_rows_of_present_classes_each_independent_of_the_others():
    _, module, _ = tiny()
    Xc, yc, Xq = episode()
    X, y = torch.cat([Xc, Xq], dim=1), yc.float()
    with torch.no_grad():
        train_out = module.train()(X, y)
        out = module.eval()(X, y)
        assert train_out.shape == (2, 8, 10) and out.shape == (2, 8, 3)
        # no dropout: eval is the training computation cut to the classes present
        torch.testing.assert_close(out, train_out[..., :3], atol=1e-6, rtol=0)
        assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-3
        # a query row's output ignores the other query rows
        alone = module(X[:, :25], y)
        torch.testing.assert_close(alone[:, 0], out[:, 0], atol=1e-5, rtol=0)
        reversed_queries = module(torch.cat([Xc, Xq.flip(1)], dim=1), y)
        torch.testing.assert_close(reversed_queries.flip(1), out, atol=1e-5, rtol=0)
        # ...but reads the context labels
        assert (module(X, (yc.float() + 1) % 3) - out).abs().max() > 1e-4

        # past max_classes: the class hierarchy, as T * log(p + 1e-6) with p summing to one
        y13 = (torch.arange(60) % 13).float().repeat(2, 1)
        X13 = torch.randn(2, 66, 5, generator=torch.Generator().manual_seed(1))
        many = module(X13, y13, softmax_temperature=0.5)
        assert many.shape == (2, 6, 13)
        p = torch.exp(many / 0.5) - 1e-6
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 6), atol=1e-5, rtol=0)
        assert (p.max(-1).values - p.min(-1).values).min() > 1e-3
