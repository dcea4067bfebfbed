"""Helpers shared by the engine's tests (test_training, test_checkpoints, test_episodes, test_errors,
test_regression): they drive TabICL's tiny random-weight model."""

from __future__ import annotations

import torch
from peft import PeftModel

from tabtune_cli.config import ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.models.tabicl import TabICLAdapter
from tabtune_cli.pipeline import TabularPipeline as _TabularPipeline



class TabularPipeline(_TabularPipeline):
    """These tests exercise the engine on TabICL (the library's default model is nano)."""

    def __init__(self, model_name="tabicl", *args, **kwargs):
        super().__init__(model_name, *args, **kwargs)

CPU = torch.device("cpu")


# ---- helpers -------------------------------------------------------------------------------------
def initial_module(pipe) -> torch.nn.Module:
    """The module ``pipe.fit`` started from: fit seeds torch with ``pipe.seed`` right before building."""
    torch.manual_seed(pipe.seed)
    module, _ = get_adapter("tabicl").build(pipe.model_config_, pipe.task_)
    return module


def base_weights(module) -> dict[str, torch.Tensor]:
    """State dict of the underlying model under its own key names (peft's wrapping and adapters removed)."""
    if not isinstance(module, PeftModel):
        return dict(module.state_dict())
    out = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            continue
        out[key.removeprefix("base_model.model.").replace(".base_layer", "")] = value
    return out


def lora_weights(module: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def changed_keys(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def noisy_tiny_module(seed: int = 1):
    """A tiny TabICL whose all-zero tensors (biases, ssmax output layers) hold small noise, like trained weights."""
    torch.manual_seed(seed)
    adapter = TabICLAdapter()
    module, architecture = adapter.build(ModelConfig(pretrained=False, size="tiny"), Task("classification", 2))
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    assert not any(t.is_floating_point() and not t.any() for t in module.state_dict().values())
    return adapter, module, architecture


def toy_inputs(n_context=40, n_query=10, n_features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1, n_context + n_query, n_features, generator=g)
    y = (X[0, :n_context, 0] > 0).float()[None]
    return X, y
