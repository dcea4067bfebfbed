"""``strategy=base-ft``: full fine-tuning; every weight the model itself trains learns from episodes."""

from __future__ import annotations

from .base import Strategy


class BaseFT(Strategy):
    name = "base-ft"
    description = "every weight"
    saves_trained_weights = True

    def prepare(self, adapter, module, learnable, lora_settings, has_adapters):
        # what the model itself trains: a parameter built frozen (TabICL's fixed rotary frequencies) stays frozen
        for name, p in module.named_parameters():
            p.requires_grad_(name in learnable)
        return module

    def weights_to_save(self, module, base_state, has_adapters):
        return module.state_dict()

