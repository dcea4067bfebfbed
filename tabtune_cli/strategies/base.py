"""The strategy seam: what a strategy is to the pipeline and the commands.

A strategy decides what trains (``prepare``), which weights a saved pipeline keeps and how they come back
(``weights_to_save``, ``save_extra``, ``restore``), what ``tabtune merge`` / ``export`` make of a run
(``for_export``), and which of the keys it is given it ignores (``ignored``). ``pipeline.py`` and
``commands/`` ask it these questions and name no strategy; the registry (``strategies/__init__.py``) lists
them, and ``tests/test_strategies.py`` holds every one to this contract.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..config import LoraSettings, ModelConfig, StrategyConfig

if TYPE_CHECKING:  # validation (commands/train.plain_configs) asks strategies its questions without torch
    from torch import nn


def listed(keys: list[str]) -> str:
    """``a is`` / ``a and b are`` / ``a, b and c are``: the keys a warning names."""
    return f"{keys[0]} is" if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]} are"


class Strategy:
    """One way to tune a model. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    description: ClassVar[str]                    # ``tabtune ls``: what trains
    config_class: ClassVar[type] = StrategyConfig  # the schema of its keys (``strategy.*``)
    trains: ClassVar[bool] = True                 # runs the training loop on episodes of the training rows
    lora: ClassVar[bool] = False                  # trains LoRA adapters: reads the ``lora`` group, saves adapters
    changes_weights: ClassVar[bool] = True        # the model's weights differ from its checkpoint after a fit
    export_title: ClassVar[str] = "exported"      # what ``tabtune merge`` / ``export`` call the file it writes
    saves_trained_weights: ClassVar[bool] = False  # model.safetensors holds trained weights, not the base

    def reads(self, config: StrategyConfig) -> set[str]:
        """The ``strategy.*`` keys this strategy acts on (every key of its schema, when it trains)."""
        return {f.name for f in dataclasses.fields(config)} if self.trains else {"name", "show_progress"}

    def ignored(self, given: set[str], model: ModelConfig, config: StrategyConfig) -> list[str]:
        """A warning for each key in ``given`` (dotted: ``strategy.epochs``, ``lora.r``) this strategy ignores."""
        warnings = []
        idle = sorted(k for k in given if k.startswith("strategy.") and k.split(".", 1)[1] not in self.reads(config))
        if idle:
            warnings.append(f"{listed(idle)} ignored by strategy={self.name}: no training")
        idle = sorted(k for k in given if k.startswith("lora."))
        if idle and not self.lora:
            warnings.append(f"{listed(idle)} ignored by strategy={self.name}: only strategy=peft trains LoRA adapters")
        return warnings

    def check(self, config: StrategyConfig) -> None:
        """Refuse values of this strategy's own keys that cannot work (one line naming the key)."""

    def check_model(self, spec) -> None:
        """Refuse a model (its ``ModelSpec``: no torch) this strategy cannot tune, in one line."""

    # -- the module ------------------------------------------------------------------------------------
    def take_adapters(self, module: nn.Module, source: Path) -> nn.Module:
        """``model.adapters``: another run's LoRA adapters over ``module``; folded in, the weights stay plain."""
        from ..tuning import lora

        return lora.fold(lora.load(module, source, trainable=False))[0]

    def prepare(self, adapter, module: nn.Module, learnable: set[str], lora_settings: LoraSettings,
                has_adapters: bool) -> nn.Module:
        """``module`` ready to train (or not): what trains has ``requires_grad``. ``learnable``: the parameters
        the model itself trains (a buffer-like parameter built frozen stays frozen); ``has_adapters``:
        ``model.adapters`` already brought adapters (``take_adapters``)."""
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def trained_state(self, module: nn.Module) -> dict:
        """The tensors ``save_checkpoint_path`` writes: what training changed."""
        return module.state_dict()

    def learned_context(self, adapter, task, config: StrategyConfig, X, y, seed: int, device):
        """Context rows that train instead of weights (``strategy=context``), from the training rows; None:
        the episodes' context is the real rows."""
        return None

    def final_context(self, learned, X, y):
        """The context a fitted pipeline predicts with, given the real rows ``(X, y)`` (training, then
        validation): those rows, unless ``learned`` rows replace or join them."""
        return X, y

    # -- saving and loading --------------------------------------------------------------------------
    def weights_to_save(self, module: nn.Module, base_state: dict | None, has_adapters: bool) -> dict | None:
        """The weights a saved pipeline keeps in ``model.safetensors`` (None: the checkpoint rebuilds them):
        adapters folded in from ``model.adapters``, or random base weights no file holds."""
        if has_adapters:
            return module.state_dict()
        return base_state

    def save_extra(self, module: nn.Module, folder: Path) -> None:
        """Files of its own beside ``model.safetensors`` (peft: the adapters)."""

    def restore(self, module: nn.Module, folder: Path) -> nn.Module:
        """The module as it was saved, from the base weights and ``save_extra``'s files."""
        return module

    def for_export(self, module: nn.Module) -> tuple[nn.Module, dict]:
        """The plain module ``tabtune merge`` / ``export`` writes, and facts for its summary."""
        return module, {}
