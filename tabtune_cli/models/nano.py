"""nano: tabtune's own small in-context model, pretrained on synthetic tables and shipped in the package.

The architecture is deliberately plain so that it trains on a CPU: each row is
embedded by one linear map of its (normalised, zero-padded) features, context
rows add an embedding of their label, and a stack of pre-norm transformer
blocks lets every row attend to the context rows only (so query rows never see
each other or any label but the context's). A small MLP reads class logits off
each query row. q/k/v/out and the MLPs are separate ``nn.Linear`` layers, so
Hugging Face peft reaches all of them with ordinary LoRA.

Features are normalised inside the model with the context rows' statistics
and scaled by sqrt(max_features / n_features), so a table's scale and width
look alike to the model whatever they were.

The adapter decides what the model sees of a user's table, the same way when
it fine-tunes and when it predicts: tables wider than ``max_input_features``
keep the columns that best separate the classes in the context (ANOVA F), and
the ensemble members take turns over views of the table: the features as they
are, their context quantiles mapped to a normal ("quantile"), and the leading
principal components of all the columns ("pca", which still sees what the
column selection drops on wide tables). A model this small is strongest on the
narrow tables the prior draws most often, and the views disagree in useful
ways on skewed, categorical and wide tables.

The ensemble's mean is underconfident (most on many classes and imbalanced
tables), so by default ``predict`` calibrates it: each half of the context is
predicted from the other half, and one scale of the log-probabilities plus an
offset per class, fitted to those rows, are applied to the queries.

The context is encoded once. Since queries attend to the context rows only and
the context rows to each other, each layer's context keys and values depend on the
context alone; so does everything else ``predict`` derives from it: each view's
fitted map (kept columns, sorted context values, principal axes), each member's
feature order, class shift, normalisation statistics and per-layer keys/values,
and the calibration map. ``predict`` keeps them in a ``ContextCache`` (one context:
about 0.5 MiB a context row at the shipped size and 64 members, 1 GiB for 2,048
rows), keyed on the context's content, the weights' versions and the settings, so
a fitted pipeline pays for its context once and a fine-tuning step or an adapter
swap rebuilds it. A query's answer is computed by the same operations whether the
context came from the cache or not (``adapter.cache_context = False`` turns the
cache off); ``NanoICL.forward`` itself runs as context pass then query pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from scipy.optimize import minimize
from scipy.special import softmax
from torch import Tensor, nn

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from .base import ContextCache, ModelAdapter, Task, class_shift_probs, load_weights
from .specs.nano import NanoConfig, NanoSpec, View, shipped_checkpoint

CLIP = 5.0
TAIL = 1e-7  # the quantile view maps onto [-5.2, 5.2]


def class_separation(X_context: Tensor, y_context: Tensor) -> Tensor:
    """Per feature, between-class over within-class sum of squares in the context (ANOVA F up to a constant).

    ``X_context`` is ``(batch, rows, features)``, ``y_context`` ``(batch, rows)``; returns ``(batch, features)``.
    """
    onehot = F.one_hot(y_context.long()).to(X_context.dtype)                 # (B, n, C)
    counts = onehot.sum(dim=1).unsqueeze(-1)                                # (B, C, 1)
    class_means = onehot.transpose(1, 2) @ X_context / counts.clamp(min=1)  # (B, C, F)
    grand = X_context.mean(dim=1, keepdim=True)                             # (B, 1, F)
    between = (counts * (class_means - grand) ** 2).sum(dim=1)
    within = ((X_context - onehot @ class_means) ** 2).sum(dim=1)
    return between / within.clamp(min=1e-12)


def separating_columns(X_context: Tensor, y_context: Tensor, limit: int) -> Tensor | None:
    """(batch, ``limit``) indices of the columns that best separate the context's classes, in their given
    order; None when the table is not wider than ``limit``."""
    if X_context.shape[-1] <= limit:
        return None
    return class_separation(X_context, y_context).topk(limit, dim=-1).indices.sort(dim=-1).values


def take_columns(X: Tensor, keep: Tensor | None) -> Tensor:
    return X if keep is None else X.gather(-1, keep.unsqueeze(1).expand(-1, X.shape[1], -1))


def select_features(X_context: Tensor, y_context: Tensor, X_query: Tensor, limit: int):
    """Keep the ``limit`` columns that best separate the context's classes, in their given order."""
    keep = separating_columns(X_context, y_context, limit)
    return take_columns(X_context, keep), take_columns(X_query, keep)


def quantile_map(ordered: Tensor, X: Tensor) -> Tensor:
    """``X``'s mid-ranks among the sorted context values ``ordered`` (batch, features, rows), mapped
    through the normal quantile function."""
    n = ordered.shape[-1]
    values = X.transpose(1, 2).contiguous()
    # ties share the middle of their ranks; the context's extremes (and beyond) go to the far tails
    rank = (torch.searchsorted(ordered, values) + torch.searchsorted(ordered, values, right=True) - 1) / 2
    level = (rank.double() / max(n - 1, 1)).clamp(TAIL, 1 - TAIL)
    return torch.special.ndtri(level).transpose(1, 2).to(X.dtype)


def quantile_view(X_context: Tensor, X_query: Tensor):
    """Each feature's mid-rank among the context rows, mapped through the normal quantile function."""
    ordered = X_context.transpose(1, 2).contiguous().sort(dim=-1).values     # (B, F, n)
    return quantile_map(ordered, X_context), quantile_map(ordered, X_query)


def pca_axes(X_context: Tensor, limit: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, std, axes)``: the leading ``limit`` principal axes of the standardised context (per table of
    the batch; axes with (numerically) no variance in any table are dropped).

    They are statistics fitted on the context, as a preprocessor's are: no gradient flows through them (the
    rows they map keep theirs). The SVD's own gradient divides by differences of singular values, which a
    table with constant or repeated columns makes zero: learned context rows (strategy=context) went NaN."""
    X_context = X_context.detach()
    mean = X_context.mean(dim=1, keepdim=True)
    std = X_context.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    _, singular, axes = torch.linalg.svd(((X_context - mean) / std).double(), full_matrices=False)  # (B, k, F)
    rank = int((singular > 1e-6 * singular[:, :1].clamp(min=1e-12)).sum(dim=-1).max())
    return mean, std, axes[:, : max(1, min(limit, rank))].transpose(1, 2)


def pca_map(fitted: tuple[Tensor, Tensor, Tensor], X: Tensor) -> Tensor:
    mean, std, axes = fitted
    return (((X - mean) / std).double() @ axes).to(X.dtype)


def pca_view(X_context: Tensor, X_query: Tensor, limit: int):
    """The rows projected on the leading ``limit`` principal axes of the standardised context.

    Axes are found per table of the batch; those with (numerically) no variance in any table are dropped.
    """
    fitted = pca_axes(X_context, limit)
    return pca_map(fitted, X_context), pca_map(fitted, X_query)


class FittedView:
    """One view of a table as fitted on its context: ``context`` holds the context's view, and calling it
    maps query rows the same way (the same kept columns, context quantiles or principal axes)."""

    def __init__(self, view: View, X_context: Tensor, y_context: Tensor, limit: int):
        self.view = view
        if view == View.pca:
            self.fitted = pca_axes(X_context, limit)
        else:
            self.keep = separating_columns(X_context, y_context, limit)
            if view == View.quantile:
                self.ordered = take_columns(X_context, self.keep).transpose(1, 2).contiguous().sort(dim=-1).values
        self.context = self(X_context)

    def __call__(self, X: Tensor) -> Tensor:
        if self.view == View.pca:
            return pca_map(self.fitted, X)
        kept = take_columns(X, self.keep)
        return quantile_map(self.ordered, kept) if self.view == View.quantile else kept


def table_views(views: List[View], X_context: Tensor, y_context: Tensor, X_query: Tensor, limit: int):
    """``(context, query)`` features of each view in ``views``, at most ``limit`` columns each.

    The columns are chosen from the context for the views that take the most class-separating ones;
    ``pca`` sees all.
    """
    for view in views:
        fitted = FittedView(view, X_context, y_context, limit)
        yield fitted.context, fitted(X_query)


def rescale(proba: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``softmax(scale * log(proba) + offsets)``; ``params`` is the scale, then offsets for classes 1..C-1."""
    logits = params[0] * np.log(np.clip(proba, 1e-12, None))
    logits[:, 1:] += params[1:]
    return softmax(logits, axis=1)


def fit_calibration(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The scale and class offsets for ``rescale`` that minimise the log loss of ``proba`` on ``labels``.

    A penalty of one row's weight pulls them towards no change (scale 1, offsets 0), so that a handful
    of rows cannot make the model sure of itself; from a hundred rows on it hardly matters. The scale
    stays positive, so that however little the rows trust the model, its ranking is kept.
    """
    rows = np.arange(len(labels))
    start = np.r_[1.0, np.zeros(proba.shape[1] - 1)]

    def objective(params):
        log_loss = -np.log(rescale(proba, params)[rows, labels] + 1e-12).mean()
        return log_loss + ((params - start) ** 2).sum() / len(labels)

    return minimize(objective, start, method="L-BFGS-B", bounds=[(0.01, 50.0)] + [(-20.0, 20.0)] * (len(start) - 1)).x


def context_scaling(X_context: Tensor, n_features: Tensor | None, max_features: int):
    """``(mean, std, scale)``: the context rows' per-feature statistics and the width rescaling."""
    mean = X_context.mean(dim=1, keepdim=True)
    std = X_context.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    if n_features is None:
        n_features = torch.full((X_context.shape[0],), X_context.shape[-1], device=X_context.device)
    scale = torch.sqrt(max_features / n_features.clamp(min=1).float()).view(-1, 1, 1)
    return mean, std, scale


def apply_scaling(X: Tensor, scaling, max_features: int) -> Tensor:
    """Standardise ``X`` by the context's statistics, clip, rescale by width, zero-pad to ``max_features``."""
    mean, std, scale = scaling
    return F.pad(((X - mean) / std).clamp(-CLIP, CLIP) * scale, (0, max_features - X.shape[-1]))


def normalise(X_context: Tensor, X_query: Tensor, n_features: Tensor | None, max_features: int):
    """Standardise every feature by the context rows' mean and std, clip, rescale by width, zero-pad."""
    scaling = context_scaling(X_context, n_features, max_features)
    return apply_scaling(X_context, scaling, max_features), apply_scaling(X_query, scaling, max_features)


class Block(nn.Module):
    """Pre-norm transformer block in which every row attends to the context rows only."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    def keys_values(self, x_context: Tensor) -> tuple[Tensor, Tensor]:
        """The heads' keys and values of the context rows (``x_context``: their normed hidden states)."""
        return self._heads(self.k(x_context)), self._heads(self.v(x_context))

    def attend(self, h: Tensor, keys: Tensor, values: Tensor, x: Tensor | None = None) -> Tensor:
        """``h`` after this block, its rows attending to the context's ``keys`` and ``values``."""
        x = self.norm1(h) if x is None else x
        attended = F.scaled_dot_product_attention(self._heads(self.q(x)), keys, values)
        h = h + self.dropout(self.out(attended.transpose(1, 2).flatten(2)))
        return h + self.dropout(self.linear2(F.gelu(self.linear1(self.norm2(h)))))

    def forward(self, h: Tensor, n_context: int) -> Tensor:
        x = self.norm1(h)
        return self.attend(h, *self.keys_values(x[:, :n_context]), x)


@dataclass
class EncodedContext:
    """What a query needs of its context: the normalisation statistics and every layer's keys and values."""

    scaling: tuple
    keys_values: list


class NanoICL(nn.Module):
    """In-context classifier: (context rows, their labels, query rows) -> class logits for the query rows."""

    def __init__(self, max_features: int = 100, max_classes: int = 10, d_model: int = 128, n_layers: int = 6,
                 n_heads: int = 4, d_ff: int = 256, dropout: float = 0.0):
        super().__init__()
        self.max_features, self.max_classes = max_features, max_classes
        self.encoder = nn.Linear(max_features, d_model)
        self.label_embedding = nn.Embedding(max_classes, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, max_classes))

    def forward(self, X_context: Tensor, y_context: Tensor, X_query: Tensor,
                n_features: Tensor | None = None) -> Tensor:
        return self.query_logits(self.encode_context(X_context, y_context, n_features), X_query)

    def encode_context(self, X_context: Tensor, y_context: Tensor, n_features: Tensor | None = None) -> EncodedContext:
        """The context pass: its normalisation statistics and each layer's keys and values (the context rows
        attend to each other only, so none of it depends on a query)."""
        if X_context.shape[-1] > self.max_features:
            raise ValueError(f"nano takes at most {self.max_features} features, got {X_context.shape[-1]}")
        scaling = context_scaling(X_context, n_features, self.max_features)
        h = self.encoder(apply_scaling(X_context, scaling, self.max_features)) + self.label_embedding(y_context.long())
        keys_values = []
        for i, block in enumerate(self.blocks):
            x = block.norm1(h)
            keys_values.append(block.keys_values(x))
            if i + 1 < len(self.blocks):  # the last layer's context outputs feed nothing
                h = block.attend(h, *keys_values[-1], x)
        return EncodedContext(scaling, keys_values)

    def query_logits(self, context: EncodedContext, X_query: Tensor) -> Tensor:
        """The query pass: class logits of ``X_query`` against an encoded context."""
        return self.decode_queries(apply_scaling(X_query, context.scaling, self.max_features), context.keys_values)

    def decode_queries(self, X_query: Tensor, keys_values: list) -> Tensor:
        """Class logits of query rows already scaled by their context, against its per-layer keys and values."""
        h = self.encoder(X_query)
        for block, (keys, values) in zip(self.blocks, keys_values):
            h = block.attend(h, keys, values)
        return self.decoder(self.norm(h))


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(architecture, state_dict)`` of a nano checkpoint: safetensors with its config in the metadata."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        architecture = json.loads(metadata["architecture"])
    except FileNotFoundError:
        raise TabTuneError(f"{path}: no such file") from None
    except Exception as exc:
        raise TabTuneError(f"{path}: not a nano checkpoint ({str(exc).splitlines()[0][:120]})") from None
    return architecture, load_file(str(path))


# query rows per pass: members x rows x context rows at most this (attention scores: 4 bytes a head each)
ATTENTION_BUDGET = 2**24


@dataclass
class NanoContext:
    """A context as ``predict`` uses it: the ensemble (views fitted on it, the members' orders, shifts and
    scalings, every layer's stacked keys and values; ``NanoAdapter._members``) and the calibration map
    (None: none)."""

    ensemble: tuple
    calibration: np.ndarray | None


def _as_table(X) -> Tensor:
    return torch.as_tensor(np.asarray(X, dtype=np.float32))[None]


def _network(module) -> NanoICL:
    """The NanoICL inside ``module`` (a peft wrapper's LoRA layers live in it)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


class NanoAdapter(NanoSpec, ModelAdapter):
    def __init__(self):
        self.context_cache = ContextCache(size=1)  # the encoded context of the last predict
        self.cache_context = True  # False: every predict encodes its context anew

    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = self.random_size(config)
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        architecture, state = read_checkpoint(path)
        module = self.from_architecture(architecture)
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        return NanoICL(**architecture)

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """nano's own format, as the package ships it: ``nano.safetensors``, the architecture as JSON in its
        ``architecture`` metadata; ``model.checkpoint=`` reads it."""
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        metadata = {"architecture": json.dumps(architecture)}
        return rundir.write_file(Path(path) / shipped_checkpoint().name,
                                 lambda tmp: save_file(state, tmp, metadata=metadata))

    def episode_logits(self, module, X_context, y_context, X_query, task: Task,
                       config: ModelConfig | None = None) -> Tensor:
        # as at prediction: every view of the table (at most max_input_features columns each), logits averaged
        config = config if isinstance(config, NanoConfig) else NanoConfig()
        logits = 0.0
        for Xc, Xq in table_views(config.preprocessing, X_context, y_context, X_query,
                                  self._input_limit(module, config)):
            logits = logits + module(Xc, y_context, Xq)
        return (logits / len(config.preprocessing))[..., : task.n_classes]

    def pretrain_logits(self, module, X: Tensor, y_context: Tensor, n_features: Tensor) -> Tensor:
        n = y_context.shape[1]  # nano normalises each table by its context over its real columns only
        return module(X[:, :n], y_context, X[:, n:], n_features=n_features)

    def one_hot_max_levels(self, config: ModelConfig) -> int:
        return config.one_hot_max_levels

    @staticmethod
    def _input_limit(module, config: NanoConfig) -> int:
        return min(config.max_input_features, _network(module).max_features)

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        module.eval()
        settings = (task.n_classes, config.n_estimators, tuple(View(v) for v in config.preprocessing),
                    self._input_limit(module, config), config.softmax_temperature, config.calibrate, str(device))
        build = lambda: self.encode_context(module, X_context, y_context, task, config, device)  # noqa: E731
        cache = self.context_cache
        if not self.cache_context:
            context = build()
        else:
            arrays = (np.asarray(X_context), np.asarray(y_context))
            if cache.key(module, arrays, settings) not in cache.entries:
                cache.entries.clear()  # let the old context's keys and values go before the new ones are built
            context = cache.get(module, arrays, build, settings)
        proba = self._ask(module, context.ensemble, _as_table(X_query), task, config, config.n_estimators, device)
        return proba if context.calibration is None else rescale(proba, context.calibration)

    def encode_context(self, module, X_context, y_context, task: Task, config: ModelConfig, device) -> NanoContext:
        """Everything ``predict`` derives from the context alone: the members' views and encoded contexts, and
        the calibration map."""
        Xc, yc = _as_table(X_context), torch.as_tensor(y_context)[None]
        ensemble = self._members(module, Xc, yc, task, config, config.n_estimators, device)
        if not config.calibrate:
            return NanoContext(ensemble, None)
        # each half of the context is predicted from the other half (with at most 16 members); the halves
        # split every class, and the rows of a class that only one half holds (a class of one row) are not fitted
        labels = np.asarray(y_context)
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
        halves = order[0::2], order[1::2]
        fitted = np.isin(labels, np.intersect1d(labels[halves[0]], labels[halves[1]]))
        if not fitted.any():
            return NanoContext(ensemble, None)
        cross = np.empty((len(labels), task.n_classes))
        n_members = min(config.n_estimators, 16)
        for given, asked in (halves, halves[::-1]):
            half = self._members(module, Xc[:, given], yc[:, given], task, config, n_members, device)
            cross[asked] = self._ask(module, half, Xc[:, asked], task, config, n_members, device)
        return NanoContext(ensemble, fit_calibration(cross[fitted], labels[fitted]))

    def _members(self, module, Xc: Tensor, yc: Tensor, task: Task, config: NanoConfig, n_estimators: int, device):
        """The ensemble on this context: ``[(fitted view, [(feature order, class shift, scaling), ...]), ...]``,
        and each layer's ``(keys, values)`` with the members stacked on the batch axis in that order.

        The members are shared out over the views in turn; within a view, member 0 takes the columns as the
        view gives them and the others seeded permutations, each a cyclic class shift (as ``ensemble_predict``).
        """
        network = _network(module)
        limit = self._input_limit(module, config)
        n_views = len(config.preprocessing)
        counts = [len(range(i, n_estimators, n_views)) for i in range(n_views)]
        views, stacked, index = [], None, 0
        for view, n_members in zip(config.preprocessing, counts):
            if not n_members:
                continue
            fitted = FittedView(View(view), Xc, yc, limit)
            width = fitted.context.shape[-1]
            rng = np.random.default_rng(0)
            members = []
            for member in range(n_members):
                order = np.arange(width) if member == 0 else rng.permutation(width)
                shift = member % task.n_classes
                encoded = network.encode_context(fitted.context[:, :, order].to(device),
                                                 ((yc + shift) % task.n_classes).to(device))
                if stacked is None:  # filled member by member: no second copy of every key and value
                    stacked = [tuple(t.new_empty((sum(counts), *t.shape[1:])) for t in kv)
                               for kv in encoded.keys_values]
                for (keys, values), (k, v) in zip(stacked, encoded.keys_values):
                    keys[index], values[index] = k[0], v[0]
                members.append((order, shift, encoded.scaling))
                index += 1
            views.append((fitted, members))
        return views, stacked

    def _ask(self, module, ensemble, Xq: Tensor, task: Task, config: NanoConfig, n_estimators: int,
             device) -> np.ndarray:
        """The members' mean probabilities for the query rows: per view normalised, weighted by its members.

        All members go through the query pass together, in chunks of rows that bound the attention scores."""
        network = _network(module)
        views, keys_values = ensemble
        n_members, n_context = keys_values[0][0].shape[0], keys_values[0][0].shape[2]
        chunk = max(1, ATTENTION_BUDGET // (n_members * n_context))
        parts = []
        for start in range(0, Xq.shape[1], chunk):
            rows = []
            for fitted, members in views:
                Xq_view = fitted(Xq[:, start:start + chunk])
                rows += [apply_scaling(Xq_view[:, :, order].to(device), scaling, network.max_features)
                         for order, _, scaling in members]
            logits = network.decode_queries(torch.cat(rows), keys_values)[..., : task.n_classes].float()
            parts.append(torch.softmax(logits / config.softmax_temperature, dim=-1).cpu().numpy())
        proba = np.concatenate(parts, axis=1)  # (members, query rows, classes)
        total, index = 0.0, 0
        for _, members in views:
            view_total = 0.0
            for _, shift, _ in members:
                view_total = view_total + class_shift_probs(proba[index], shift)
                index += 1
            pred = view_total / len(members)
            total = total + len(members) * (pred / pred.sum(axis=1, keepdims=True))
        return total / max(n_estimators, 1)

    def lora_targets(self, module: nn.Module, prefixes):
        return [n for n, m in self.modules_under(module, prefixes).items() if isinstance(m, nn.Linear)], []
