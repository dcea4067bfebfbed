"""peft's LoRA layers, computed from the factors: nothing the size of the frozen weight is built, and
the frozen weight gets no gradient.

peft's ``Linear`` adds ``lora_B(lora_A(x)) * scaling`` to the frozen output in three full-size steps
(B's output, its scaled copy, the sum), and its ``ParamWrapper`` (LoRA on a packed parameter through
``target_parameters``, e.g. TabICL's ``in_proj_weight``) rebuilds ``W + scaling·B·A`` on every call and
keeps it for backward, so backward computes a full-size gradient for that copy (base-ft's weight
gradient, which peft then discards). Here both go through ``low_rank.lora_linear``: ``x·Wᵀ + b`` with
``scaling·(x·Aᵀ)·Bᵀ`` added in place, and a backward that computes gradients for the factors and the
input only; beyond what the frozen layer keeps, backward keeps the rank-r ``x·Aᵀ``.

These are subclasses of peft's own layers with the same parameters, names and state-dict keys, so
adapters save, load (``PeftModel.from_pretrained``), merge and unload as peft's do; anything else in the
forward (variants such as DoRA, LoRA dropout or bias, merged or disabled adapters, mixed-adapter
batches, a base layer other than a plain ``nn.Linear``) takes peft's own forward. This module imports
peft: import it only with LoRA.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear, ParamWrapper
from torch import Tensor, nn

from .low_rank import lora_linear

PLAIN_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


class LowRankLinear(Linear):
    """peft's LoRA ``Linear`` on a plain ``nn.Linear``, through :func:`low_rank.lora_linear` (see the module docstring)."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if (args or kwargs or self.disable_adapters or self.merged or not adapters
                or type(self.base_layer) not in PLAIN_LINEAR
                or any(a in self.lora_variant or self.lora_B[a].bias is not None
                       or not isinstance(self.lora_dropout[a], nn.Identity) for a in adapters)):
            return super().forward(x, *args, **kwargs)
        factors = [(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]) for a in adapters]
        return lora_linear(self._cast_input_dtype(x, factors[0][0].dtype), self.base_layer.weight,
                           self.base_layer.bias, factors)


class LowRankParamWrapper(ParamWrapper):
    """peft's LoRA on one packed parameter, handed to its module as factors instead of a rebuilt weight.

    The wrapped module opts in by naming the parameter in ``low_rank_parameters``; for the duration of
    the call its ``low_rank_factors[name]`` holds ``[(A, B, scaling), ...]`` (one per active adapter),
    and it computes ``x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ`` itself. Any other module, or a case peft's own
    forward handles differently (merged, disabled, experts, low-precision weights), goes to peft.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.base_layer
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        param = self.get_param()
        if (self.disable_adapters or self.merged or not adapters or kwargs.get("adapter_names") is not None
                or self.parameter_name not in getattr(base, "low_rank_parameters", ())
                or self.num_experts != 1 or param.dim() != 2
                or param.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                or any(self.lora_B[a].bias is not None for a in adapters)):
            return super().forward(x, *args, **kwargs)
        factors = [(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]) for a in adapters]
        held = base.__dict__.setdefault("low_rank_factors", {})
        held[self.parameter_name] = factors
        try:
            return base(x, *args, **kwargs)
        finally:
            del held[self.parameter_name]


def _swap_classes(model: nn.Module, classes: dict) -> nn.Module:
    for layer in model.modules():
        if type(layer) in classes:
            layer.__class__ = classes[type(layer)]
    return model


def make_low_rank(model: nn.Module) -> nn.Module:
    """``model`` with each of peft's plain LoRA ``Linear`` and ``ParamWrapper`` layers turned into the
    low-rank forms above, in place (the class only: parameters, names and adapters stay as they are)."""
    return _swap_classes(model, {Linear: LowRankLinear, ParamWrapper: LowRankParamWrapper})


def make_plain(model: nn.Module) -> nn.Module:
    """Undo :func:`make_low_rank`: peft's own classes again, for peft calls that recognise only those
    (``add_adapter`` takes a low-rank ``ParamWrapper`` for a layer it cannot wrap)."""
    return _swap_classes(model, {LowRankLinear: Linear, LowRankParamWrapper: ParamWrapper})
