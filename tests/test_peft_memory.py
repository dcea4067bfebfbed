"""peft trains only its adapters, and computes them without rebuilding the frozen weights; gradient
checkpointing changes memory, never the numbers (issue #15; figures in benchmarks/peft_memory.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tabtune_cli import TabularPipeline
from tabtune_cli.config import LoraSettings, ModelConfig
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task, checkpoint_blocks
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.tuning import lora

from conftest import SEED, TINY_MODEL, TUNE_PARAMS

TASK = Task("classification", 3)


def tiny(name="tabicl", peft=False):
    """A tiny random-weight model (LoRA B matrices non-zero, so adapters change the outputs)."""
    adapter = get_adapter(name)
    torch.manual_seed(0)
    module, _ = adapter.build(ModelConfig(name=name, pretrained=False, size="tiny"), TASK)
    if peft:
        module = lora.wrap(adapter, module, LoraSettings(r=4))
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.1)
    return adapter, module.train()  # base-ft trains what the model trains (TabICL's rotary frequencies stay fixed)


def episode():
    g = torch.Generator().manual_seed(1)
    Xc, Xq = torch.randn(2, 48, 5, generator=g), torch.randn(2, 16, 5, generator=g)
    yc = torch.randint(0, 3, (2, 48), generator=g)
    yc[:, :3] = torch.arange(3)
    return Xc, yc, Xq, torch.randint(0, 3, (2, 16), generator=g)


def loss_and_grads(adapter, module, saved: list | None = None):
    """One episode's loss and gradients; ``saved`` collects the bytes the forward keeps for backward."""
    Xc, yc, Xq, yq = episode()
    module.zero_grad(set_to_none=True)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = adapter.episode_loss(adapter.episode_logits(module, Xc, yc, Xq, TASK), yq, TASK)
    loss.backward()
    if saved is not None:
        saved.append(sum(storages.values()))
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_peft_steps_give_frozen_weights_no_gradient_and_no_optimizer_state(split):
    X_train, y_train, _, _ = split
    steps = []

    def after_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        steps.append(({id(p) for p in params}, {id(p) for p in optimizer.state}, all(p.grad is not None for p in params)))

    hook = register_optimizer_step_post_hook(after_step)
    try:
        pipe = TabularPipeline("tabicl", tuning_strategy="peft", model_params=TINY_MODEL, device="cpu", seed=SEED,
                               tuning_params={**TUNE_PARAMS["peft"], "epochs": 1, "steps_per_epoch": 3})
        pipe.fit(X_train, y_train)
    finally:
        hook.remove()
    named = dict(pipe.module_.named_parameters())
    lora_ids = {id(p) for n, p in named.items() if "lora_" in n}
    assert len(steps) == 3 and lora_ids
    for optimized, with_state, all_have_grads in steps:
        assert optimized == lora_ids  # the optimizer holds the LoRA parameters, nothing else ...
        assert with_state == lora_ids  # ... and keeps state for those alone
        assert all_have_grads
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)
    # a gradient of a frozen weight would still be there: nothing clears what the optimizer does not hold
    assert [n for n in frozen if named[n].grad is not None] == []


def test_lora_is_computed_from_its_factors_as_peft_computes_it():
    from peft.tuners.lora import Linear, ParamWrapper

    from tabtune_cli.modules.lora_layers import LowRankLinear, LowRankParamWrapper, make_low_rank

    adapter, ours = tiny(peft=True)
    kinds = {type(m) for m in ours.modules()}
    assert {LowRankLinear, LowRankParamWrapper} <= kinds and not {Linear, ParamWrapper} & kinds
    peft_own = copy.deepcopy(ours)
    for layer in peft_own.modules():  # back to peft's classes: W + B·A rebuilt per call, B(A(x)) * s added
        if type(layer) in (LowRankLinear, LowRankParamWrapper):
            layer.__class__ = layer.__class__.__mro__[1]
    loss, grads = loss_and_grads(adapter, ours)
    expected_loss, expected = loss_and_grads(adapter, peft_own)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected.keys() and all("lora_" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n], atol=1e-5, rtol=1e-4)
    # the packed in_proj_weight is never rebuilt: no parametrization, its version counter unmoved
    packed = [p for n, p in ours.named_parameters() if n.endswith("in_proj_weight")]
    versions = [p._version for p in packed]
    registered = []
    original = torch.nn.utils.parametrize.register_parametrization
    torch.nn.utils.parametrize.register_parametrization = lambda *a, **k: registered.append(a) or original(*a, **k)
    try:
        loss_and_grads(adapter, ours)
    finally:
        torch.nn.utils.parametrize.register_parametrization = original
    assert packed and registered == [] and [p._version for p in packed] == versions
    assert make_low_rank(ours) is ours  # idempotent


@pytest.mark.parametrize("peft", [False, True], ids=["base-ft", "peft"])
def test_tabicl_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(peft):
    adapter, module = tiny(peft=peft)
    checkpointed = copy.deepcopy(module)
    adapter.set_gradient_checkpointing(checkpointed, True)
    saved = []
    loss, grads = loss_and_grads(adapter, module, saved)
    loss_c, grads_c = loss_and_grads(adapter, checkpointed, saved)
    assert saved[1] < 0.5 * saved[0]  # the blocks' insides are recomputed in backward, not kept
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=0)
    assert grads_c.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=0)
    adapter.set_gradient_checkpointing(checkpointed, False)
    loss_and_grads(adapter, checkpointed, saved)
    assert saved[2] == saved[0]


def test_generic_gradient_checkpointing_reaches_the_block_stacks_with_the_same_gradients(caplog):
    adapter, module = tiny("tabdpt")  # no switch of its own: the default, checkpoint_blocks
    checkpointed = copy.deepcopy(module)
    adapter.set_gradient_checkpointing(checkpointed, True)
    assert checkpointed.state_dict().keys() == module.state_dict().keys()
    saved = []
    loss, grads = loss_and_grads(adapter, module, saved)
    loss_c, grads_c = loss_and_grads(adapter, checkpointed, saved)
    assert saved[1] < 0.5 * saved[0]
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=0)
    adapter.set_gradient_checkpointing(checkpointed, False)
    assert {type(m) for m in checkpointed.modules()} == {type(m) for m in module.modules()}
    # nano runs its blocks through methods of their own, not forward: nothing to recompute, and it says so
    adapter, module = tiny("nano")
    assert checkpoint_blocks(module, True, "nano") >= 2
    with caplog.at_level("WARNING", logger="tabtune"):
        loss_and_grads(adapter, module)
    assert "nothing is recomputed" in caplog.text


def test_the_gradient_checkpointing_setting_reaches_the_model_and_tabpfn_refuses_it(split):
    X_train, y_train, _, _ = split
    tuning = {**TUNE_PARAMS["peft"], "epochs": 1, "steps_per_epoch": 1, "gradient_checkpointing": True}
    pipe = TabularPipeline("tabicl", tuning_strategy="peft", tuning_params=tuning, model_params=TINY_MODEL,
                           device="cpu", seed=SEED).fit(X_train, y_train)
    switched = [m.recompute for m in pipe.module_.modules() if hasattr(m, "recompute")]
    assert switched and all(switched)
    with pytest.raises(TabTuneError, match="gradient_checkpointing"):
        get_adapter("tabpfn").set_gradient_checkpointing(torch.nn.Module(), True)
