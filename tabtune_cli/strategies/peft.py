"""``strategy=peft``: LoRA fine-tuning with Hugging Face peft; only the adapters (and ``lora.modules_to_save``)
train, the base weights stay frozen, and a saved run keeps the adapters beside the base."""

from __future__ import annotations

from .base import Strategy, listed


class Peft(Strategy):
    name = "peft"
    description = "LoRA adapters only (Hugging Face peft)"
    lora = True
    export_title = "merged"

    def ignored(self, given, model, config):
        warnings = super().ignored(given, model, config)
        idle = sorted(k for k in given if k.startswith("lora."))
        if idle and model.adapters:
            warnings.append(f"{listed(idle)} ignored: model.adapters={model.adapters} brings its adapters with the "
                            f"LoRA settings they were trained with")
        return warnings

    def take_adapters(self, module, source):
        from ..tuning import lora

        return lora.load(module, source, trainable=True)

    def prepare(self, adapter, module, learnable, lora_settings, has_adapters):
        from ..tuning import lora

        return module if has_adapters else lora.wrap(adapter, module, lora_settings)

    def trained_state(self, module):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(module)

    def weights_to_save(self, module, base_state, has_adapters):
        return base_state  # the adapters go beside them (save_extra); a checkpoint rebuilds its own base

    def save_extra(self, module, folder):
        module.save_pretrained(folder)
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty card; the pipeline writes its own

    def restore(self, module, folder):
        from ..tuning import lora

        return lora.load(module, folder)

    def for_export(self, module):
        from peft.utils import ModulesToSaveWrapper

        from ..tuning import lora

        saved_modules = sum(isinstance(m, ModulesToSaveWrapper) for m in module.modules())
        module, lora_layers = lora.fold(module)
        return module, {"lora_layers": lora_layers, "saved_modules": saved_modules}
