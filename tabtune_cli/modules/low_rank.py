"""Low-rank maths in plain torch: ``x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ`` without building ``W + B·A``.

Below both the models (TabICL's attention computes its packed q/k/v through :func:`packed_linear`) and
tuning (peft's LoRA layers, ``modules.lora_layers``, compute through :func:`lora_linear`): it imports
torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, factors) -> Tensor:
    """``x·Wᵀ + b + Σ scaling·(x·Aᵀ)·Bᵀ`` over ``factors`` (``(A, B, scaling)`` for each active LoRA adapter),
    never building ``W + B·A`` nor anything else the size of the output beyond the output itself.

    With ``W`` frozen (peft training) a custom backward computes no gradient for ``W``, takes each
    product in the layout BLAS is fast at for rank r, and adds the adapters' share of the output and of
    the input's gradient in place; otherwise (``W`` trains, or autocast is on) one ``addmm`` a factor."""
    factors = list(factors)
    if not factors:
        return F.linear(x, weight, bias)
    if weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        out = F.linear(x, weight, bias)
        for A, B, scaling in factors:
            h = F.linear(x, A)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=scaling)
            out = flat.view(out.shape)
        return out
    As, Bs, scalings = zip(*factors)
    return _FrozenLoRALinear.apply(x, weight, bias, scalings, *As, *Bs).view(*x.shape[:-1], weight.shape[0])


class _FrozenLoRALinear(torch.autograd.Function):
    """``x·Wᵀ + b + Σ s·(x·Aᵀ)·Bᵀ`` with ``W`` frozen; backward keeps ``x`` and the rank-r ``x·Aᵀ``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scalings, *factors):
        As, Bs = factors[:len(scalings)], factors[len(scalings):]
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        hs = []
        for A, B, scaling in zip(As, Bs, scalings):
            h = flat @ A.t()
            out.addmm_(h, B.t(), alpha=scaling)
            hs.append(h)
        ctx.scalings = scalings
        ctx.save_for_backward(x, weight, *As, *Bs, *hs)
        return out  # (rows, out): shaped like x outside, so callers may modify views of it in place

    @staticmethod
    def backward(ctx, grad):
        x, weight, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        As, Bs, hs = rest[:n], rest[n:2 * n], rest[2 * n:]
        grad = grad.reshape(-1, grad.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        grad_As, grad_Bs = [], []
        for A, B, h, scaling in zip(As, Bs, hs, ctx.scalings):
            grad_h = torch.mm(B.t() * scaling, grad.t()).t()  # (r·out)(out·N), transposed: the fast layout
            grad_Bs.append(torch.mm(h.t(), grad).t() * scaling)
            grad_As.append(torch.mm(grad_h.t(), flat))
            if grad_x is not None:
                grad_x.addmm_(grad_h, A)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return (grad_x, None, grad_bias, None, *grad_As, *grad_Bs)


def packed_linear(module: nn.Module, name: str, x: Tensor, rows: slice | None = None) -> Tensor:
    """``x·W[rows]ᵀ + b[rows]`` for ``module``'s packed weight ``name`` (its bias: ``name`` with ``weight``
    read as ``bias``), plus ``scaling·(x·Aᵀ)·B[rows]ᵀ`` for each LoRA adapter on it (:func:`lora_linear`).

    The adapters' factors are those ``lora_layers.LowRankParamWrapper`` hands the module for the call
    (a module that names ``name`` in its ``low_rank_parameters``); ``W + B·A`` is never built."""
    weight = getattr(module, name)
    bias = getattr(module, name.replace("weight", "bias"), None)
    factors = module.__dict__.get("low_rank_factors", {}).get(name, ())
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
        factors = [(A, B[rows], scaling) for A, B, scaling in factors]
    return lora_linear(x, weight, bias, factors)
