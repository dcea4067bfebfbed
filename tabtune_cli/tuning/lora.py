"""LoRA through Hugging Face peft: the adapter names the targets, peft does the rest."""

from __future__ import annotations

from torch import nn

from ..config import LoraSettings
from ..errors import TabTuneError
from ..models.base import ModelAdapter


def lora_config(adapter: ModelAdapter, module: nn.Module, settings: LoraSettings):
    """Return the peft LoraConfig that puts adapters on this model's chosen modules and packed parameters."""
    from peft import LoraConfig  # peft imports transformers: seconds, so only when LoRA is used

    target_modules, target_parameters = adapter.lora_targets(module, settings.target_modules)
    if not target_modules and not target_parameters:
        raise TabTuneError("lora.target_modules: no LoRA-capable layer under the given prefixes")
    if target_parameters and settings.lora_dropout:
        raise TabTuneError(f"lora.lora_dropout must be 0 for {adapter.title}: peft's LoRA on packed parameters "
                           f"(such as attention in_proj_weight) has no dropout")
    if settings.r < 1:
        raise TabTuneError(f"lora.r must be at least 1, got {settings.r}")
    return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=target_modules or None, target_parameters=target_parameters or None,
                      bias=settings.bias, modules_to_save=settings.modules_to_save)


def wrap(adapter: ModelAdapter, module: nn.Module, settings: LoraSettings):
    """Return ``module`` with LoRA adapters; only adapter (and ``modules_to_save``) weights train."""
    from peft import get_peft_model

    try:
        return get_peft_model(module, lora_config(adapter, module, settings))
    except ValueError as exc:
        raise TabTuneError(f"lora: {str(exc).splitlines()[0]}") from None


def load(module: nn.Module, path):
    """Return ``module`` with the adapters saved at ``path`` (peft's own loader)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(module, str(path))
