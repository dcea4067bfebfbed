"""OrionMSP: the official checkpoint layout loads strictly, LoRA is live everywhere and merges, queries stay apart.

Checkpoints are written here with random weights in the official ``Orion-MSP-v1.0.ckpt`` layout
(``torch.save({"config": kwargs, "state_dict": ...})``), because downloads are not possible in tests.
Equality with the reference implementation is in ``tests/parity/test_orion_msp_parity.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task
from tabtune_cli.models.orion_msp import OrionMSP, OrionMSPAdapter, OrionMSPConfig
from tabtune_cli.tuning import lora

CPU = torch.device("cpu")
TASK = Task("classification", 3)
CONFIG = {**OrionMSPAdapter.sizes["tiny"], "max_classes": 10}


def random_orion(seed: int = 0, **overrides) -> OrionMSP:
    torch.manual_seed(seed)
    module = OrionMSP(**{**CONFIG, **overrides})
    with torch.no_grad():  # noise everywhere: a zero-initialised projection would hide a missed branch
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def write_official(path, module: OrionMSP, config: dict, rename: dict | None = None, prefix: str = ""):
    state = {prefix + (rename or {}).get(k, k): v for k, v in module.state_dict().items()}
    torch.save({"config": config, "state_dict": state}, path)
    return path


def episode(seed=0, n_context=40, n_query=12, n_features=6, n_classes=3, batch=2):
    g = torch.Generator().manual_seed(seed)
    Xc = torch.randn(batch, n_context, n_features, generator=g)
    Xq = torch.randn(batch, n_query, n_features, generator=g)
    yc = torch.stack([torch.randperm(n_context, generator=g) % n_classes for _ in range(batch)])
    return Xc, yc, Xq


def test_official_checkpoint_loads_strictly_and_predicts_like_its_module(tmp_path):
    source = random_orion()
    adapter = OrionMSPAdapter()
    path = write_official(tmp_path / "Orion-MSP-v1.0.ckpt", source, CONFIG)
    module, architecture = adapter.build(ModelConfig(name="orionmsp", checkpoint=str(path)), TASK)
    assert architecture == CONFIG and not module.isolate_queries  # the reference's computation, by default
    for key, value in source.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    # a compiled / DataParallel model's key prefixes are stripped
    prefixed = write_official(tmp_path / "prefixed.ckpt", source, CONFIG, prefix="_orig_mod.module.")
    again, _ = adapter.build(ModelConfig(name="orionmsp", checkpoint=str(prefixed)), TASK)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())

    Xc, yc, Xq = episode(batch=1)
    source.isolate_queries = False  # the default: the reference's computation
    X = torch.cat([Xc, Xq], dim=1)
    with torch.no_grad():
        expected_logits = source.eval()(X, yc.float())
        assert torch.equal(module.eval()(X, yc.float()), expected_logits)
    # one member: the wrapper's first, the table standard-scaled on the context, its logits through softmax(/T)
    config = ModelConfig(name="orionmsp", n_estimators=1, softmax_temperature=0.9)
    proba = adapter.predict(module, Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), TASK, config, CPU)
    mean, std = Xc[0].mean(0), Xc[0].std(0, unbiased=False)
    with torch.no_grad():
        scaled = source(((X - mean) / std).float(), yc.float())[0]
    np.testing.assert_allclose(proba, torch.softmax(scaled / 0.9, dim=-1).numpy(), atol=1e-5)
    assert proba.std(axis=0).max() > 1e-3  # the rows differ: not a constant prediction
    # the numbers as the user has them: a column's unit changes nothing once the member scales it
    rescaled = [a.numpy() * np.array([1.0, 1e3, 1.0, 1.0, 1e-2, 1.0]) for a in (Xc[0], Xq[0])]
    np.testing.assert_allclose(adapter.predict(module, rescaled[0], yc[0].numpy(), rescaled[1], TASK, config, CPU),
                               proba, atol=1e-5)
    # the default 32 members (feature orders, class shifts, power-transformed halves) answer otherwise
    full = adapter.predict(module, Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), TASK,
                           ModelConfig(name="orionmsp", n_estimators=32, softmax_temperature=0.9), CPU)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(full - proba).max() > 1e-4


def test_bad_checkpoints_are_refused_naming_what_is_wrong(tmp_path):
    adapter, source = OrionMSPAdapter(), random_orion()
    renamed = write_official(tmp_path / "renamed.ckpt", source, CONFIG,
                             rename={"icl_predictor.decoder.0.weight": "icl_predictor.decoder.0.kernel"})
    with pytest.raises(TabTuneError, match=r"renamed\.ckpt.*missing key 'icl_predictor\.decoder\.0\.weight'"):
        adapter.build(ModelConfig(name="orionmsp", checkpoint=str(renamed)), TASK)
    bare = tmp_path / "bare.ckpt"
    torch.save(source.state_dict(), bare)  # a state dict without the {"config", "state_dict"} container
    with pytest.raises(TabTuneError, match=r"bare\.ckpt: not an OrionMSP checkpoint \(expected a dict"):
        adapter.build(ModelConfig(name="orionmsp", checkpoint=str(bare)), TASK)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TabTuneError, match=r"garbage\.ckpt: not an OrionMSP checkpoint"):
        adapter.build(ModelConfig(name="orionmsp", checkpoint=str(garbage)), TASK)
    extra = write_official(tmp_path / "extra.ckpt", source, {**CONFIG, "row_depth": 3})
    with pytest.raises(TabTuneError, match=r"extra\.ckpt: unknown OrionMSP config key 'row_depth'"):
        adapter.build(ModelConfig(name="orionmsp", checkpoint=str(extra)), TASK)


def lora_b_moves(adapter, wrapped, Xc, yc, Xq) -> dict[str, float]:
    """How far perturbing each lora_B alone moves the episode logits."""
    base = adapter.episode_logits(wrapped, Xc, yc, Xq, TASK).detach()
    moved = {}
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                saved = p.clone()
                p.normal_(0.0, 0.5)
                moved[name] = (adapter.episode_logits(wrapped, Xc, yc, Xq, TASK) - base).abs().max().item()
                p.copy_(saved)
    return moved


def adapter_layers(names) -> set[str]:
    """The model's layer names that hold the given adapter parameters (peft's wrappers left out)."""
    return {n.split(".lora_B")[0].removeprefix("base_model.model.").replace(".base_layer", "") for n in names}


def test_every_lora_adapter_is_live_and_merging_keeps_the_outputs():
    adapter, module = OrionMSPAdapter(), random_orion()
    module.isolate_queries = True
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    Xc, yc, Xq = episode()
    wrapped.train()
    moved = lora_b_moves(adapter, wrapped, Xc, yc, Xq)
    layers = adapter_layers(moved)
    # every attention (packed q/k/v and out_proj) and feed-forward of each default part, and the decoder
    for attn in ("col_embedder.tf_col.blocks.0.multihead_attn1", "col_embedder.tf_col.blocks.0.multihead_attn2",
                 *(f"row_interactor.scale_encoders.{s}.blocks.0" for s in range(3)),
                 *(f"icl_predictor.tf_icl.blocks.{i}" for i in range(2))):
        assert {f"{attn}.attn", f"{attn}.attn.out_proj", f"{attn}.linear1", f"{attn}.linear2"} <= layers, attn
    assert {"icl_predictor.decoder.0", "icl_predictor.decoder.2"} <= layers
    assert not any(".memory." in n or ".pma." in n for n in layers)  # memory: opt-in; pma: unused here
    assert len(moved) == 30 and min(moved.values()) > 1e-6, {n: v for n, v in moved.items() if v <= 1e-6}
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)

    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    wrapped.eval()
    with torch.no_grad():
        with_adapters = adapter.episode_logits(wrapped, Xc, yc, Xq, TASK)
        base = adapter.episode_logits(random_orion(), Xc, yc, Xq, TASK)
        merged = wrapped.merge_and_unload()
        assert type(merged) is OrionMSP
        torch.testing.assert_close(adapter.episode_logits(merged, Xc, yc, Xq, TASK), with_adapters, atol=1e-5, rtol=0)
    assert (with_adapters - base).abs().max() > 1e-3


def test_the_perceiver_memory_takes_live_adapters_when_named():
    adapter, module = OrionMSPAdapter(), random_orion()
    module.isolate_queries = True
    settings = LoraSettings(r=2, target_modules=["icl_predictor.memory"])
    wrapped = lora.wrap(adapter, module, settings)
    wrapped.train()
    moved = lora_b_moves(adapter, wrapped, *episode())
    layers = {n.removeprefix("icl_predictor.memory.") for n in adapter_layers(moved)}
    for side in ("write_layers.0", "read_layers.0"):
        assert {f"{side}.attn.attn", f"{side}.attn.attn.out_proj", f"{side}.ffn.self_attn",
                f"{side}.ffn.self_attn.out_proj", f"{side}.ffn.linear1", f"{side}.ffn.linear2"} <= layers
    assert min(moved.values()) > 1e-6, {n: v for n, v in moved.items() if v <= 1e-6}


def test_eval_forward_gives_query_logits_independent_of_other_queries():
    module = random_orion().eval()
    Xc, yc, Xq = episode(n_classes=4)
    X, y = torch.cat([Xc, Xq], dim=1), yc.float()
    with torch.no_grad():
        module.isolate_queries = True
        logits = module(X, y)
        assert logits.shape == (2, 12, 4)  # the query rows, the context's classes
        torch.testing.assert_close(module(X, y, return_logits=False), torch.softmax(logits / 0.9, dim=-1))
        # a query row's logits are the same alone, or beside other (changed) queries
        alone = module(torch.cat([Xc, Xq[:, :1]], dim=1), y)
        torch.testing.assert_close(alone[:, 0], logits[:, 0], atol=1e-6, rtol=0)
        changed = torch.cat([Xq[:, :1], Xq[:, 1:] + 2.0], dim=1)
        torch.testing.assert_close(module(torch.cat([Xc, changed], dim=1), y)[:, 0], logits[:, 0], atol=1e-6, rtol=0)
        assert (module(torch.cat([Xc, Xq + 2.0], dim=1), y)[:, 0] - logits[:, 0]).abs().max() > 1e-3
        # the reference's Perceiver read lets queries see each other: the default of the bare class
        module.isolate_queries = False
        assert (module(torch.cat([Xc, changed], dim=1), y)[:, 0] - module(X, y)[:, 0]).abs().max() > 1e-5


def test_more_classes_than_the_head_go_through_the_hierarchy():
    module = random_orion()
    module.isolate_queries = True
    module.eval()
    Xc, yc, Xq = episode(n_context=60, n_classes=13, batch=1)
    X = torch.cat([Xc, Xq], dim=1)
    with torch.no_grad():
        out = module(X, yc.float())
        probs = module(X, yc.float(), return_logits=False)
        alone = module(torch.cat([Xc, Xq[:, :1]], dim=1), yc.float(), return_logits=False)
    assert out.shape == probs.shape == (1, 12, 13)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 12))
    torch.testing.assert_close(out, 0.9 * torch.log(probs + 1e-6))
    assert probs.std(dim=1).max() > 1e-3
    torch.testing.assert_close(alone[:, 0], probs[:, 0], atol=1e-6, rtol=0)


def test_isolate_queries_false_gives_the_references_computation_through_the_adapter_and_peft():
    adapter = OrionMSPAdapter()
    module = adapter.from_architecture(CONFIG)
    module.load_state_dict(random_orion().state_dict())
    Xc, yc, Xq = episode(batch=1, n_classes=3)
    args = (Xc[0].numpy(), yc[0].numpy(), Xq[0].numpy(), TASK)
    isolated = adapter.predict(module, *args, OrionMSPConfig(n_estimators=1, isolate_queries=True), CPU)
    shared = adapter.predict(module, *args, OrionMSPConfig(n_estimators=1, isolate_queries=False), CPU)
    module.isolate_queries = False
    X = torch.cat([Xc, Xq], 1)
    X = (X - Xc[0].mean(0)) / Xc[0].std(0, unbiased=False)  # the wrapper's first member: standard scaling
    with torch.no_grad():  # the bare reference computation, one member, softmax at 0.9
        reference = torch.softmax(module.eval()(X, yc.float()) / 0.9, -1)[0].numpy()
    np.testing.assert_allclose(shared, reference, atol=1e-5)
    assert np.abs(isolated - shared).max() > 1e-5
    # the switch reaches the model inside a peft wrapper too (training episodes)
    wrapped = lora.wrap(adapter, module, LoraSettings(r=2))
    adapter.episode_logits(wrapped, Xc, yc, Xq, TASK, OrionMSPConfig(n_estimators=1, isolate_queries=True))
    assert all(m.isolate_queries for m in wrapped.modules() if isinstance(m, OrionMSP))


def test_isolating_queries_changes_the_outputs_by_what_it_costs():
    """``model.isolate_queries=true`` keeps a query's answer independent of its batch-mates, and moves the outputs
    away from the computation the weights were trained with; the default (false) is that computation."""
    adapter = OrionMSPAdapter()
    module = random_orion().eval()
    Xc, yc, Xq = episode(batch=1)
    config = OrionMSPConfig()
    assert config.isolate_queries is False
    with torch.no_grad():
        default = adapter.episode_logits(module, Xc, yc, Xq, TASK, config)
        isolated = adapter.episode_logits(module, Xc, yc, Xq, TASK, OrionMSPConfig(isolate_queries=True))
        alone = adapter.episode_logits(module, Xc, yc, Xq[:, :1], TASK, OrionMSPConfig(isolate_queries=True))
        alone_default = adapter.episode_logits(module, Xc, yc, Xq[:, :1], TASK, config)
    cost = (isolated - default).abs().max().item()
    print(f"isolating queries moves the logits by up to {cost:.1e}")
    assert cost > 1e-4
    torch.testing.assert_close(alone[:, 0], isolated[:, 0], atol=1e-5, rtol=0)  # isolated: batch-mates do not matter
    assert (alone_default[:, 0] - default[:, 0]).abs().max() > 1e-6  # the reference's: they do
