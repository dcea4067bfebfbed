"""TabDPT through the tabdpt package: its architecture, its checkpoint format, kNN context like its estimator.

Checkpoints are TabDPT's official format (``Layer6/TabDPT``, file
``tabdpt1_3.safetensors``, the name ``tabdpt.estimator`` downloads): a
safetensors file whose tensors are the state dict and whose metadata key
``cfg`` holds the training config as JSON (``model.*`` sizes, ``training.dropout``,
``env.device``). It is read as the package's ``TabDPTEstimator._load_model``
reads it (``safe_open`` + ``json.loads(meta["cfg"])``, the ``_orig_mod.`` /
``model.`` key prefixes stripped) and built with the package's own
``tabdpt.model.TabDPTModel``; nothing here reimplements the transformer. One
checkpoint serves both tasks: the head has ``max_num_classes`` class logits
followed by ``regression_bin_count`` bin logits.

Inputs. TabDPT's forward takes ``x_src`` (batch, rows, features) with the
context first and ``y_src`` (batch, context rows); it returns (query rows,
batch, outputs). Queries attend to the context rows only (keys and values are
the context's), so a query never sees another query or a label but the
context's. One thing in the package breaks that during training: in train mode
its forward normalises and clips features with statistics over *all* rows,
queries included. ``episode_logits`` therefore runs the forward with the
model's own ``training`` flag off (its submodules, LoRA dropout included, stay
in train mode): statistics then come from the context rows, as at prediction.
Features are zero-padded to the model's ``max_num_features``; a wider table is
refused (the package would project it with PCA).

Regression. Like ``TabDPTRegressor``, the context targets are standardised by
the context's own mean and std (``normalize_data``), the model predicts logits
over ``regression_bin_count`` equal bins on [``regression_bin_min``,
``regression_bin_max``], and the point prediction is the expectation over bin
centres, mapped back. Training minimises the cross-entropy of the query
target's bin (targets outside the range fall in the edge bins).

Prediction is the package's own estimator. ``predict`` builds a ``TabDPTClassifier``
/ ``TabDPTRegressor`` whose network is our module (the package's documented seam:
its ``_load_model`` hands back a built module instead of reading a file), so the
network that runs is the one we loaded, fine-tuned or LoRA-wrapped, and everything
around it is the package's code: mean imputation and ``StandardScaler`` fitted on
the context, feature shuffles and class permutations per ensemble member
(``n_estimators`` -> ``n_ensembles``), the members' logits averaged then divided by
``softmax_temperature``, regression's per-context target normalisation and bin
expectation, and retrieval. TabDPT was trained, and its estimator predicts on large
tables, with *retrieved* context (``context_reduction="retrieval"``, FAISS L2 on the
scaled features): ``predict`` gets the whole training split (``prediction_context``
hands over every row); up to ``max_context_rows`` rows they are one shared context,
past it each query row gets its ``max_context_rows`` nearest training rows
(``context_size``).

The context is encoded once. The fitted estimator (imputer, scaler, training rows,
FAISS index) depends only on the context and the module, and so, with one shared
context, does each member's pass over the context rows: they attend to each other
and to the thinking rows only, so every layer's keys and values of the context are
the same for any query. The estimator's network is therefore ``ContextKeyValueModel``:
the package calls it as it calls ``TabDPTModel`` (context and queries stacked), and
it runs the context pass once per member context (``encode_context``, keyed on its
content) and then the query rows alone against the kept keys and values
(``query_outputs``, the model's own layers and normalisation; equal to its forward
to float rounding, measured 0 on CPU). The fitted estimator with its keys and values
(about 128 KB per context row and member at the released size) is kept in a
``ContextCache`` until the weights or the context change, so repeated predicts on one
fitted pipeline pay for the context once. Retrieval contexts, one per query row, go
through the model's own forward.

Where it deliberately differs from ``TabDPTClassifier(...).predict_proba`` /
``ensemble_predict_proba`` (``TabDPTRegressor(...).predict``) at equal settings:

* the seed: with more than one member it is 0 (the package's default, ``None``,
  draws fresh permutations on every call); with one member it is ``None``, the
  table as given, as the package does by default;
* more classes than the head's ``max_num_classes``: tabtune's class hierarchy
  (``predict_classes``) rather than the package's digit decomposition, because
  fine-tuning trains on the hierarchy's within-group episodes;
* a context missing some of the task's classes still gives a column for each class
  (the package sizes its output by the classes it saw);
* tables wider than the checkpoint's ``max_num_features`` are refused (the package
  projects them with a randomised PCA, which fine-tuning could not follow);
* no flash attention or bf16 autocast on CUDA (the package's default there), and in
  retrieval mode queries go in batches of ``ROWS_PER_FORWARD // (context rows + 1)``
  (the package's CPU default, 4,096 queries of a full context each, does not fit in
  memory): neither changes a result beyond float rounding.

Fine-tuning trains on the kind of context prediction uses: when the training split
exceeds ``max_context_rows``, ``plan_episodes`` regroups each epoch's query rows into
neighbourhoods (a random unvisited anchor row and its nearest unvisited rows) and
gives each episode the rows nearest the anchor among the non-query rows as context,
so the model is tuned on local, retrieved contexts rather than random ones it never
sees at prediction. On a smaller split prediction uses all rows as context, and the
trainer's random disjoint contexts are already that kind. The estimator's
``StandardScaler`` is not applied in training: the model normalises and clips each
feature by the context's statistics, which undoes any per-column affine map.

LoRA. Every projection is a separate ``nn.Linear`` whose forward runs, so plain
peft LoRA reaches them live (nothing packed, unlike TabICL). The seed's default
names map to the package's modules as follows:

=======================  =====================================================================
seed's name               module in ``tabdpt.model.TabDPTModel``
=======================  =====================================================================
``transformer_encoder``   ``transformer_encoder.{i}``: ``q_proj`` ``q_gate`` ``k_proj`` ``v_proj``
                          ``out_proj`` ``ff.up`` ``ff.down``
``encoder``               ``encoder`` (the feature embedding)
``y_encoder``             ``cls_y_encoders.{i}`` (``nn.Embedding``) for classification,
                          ``reg_y_encoders.{i}.0`` / ``.2`` for regression: only the task's
                          own label encoders run, so only they take adapters
``head``                  ``head.0``, ``head.2``
=======================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from .base import ContextCache, ModelAdapter, Task
from .specs.tabdpt import CHECKPOINT, TabDPTSpec
ROWS_PER_FORWARD = 65536  # retrieval batches: rows (contexts + queries) per forward pass


def _model_class():
    from tabdpt.model import TabDPTModel

    return TabDPTModel


def _cfg(*, emsize, nlayers, nhead, ff_dim, max_num_features, max_num_classes=10, regression_bin_count=64,
         regression_bin_min=-4.0, regression_bin_max=4.0, y_encoder_dim=None, min_eval_context=128,
         max_eval_context=2048, n_thinking_rows=0) -> dict:
    """A config dict in the checkpoint's ``cfg`` shape (the part ``TabDPTModel.load`` reads)."""
    return {"model": {"emsize": emsize, "nlayers": nlayers, "nhead": nhead, "ff_dim": ff_dim,
                      "max_num_features": max_num_features, "max_num_classes": max_num_classes,
                      "regression_bin_count": regression_bin_count, "regression_bin_min": regression_bin_min,
                      "regression_bin_max": regression_bin_max, "y_encoder_dim": y_encoder_dim or emsize,
                      "min_eval_context": min_eval_context, "max_eval_context": max_eval_context,
                      "enc_cell_dim": emsize, "num_col_attn_layers": 0, "n_thinking_rows": n_thinking_rows},
            "training": {"dropout": 0.0}}


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """Return ``(cfg, state_dict)`` of an official TabDPT safetensors file; no code from the file runs."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TabTuneError(f"{path}: not a TabDPT checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if "cfg" not in meta:
        raise TabTuneError(f"{path}: not a TabDPT checkpoint (no 'cfg' entry in its safetensors metadata)")
    try:
        cfg = json.loads(meta["cfg"])
        cfg["model"]["emsize"]
    except Exception:
        raise TabTuneError(f"{path}: its 'cfg' metadata is not a TabDPT config") from None
    state = {k.replace("_orig_mod.", "").replace("model.", ""): v for k, v in state.items()}
    return cfg, state


@contextmanager
def _context_statistics(module: nn.Module):
    """TabDPT forwards that normalise features with the context rows' statistics only (see the docstring)."""
    models = [m for m in module.modules() if isinstance(m, _model_class())]
    flags = [m.training for m in models]
    for m in models:
        m.training = False  # the flag alone: submodules keep their mode
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.training = flag


def _tabdpt_model(module: nn.Module):
    return next(m for m in module.modules() if isinstance(m, _model_class()))


def _check_width(n_features: int, width: int) -> None:
    if n_features > width:
        raise TabTuneError(f"TabDPT reads at most {width} features; this table has {n_features} after "
                           f"preprocessing (drop columns with dataset.drop_columns)")


def _pad(X: Tensor, width: int) -> Tensor:
    _check_width(X.shape[-1], width)
    return F.pad(X, (0, width - X.shape[-1]))


def filled_and_scaled(X_context: Tensor, X_query: Tensor) -> tuple[Tensor, Tensor]:
    """An episode's (B, rows, features) inputs with missing values filled with the context's column means, then
    scaled by the context's mean and standard deviation (a constant column keeps scale 1): what TabDPT's
    estimator hands its model (``SimpleImputer``, ``StandardScaler``)."""
    X_context, X_query = X_context.float(), X_query.float()
    mean = torch.nanmean(X_context, dim=1, keepdim=True).nan_to_num(0.0)
    X_context = torch.where(torch.isnan(X_context), mean, X_context)
    X_query = torch.where(torch.isnan(X_query), mean, X_query)
    std = X_context.std(dim=1, unbiased=False, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (X_context - mean) / std, (X_query - mean) / std


@dataclasses.dataclass
class EncodedContext:
    """A stacked context as TabDPT's layers see it: its raw rows (for the query rows' normalisation, which
    uses the context's statistics) and every layer's keys and values over the thinking and context rows."""

    x_context: Tensor
    keys_values: list


def _attend(layer: nn.Module, x: Tensor, keys: Tensor, values: Tensor, n_keys: int) -> Tensor:
    """One ``TransformerEncoderLayer``'s residual for rows ``x`` (batch, rows, width) attending to the
    given keys and values: the layer's own submodules, in the order its forward uses them."""
    B, L, _ = x.shape
    h = layer.attn_norm(x)
    q = layer.q_proj(h)
    gate = torch.sigmoid(layer.q_gate(q))
    q = layer.q_norm(q.view(B, L, layer.num_heads, layer.head_dim).transpose(1, 2))
    scale = 1.0 / math.sqrt(layer.head_dim) * layer.get_scale_param(n_keys, device=q.device, dtype=q.dtype)
    attn = F.scaled_dot_product_attention(q, keys, values, scale=scale).transpose(1, 2)
    attn = layer.out_proj((attn * gate.unsqueeze(-1)).reshape(B, L, layer.num_heads * layer.head_dim))
    return attn + layer.ff(layer.ff_norm(x + attn))


def _features(model: nn.Module, x: Tensor, n_context: int) -> Tensor:
    """TabDPT's input normalisation of ``x`` (rows, batch, features), statistics from its first ``n_context``
    rows: the package's own ``clip_outliers`` / ``normalize_data``, as its eval-mode forward applies them."""
    from tabdpt.utils import clip_outliers, normalize_data

    x = clip_outliers(x, n_context, n_sigma=model.clip_sigma)
    x = clip_outliers(normalize_data(x, n_context), n_context, n_sigma=model.clip_sigma)
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _label_embedding(model: nn.Module, layer: int, y: Tensor, is_cls: bool) -> Tensor:
    if is_cls:
        return model.cls_y_encoders[layer](y.long().clamp(min=0, max=model.n_out - 1))
    return model.reg_y_encoders[layer](y.unsqueeze(-1))


def encode_context(model: nn.Module, x_context: Tensor, y_context: Tensor, is_cls: bool) -> EncodedContext:
    """The context pass of ``TabDPTModel`` (eval mode): each layer's keys and values of the thinking and
    context rows, which attend to each other only. ``x_context`` is (1, rows, features), ``y_context`` (1, rows)."""
    n_context, n_think = x_context.shape[1], model.n_thinking_rows
    src = model.enc_norm(model.encoder(_features(model, x_context.transpose(0, 1), n_context)))
    if n_think:
        src = torch.cat([model.thinking_embed.unsqueeze(1).expand(n_think, src.shape[1], -1), src])
    x = src.transpose(0, 1)  # (1, thinking + context rows, width)
    keys_values = []
    for i, layer in enumerate(model.transformer_encoder):
        y = _label_embedding(model, i, y_context.transpose(0, 1), is_cls)
        if n_think:
            y = torch.cat([y.new_zeros(n_think, y.shape[1], y.shape[-1]), y])
        h = layer.attn_norm(x)
        shape = (x.shape[0], x.shape[1], layer.num_heads, layer.head_dim)
        keys = layer.k_norm(layer.k_proj(h).view(shape).transpose(1, 2))
        values = layer.v_proj(torch.cat([h, y.transpose(0, 1)], dim=-1)).view(shape).transpose(1, 2)
        keys_values.append((keys, values))
        if i + 1 < len(model.transformer_encoder):  # the last layer's context outputs feed nothing
            x = x + _attend(layer, x, keys, values, x.shape[1])
    return EncodedContext(x_context, keys_values)


def query_outputs(model: nn.Module, context: EncodedContext, x_query: Tensor) -> Tensor:
    """The query pass: (query rows, 1, outputs) for ``x_query`` (1, rows, features), as ``TabDPTModel``'s forward
    gives them for these rows after the context."""
    n_context = context.x_context.shape[1]
    x = _features(model, torch.cat([context.x_context, x_query], dim=1).transpose(0, 1), n_context)[n_context:]
    x = model.enc_norm(model.encoder(x)).transpose(0, 1)
    n_keys = n_context + model.n_thinking_rows
    for layer, (keys, values) in zip(model.transformer_encoder, context.keys_values):
        x = x + _attend(layer, x, keys, values, n_keys)
    return model.head(x.transpose(0, 1).float())


class ContextKeyValueModel:
    """``TabDPTModel`` as the package's estimator calls it, with each stacked context encoded once.

    The estimator calls ``model(x_src=cat([context, queries]), y_src=context labels, is_cls=...)``; with one
    stacked context (batch 1, eval mode) the context pass (``encode_context``) is kept under the context's
    content and only the query rows go through the layers (``query_outputs``). A fitted estimator sees the
    same ``n_estimators`` contexts (feature shuffles x class permutations) in every predict, so its repeated
    predicts run the query rows alone. Retrieval batches (one context per query) and training go to the
    model's own forward. Everything else the estimator reads (sizes, bins) is the model's."""

    def __init__(self, model: nn.Module, size: int = 32):
        self.model, self.size, self.contexts = model, size, OrderedDict()
        self.hits = self.misses = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x_src: Tensor, y_src: Tensor, is_cls: bool) -> Tensor:
        model = self.model
        if x_src.shape[0] != 1 or model.training:
            return model(x_src=x_src, y_src=y_src, is_cls=is_cls)
        n_context = y_src.shape[1]
        x_context = x_src[:, :n_context]
        digest = hashlib.blake2b(digest_size=16)
        for t in (x_context, y_src):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        key = (digest.hexdigest(), tuple(x_context.shape), bool(is_cls))
        if key in self.contexts:
            self.hits += 1
            self.contexts.move_to_end(key)
        else:
            self.misses += 1
            self.contexts[key] = encode_context(model, x_context, y_src, is_cls)
            while len(self.contexts) > self.size:
                self.contexts.popitem(last=False)
        return query_outputs(model, self.contexts[key], x_src[:, n_context:])


def fitted_estimator(model: nn.Module, X_context: np.ndarray, y_context: np.ndarray, task: Task, device,
                     context_reduction: str = "subsample"):
    """The package's ``TabDPTClassifier`` / ``TabDPTRegressor`` running ``model``, fitted on the context.

    Built as the package builds it, with retrieval past the context size, no flash attention and no
    compilation; ``_load_model`` (which the package documents as the place to hand over a built
    network) returns ``model`` instead of reading a file, wrapped so that each stacked context is encoded
    once (``ContextKeyValueModel``). A classifier answers for all ``task.n_classes`` classes, whichever
    the context holds.
    """
    from tabdpt import TabDPTClassifier, TabDPTRegressor
    from tabdpt.estimator import TabDPTEstimator

    class OnModule(TabDPTClassifier if task.is_classification else TabDPTRegressor):
        def _load_model(self):
            self.path, self.model = None, ContextKeyValueModel(model)

    estimator = OnModule(normalizer="standard", context_reduction=context_reduction, device=str(device),
                         use_flash=False, compile=False, verbose=False)
    TabDPTEstimator.fit(estimator, np.asarray(X_context), np.asarray(y_context))
    if task.is_classification:  # TabDPTClassifier.fit, without sizing the output by the classes present
        estimator.num_classes = task.n_classes
    return estimator


class TabDPTAdapter(TabDPTSpec, ModelAdapter):
    def __init__(self):
        self.context_cache = ContextCache(size=1)  # the fitted estimator of the last context, its keys and values
        self.cache_context = True  # False: every predict fits the estimator and encodes its context anew

    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {"cfg": _cfg(**{"max_num_classes": 10, **self.random_size(config)}), "task": task.kind}
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        cfg, state = read_checkpoint(path)
        architecture = {"cfg": {"model": cfg["model"], "training": cfg.get("training", {"dropout": 0.0})},
                        "task": task.kind}
        try:
            module = self.from_architecture(architecture)
            module.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AssertionError) as exc:
            raise TabTuneError(f"{path}: weights do not match its config "
                               f"({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})") from None
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(architecture["cfg"])
        m = cfg.model
        # the keyword mapping of TabDPTModel.load, without its load_state_dict
        module = _model_class()(
            dropout=cfg.training.dropout, enc_cell_dim=m.enc_cell_dim, n_out=m.max_num_classes,
            regression_bin_count=m.regression_bin_count, regression_bin_min=m.regression_bin_min,
            regression_bin_max=m.regression_bin_max, nhead=m.nhead, nhid=m.ff_dim, ninp=m.emsize,
            nlayers=m.nlayers, num_features=m.max_num_features, base_len=m.min_eval_context,
            max_len=m.max_eval_context, y_encoder_dim=m.y_encoder_dim, num_col_attn_layers=m.num_col_attn_layers,
            n_thinking_rows=m.get("n_thinking_rows", 0), use_flash=False)
        module.tabtune_task = architecture.get("task", "classification")
        self.max_classes = int(m.max_num_classes)  # this checkpoint's head: wider tasks go through the hierarchy
        return module

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """TabDPT's safetensors file under its official name: the state dict, and the config as JSON in the
        ``cfg`` metadata (with the ``env.device`` its loader sets), as ``TabDPTClassifier(model_weight_path=...)``
        and ``TabDPTModel.load`` read it. One file serves both tasks, as the official one does."""
        from safetensors.torch import save_file

        cfg = {**architecture["cfg"], "env": {"device": "cpu"}}
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        return rundir.write_file(Path(path) / CHECKPOINT,
                                 lambda tmp: save_file(state, tmp, metadata={"cfg": json.dumps(cfg)}))

    # -- forward -------------------------------------------------------------------------------
    @staticmethod
    def _forward(module, X_context: Tensor, y_context: Tensor, X_query: Tensor, is_cls: bool) -> Tensor:
        """(B, n_query, n_out + bins) raw outputs of TabDPT's own forward."""
        width = _tabdpt_model(module).num_features
        X = _pad(torch.cat([X_context, X_query], dim=1).float(), width)
        return module(x_src=X, y_src=y_context.float(), is_cls=is_cls).transpose(0, 1)

    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        model = _tabdpt_model(module)
        X_context, X_query = filled_and_scaled(X_context, X_query)
        with _context_statistics(module):
            if task.is_classification:
                return self._forward(module, X_context, y_context, X_query, True)[..., : task.n_classes]
            mean = y_context.float().mean(1, keepdim=True)
            std = y_context.float().std(1, keepdim=True) + 1e-6
            out = self._forward(module, X_context, (y_context - mean) / std, X_query, False)
        self._episode_scale = (mean, std, model.regression_bin_min, model.regression_bin_max)
        return out[..., model.n_out:]

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        if task.is_classification:
            return super().episode_loss(outputs, y_query, task)
        mean, std, low, high = self._episode_scale
        bins = outputs.shape[-1]
        z = (y_query.float() - mean) / std
        target = ((z - low) / (high - low) * bins).floor().clamp(0, bins - 1).long()
        return F.cross_entropy(outputs.reshape(-1, bins), target.reshape(-1))

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        """The package's estimator on ``module``: ``ensemble_predict_proba`` / ``predict`` (module docstring)."""
        module.eval()
        model = _tabdpt_model(module)
        _check_width(X_context.shape[1], model.num_features)
        reduction = getattr(config, "context_reduction", "subsample")
        fit = lambda: fitted_estimator(model, X_context, y_context, task, device, reduction)  # noqa: E731
        if self.cache_context:
            cache, arrays = self.context_cache, (X_context, y_context)
            settings = (task.kind, task.n_classes, str(device), reduction)
            if cache.key(module, arrays, settings) not in cache.entries:
                cache.entries.clear()  # let the old context's keys and values go before the new ones are built
            estimator = cache.get(module, arrays, fit, settings)
        else:
            estimator = fit()
        cap = config.max_context_rows  # None: every row, the package's default
        retrieves = cap is not None and len(X_context) > cap and reduction == "retrieval"
        # one stacked context: the package's own query batches; retrieval: a bounded number of rows per forward
        batch = max(1, ROWS_PER_FORWARD // (cap + 1)) if retrieves else None
        members = config.n_estimators or 1  # null: predict_proba's one pass, the package's default
        temperature = config.softmax_temperature or 1.0
        seed = None if members == 1 else 0
        X_query = np.asarray(X_query)
        if task.is_classification:
            return estimator.ensemble_predict_proba(X_query, n_ensembles=members, temperature=temperature,
                                                    context_size=cap, batch_size=batch, seed=seed)
        return estimator.predict(X_query, n_ensembles=members, context_size=cap, batch_size=batch, seed=seed)

    # -- context -------------------------------------------------------------------------------
    def prediction_context(self, labels, n_rows: int, config: ModelConfig, seed: int) -> np.ndarray:
        """Every training row: ``predict`` retrieves each query's nearest rows itself past ``max_context_rows``."""
        return np.arange(n_rows)

    def plan_episodes(self, episodes: list, X: np.ndarray, config: ModelConfig, rng: np.random.Generator) -> list:
        """Past ``max_context_rows``, local episodes: neighbourhood queries, their nearest non-query rows as context."""
        n_rows = len(X)
        cap = config.max_context_rows
        if cap is None or n_rows <= cap or getattr(config, "context_reduction", "") != "retrieval" or not episodes:
            return episodes
        n_query, n_context = len(episodes[0].query), len(episodes[0].context)
        rows = torch.as_tensor(X, dtype=torch.float32)[None]
        Z = filled_and_scaled(rows, rows[:, :0])[0][0]  # filled and scaled, as retrieval sees the rows
        visited = np.zeros(n_rows, dtype=bool)
        planned = []

        def nearest(distance: torch.Tensor, excluded: np.ndarray, k: int) -> np.ndarray:
            """The ``k`` rows nearest by ``distance``, leaving out ``excluded`` (a mask): O(rows), no sort."""
            masked = distance.masked_fill(torch.as_tensor(excluded), float("inf"))
            return masked.topk(k, largest=False).indices.numpy()

        for episode in episodes:
            anchor = rng.choice(np.flatnonzero(~visited)) if (~visited).any() else rng.integers(n_rows)
            distance = torch.cdist(Z[anchor][None], Z)[0]
            # the anchor's nearest rows not yet queried this pass; near the pass's end, nearest others fill up
            query = nearest(distance, visited, min(n_query, int((~visited).sum())))
            taken = np.zeros(n_rows, dtype=bool)
            taken[query] = True
            query = np.concatenate([query, nearest(distance, taken, n_query - len(query))])
            visited[query] = True
            taken[query] = True
            context = nearest(distance, taken, n_context)
            planned.append(dataclasses.replace(episode, context=context, query=query))
        return planned

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        model = _tabdpt_model(module)
        y_encoders = "cls_y_encoders" if getattr(model, "tabtune_task", "classification") == "classification" \
            else "reg_y_encoders"
        prefix = next((n for n, m in module.named_modules() if m is model), "")
        prefixes = [y_encoders if p == "y_encoder" else p for p in (prefixes or self.default_lora_prefixes)]
        if prefix:
            prefixes = [f"{prefix}.{p}" for p in prefixes]
        targets = self.modules_under(module, prefixes)
        return [n for n, m in targets.items() if type(m) in (nn.Linear, nn.Embedding)], []
