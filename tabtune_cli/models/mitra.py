"""Mitra (AutoGluon's Tab2D), in tabtune's own code, loading the official checkpoints unchanged.

The architecture. Every cell of the table is a token: its value, quantile-normalised
against the context ("support") rows of its column, through ``Linear(1, dim)``. Each
row gets one more token in front, its label: a class embedding (classification) or
``Linear(1, dim)`` of the target (regression) for context rows, the learned ``y_mask``
for query rows. Each of the ``n_layers`` pre-norm layers attends across rows within
each column (context rows attend to context rows, query rows attend to context rows
only, so no query ever sees another query), then an MLP, then attention across the
tokens of each row, then an MLP. ``final_layer_norm`` + ``final_layer`` read each query
row's label token: class logits, or one value for regression.

Checkpoints: Hugging Face ``autogluon/mitra-classifier`` and ``autogluon/mitra-regressor``,
each a folder with ``config.json`` (``dim``, ``dim_output``, ``n_layers``, ``n_heads``,
``task``) and ``model.safetensors`` (the flat state dict). ``model.checkpoint=`` takes
that folder or its ``model.safetensors`` (``config.json`` beside it). State-dict keys and
shapes are the official ones and load strictly.

Padding. ``forward`` takes the reference's padding masks and honours them: padded
context rows take no part in the quantiles, the means, or anyone's attention, and
padded features are never attended to, so a padded batch gives the real rows the
outputs the unpadded one does (AutoGluon's CPU path ignores these masks). Without
padding, no mask is built and the computation is the reference's.

Inference follows AutoGluon's ``MitraClassifier`` / ``MitraRegressor`` without
fine-tuning: numeric columns arrive as the user gave them (``raw_numbers``: tabtune's
standardising would not matter to the quantile ranks, but its 4-sigma clipping makes
outliers tie); a gap is filled with its column's mean over the context, then float32;
features constant over the context are dropped; the regression target is
min-max scaled to [0, 1] by the context; plain softmax over the task's classes
(``softmax_temperature`` 1.0), members averaged; the context is capped at
``max_context_rows`` (8,192, AutoGluon's ``max_samples_support``) and queries go in
chunks of 1,024 rows (``max_samples_query``), so memory stays flat as query rows grow.
Where we differ: AutoGluon's one member multiplies every feature by a random sign
(``random_mirror_x``) and mirrors a regression target (``y -> 1 - y``) at random, drawn
from the global NumPy state, so two calls can disagree and a fine-tuned model is asked
about signs it was not tuned on. Our member 0 is the table as given (what fine-tuning
trains on); members past the first take seeded random signs, a random target mirror
(regression) and a cyclic class shift (classification). More than 10 classes go
through tabtune's class hierarchy (AutoGluon refuses them). Features need no
shuffling: attention across a row's tokens has no positions, so the output does not
depend on column order. Two more of AutoGluon's choices are not taken: it runs the
forward under bfloat16 autocast (``precision="bfloat16"``, on CPU too), tabtune in
float32; and it fits its preprocessing (the gap means, the constant features, the
regression target's min and max) on an 80% split of the training rows, a split
meant for fine-tuning's validation, while every row is support; tabtune takes them
from the support rows themselves (``tests/parity/test_mitra_defaults_parity.py``
measures each).

LoRA. Every projection is its own ``nn.Linear`` called as a module, so Hugging Face
peft reaches them without patching. The seed's defaults ``x_embedding``, ``layers`` and
``final_layer`` cover the cell embedding, every attention's ``q``/``k``/``v``/``o`` and
every feed-forward ``linear1..4``, and the output layer; ``y_embedding`` (an
``nn.Embedding`` for classes) can be added with ``lora.target_modules``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from .base import ModelAdapter, Task, class_shift_probs, load_weights
from .specs.mitra import MitraConfig, MitraSpec, read_folder  # noqa: F401 (MitraConfig: re-exported)
QUERY_CHUNK = 1024  # AutoGluon's max_samples_query
N_QUANTILES = 999


def fill_gaps(X_context: Tensor, X_query: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., rows, features)`` context and query with every gap (NaN, or a non-finite value) filled with its
    column's mean over the context rows (0 for a column with no value there), computed in the inputs' dtype:
    what AutoGluon's Mitra preprocessor does before anything else. The inputs are not modified."""
    context_gaps = ~torch.isfinite(X_context)
    if not context_gaps.any() and bool(torch.isfinite(X_query).all()):
        return X_context, X_query
    mean = torch.nanmean(torch.where(context_gaps, torch.nan, X_context), dim=-2, keepdim=True).nan_to_num(0.0)
    return (torch.where(context_gaps, mean, X_context),
            torch.where(torch.isfinite(X_query), X_query, mean))


def quantile_normalise(x_support: Tensor, x_query: Tensor, padding_obs_support: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each feature as its rank among the context's quantiles, standardised by the context rows.

    A value becomes the number of the context's 999 quantiles (0.001 .. 0.999) below it,
    divided by the context length, then centred and scaled by the context rows' mean and
    (population) variance; a column constant over the context becomes 0. Padded context rows
    count nowhere. The inputs are not modified.
    """
    b, n_support, _ = x_support.shape
    q = torch.arange(1, N_QUANTILES + 1, dtype=torch.float, device=x_support.device) / (N_QUANTILES + 1)
    if padding_obs_support is None or not padding_obs_support.any():
        valid = torch.ones(b, n_support, dtype=torch.bool, device=x_support.device)
        quantiles = torch.quantile(x_support, q, dim=1).permute(1, 2, 0)  # (b, f, q)
    else:
        valid = ~padding_obs_support
        quantiles = torch.stack([torch.quantile(x_support[i][valid[i]], q, dim=0).T for i in range(b)])
    quantiles = quantiles.contiguous()
    n_valid = valid.sum(1)[:, None, None]  # (b, 1, 1), an integer count like the reference's

    def ranks(x: Tensor) -> Tensor:
        return torch.searchsorted(quantiles, x.transpose(1, 2).contiguous()).transpose(1, 2).float() / n_valid

    support, query = ranks(x_support), ranks(x_query)
    keep = valid[:, :, None]
    support = torch.where(keep, support, 0.0)
    mean = support.sum(1, keepdim=True) / n_valid
    support, query = support - mean, query - mean
    support = torch.where(keep, support, 0.0)
    var = (support ** 2).sum(1, keepdim=True) / n_valid
    support, query = support / var.sqrt(), query / var.sqrt()
    return torch.where(var == 0, 0.0, support), torch.where(var == 0, 0.0, query)


class CellEmbedding(nn.Module):
    """(b, s, f) normalised cells -> (b, s, f, dim) tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.x_embedding = nn.Linear(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.x_embedding(x.unsqueeze(-1))


class LabelEmbedding(nn.Module):
    """Label tokens: the context rows' labels embedded, ``y_mask`` for every query row."""

    def __init__(self, dim: int, n_classes: int | None):
        super().__init__()
        # classes: an embedding per class id; regression (n_classes None): a linear map of the target
        self.y_embedding = nn.Embedding(n_classes, dim) if n_classes else nn.Linear(1, dim)
        self.y_mask = nn.Embedding(1, dim)

    def forward(self, y_support: Tensor, padding_obs_support: Tensor | None, n_query: int) -> tuple[Tensor, Tensor]:
        if isinstance(self.y_embedding, nn.Embedding):
            labels = y_support.long()
            if padding_obs_support is not None:
                labels = labels.masked_fill(padding_obs_support, 0)  # padded rows may hold any placeholder
            support = self.y_embedding(labels)
        else:
            support = self.y_embedding(y_support.float().unsqueeze(-1))
        if padding_obs_support is not None:
            support = support.masked_fill(padding_obs_support[..., None], 0.0)
        # called as a module (not its .weight), so a LoRA adapter on y_mask is live
        query = self.y_mask(torch.zeros(y_support.shape[0], n_query, dtype=torch.long, device=y_support.device))
        return support.unsqueeze(2), query.unsqueeze(2)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections; ``key_mask`` (batch, keys) True = attend."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: Tensor, key_value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        def heads(x: Tensor) -> Tensor:
            return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key_value)),
                                             heads(self.v(key_value)), attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(-2))


class Layer(nn.Module):
    """Attention across rows within each column, an MLP, attention across each row's tokens, an MLP."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.layer_norm1, self.layer_norm2, self.layer_norm3, self.layer_norm4 = (nn.LayerNorm(dim) for _ in range(4))
        self.attention1 = Attention(dim, n_heads)
        self.attention2 = Attention(dim, n_heads)
        self.linear1, self.linear3 = nn.Linear(dim, 4 * dim), nn.Linear(dim, 4 * dim)
        self.linear2, self.linear4 = nn.Linear(4 * dim, dim), nn.Linear(4 * dim, dim)

    def forward(self, support: Tensor, query: Tensor, support_mask: Tensor | None,
                token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``support`` (b, s, t, d), ``query`` (b, q, t, d); masks True = real: (b, s) rows, (b, t) tokens."""
        b, n_support, n_tokens, d = support.shape
        n_query = query.shape[1]

        # across rows, one column at a time: (b t) s d; queries read the context rows only
        s, q = self.layer_norm1(support), self.layer_norm1(query)
        s = s.transpose(1, 2).reshape(b * n_tokens, n_support, d)
        q = q.transpose(1, 2).reshape(b * n_tokens, n_query, d)
        rows = None if support_mask is None else support_mask.repeat_interleave(n_tokens, 0)
        s_att, q_att = self.attention1(s, s, rows), self.attention1(q, s, rows)
        support = support + s_att.reshape(b, n_tokens, n_support, d).transpose(1, 2)
        query = query + q_att.reshape(b, n_tokens, n_query, d).transpose(1, 2)
        support, query = (x + self.linear2(F.gelu(self.linear1(self.layer_norm2(x)))) for x in (support, query))

        # across the tokens of each row: (b s) t d
        def across_tokens(x: Tensor) -> Tensor:
            n = x.shape[1]
            flat = self.layer_norm3(x).reshape(b * n, n_tokens, d)
            mask = None if token_mask is None else token_mask.repeat_interleave(n, 0)
            return x + self.attention2(flat, flat, mask).reshape(b, n, n_tokens, d)

        support, query = across_tokens(support), across_tokens(query)
        support, query = (x + self.linear4(F.gelu(self.linear3(self.layer_norm4(x)))) for x in (support, query))
        return support, query


class Tab2D(nn.Module):
    """Mitra's Tab2D: the official constructor config, the official state-dict keys, the reference's forward."""

    def __init__(self, dim: int, dim_output: int, n_layers: int, n_heads: int, task: str):
        super().__init__()
        task = str(task).upper()
        if task not in ("CLASSIFICATION", "REGRESSION"):
            raise TabTuneError(f"Mitra config: task must be CLASSIFICATION or REGRESSION, got {task!r}")
        self.dim, self.dim_output, self.n_layers, self.n_heads, self.task = dim, dim_output, n_layers, n_heads, task
        self.x_embedding = CellEmbedding(dim)
        # the reference embeds regression targets as classes too when its head has several outputs
        label_classes = dim_output if task == "CLASSIFICATION" or dim_output > 1 else None
        self.y_embedding = LabelEmbedding(dim, label_classes)
        self.layers = nn.ModuleList(Layer(dim, n_heads) for _ in range(n_layers))
        self.final_layer_norm = nn.LayerNorm(dim)
        self.final_layer = nn.Linear(dim, dim_output)

    def official_config(self) -> dict:
        """The ``config.json`` this module is built from."""
        return {"dim": self.dim, "dim_output": self.dim_output, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "task": self.task}

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, padding_features: Tensor | None = None,
                padding_obs_support: Tensor | None = None, padding_obs_query: Tensor | None = None) -> Tensor:
        """The query rows' outputs: (b, n_q, dim_output) logits, or (b, n_q) values for a 1-output regressor.

        Masks are True where an entry is padding. ``padding_obs_query`` is accepted for the reference's
        signature; query rows never attend to each other, so their padding changes nothing."""
        if padding_obs_support is not None and not padding_obs_support.any():
            padding_obs_support = None
        if padding_features is not None and not padding_features.any():
            padding_features = None
        xs, xq = quantile_normalise(x_support.float(), x_query.float(), padding_obs_support)
        ys, yq = self.y_embedding(y_support, padding_obs_support, x_query.shape[1])
        support = torch.cat([ys, self.x_embedding(xs)], dim=2)  # (b, n_s, f+1, d): the label token first
        query = torch.cat([yq, self.x_embedding(xq)], dim=2)
        support_mask = None if padding_obs_support is None else ~padding_obs_support
        token_mask = None if padding_features is None else F.pad(~padding_features, (1, 0), value=True)
        for layer in self.layers:
            if torch.is_grad_enabled() and self.training:  # as the reference: recompute activations in backward
                support, query = checkpoint(layer, support, query, support_mask, token_mask, use_reentrant=False)
            else:
                support, query = layer(support, query, support_mask, token_mask)
        out = self.final_layer(self.final_layer_norm(query[:, :, 0]))
        return out[..., 0] if self.task == "REGRESSION" and self.dim_output == 1 else out


class MitraAdapter(MitraSpec, ModelAdapter):

    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {**self.random_size(config), "dim_output": self.max_classes if task.is_classification else 1,
                            "task": task.kind.upper()}
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        architecture, weights = read_folder(path)
        if str(architecture["task"]).upper() != task.kind.upper():
            raise TabTuneError(f"{path.parent}: this is a Mitra {str(architecture['task']).lower()} checkpoint, "
                               f"but the task is {task.kind}")
        try:
            state = load_file(weights)
        except Exception as exc:
            raise TabTuneError(f"{weights}: not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
        module = self.from_architecture(architecture)
        load_weights(module, state, weights)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        return Tab2D(**architecture)

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """The official folder layout (AutoGluon's ``Tab2D.save_pretrained``): ``model.safetensors`` (the flat
        state dict) and ``config.json`` beside it, each written atomically; returns the weights file."""
        folder = Path(path)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        weights = rundir.write_file(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
        rundir.write_json(folder / "config.json", module.official_config())
        return weights

    # -- forward -------------------------------------------------------------------------------
    @staticmethod
    def _scale_target(y_context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The context target min-max scaled to [0, 1] per episode (AutoGluon's y scaling), with its min and range."""
        low = y_context.min(-1, keepdim=True).values
        span = (y_context.max(-1, keepdim=True).values - low).clamp_min(1e-8)
        return (y_context - low) / span, low, span

    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        X_context, X_query = fill_gaps(X_context, X_query)
        if task.is_classification:
            return module(X_context, y_context, X_query)[..., : task.n_classes]
        scaled, low, span = self._scale_target(y_context.float())
        self._episode_scale = (low, span)
        return module(X_context, scaled, X_query)

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        if task.is_classification:
            return super().episode_loss(outputs, y_query, task)
        low, span = self._episode_scale
        return F.mse_loss(outputs, (y_query.float() - low) / span)  # AutoGluon's regression_loss "mse"

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        module.eval()
        # gaps filled in the numbers' own precision (float64 from the pipeline), then float32 as AutoGluon's
        X_context, X_query = fill_gaps(torch.as_tensor(X_context), torch.as_tensor(X_query))
        varies = X_context.amin(0) != X_context.amax(0)
        if varies.sum() > self.max_features:
            raise TabTuneError(f"Mitra reads at most {self.max_features} features; this table has {int(varies.sum())} "
                               f"after preprocessing (drop columns with dataset.drop_columns)")
        Xc = X_context[:, varies].to(device=device, dtype=torch.float32)[None]
        Xq_all = X_query[:, varies].to(device=device, dtype=torch.float32)
        y = torch.as_tensor(y_context, device=device)[None]
        if not task.is_classification:
            y, low, span = self._scale_target(y.float())
        total = 0.0
        for member in range(config.n_estimators):
            rng = np.random.default_rng(member)
            signs = rng.choice([1.0, -1.0], size=Xc.shape[-1]) if member else np.ones(Xc.shape[-1])
            sign = torch.as_tensor(signs, dtype=torch.float32, device=device)
            if task.is_classification:
                shift = member % task.n_classes
                y_member = (y + shift) % task.n_classes
            else:
                mirror = member > 0 and bool(rng.integers(2))
                y_member = 1 - y if mirror else y
            parts = [module(Xc * sign, y_member, Xq_all[None, start:start + QUERY_CHUNK] * sign)[0]
                     for start in range(0, len(Xq_all), QUERY_CHUNK)]
            out = torch.cat(parts).float()
            if task.is_classification:
                probs = torch.softmax(out[:, : task.n_classes] / config.softmax_temperature, dim=-1)
                total = total + class_shift_probs(probs.cpu().numpy(), shift)
            else:
                value = 1 - out if mirror else out
                total = total + (value[None] * span + low)[0].cpu().numpy()
        pred = total / config.n_estimators
        return pred / pred.sum(axis=1, keepdims=True) if task.is_classification else pred

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        targets = self.modules_under(module, prefixes)
        return [n for n, m in targets.items() if type(m) in (nn.Linear, nn.Embedding)], []
