"""TabICL through the tabicl package: its architecture, its checkpoint format, LoRA that reaches attention.

Checkpoints are TabICL's official format: a torch file holding a dict with
``config`` (the ``TabICL`` constructor's arguments) and ``state_dict``, loaded
with ``weights_only=True``.

LoRA. TabICL's attention keeps q/k/v in one packed ``in_proj_weight`` and reads
``out_proj.weight`` straight into ``F.linear``, so ``out_proj``'s own forward
never runs and a peft adapter on it would never touch the output. We therefore
(1) target the packed ``in_proj_weight`` with peft's ``target_parameters``, and
(2) give every attention module a forward of its own (``LiveOutProjAttention``,
tabicl's steps with its projections as calls) that *calls* ``out_proj``, so a
plain peft LoRA layer on it is live, and computes q/k/v as ``x·Wᵀ`` plus the
adapters' ``scaling·(x·Aᵀ)·Bᵀ`` (``modules.low_rank.packed_linear``; peft itself would rebuild
``W + B·A`` on every call and compute its full-size gradient, ``modules/lora_layers.py``).
The module tree and state-dict keys are unchanged, so official checkpoints load
as they are and peft's own ``PeftModel.from_pretrained`` restores the adapters on
any module this adapter builds. ``strategy.gradient_checkpointing`` turns on
tabicl's own ``recompute`` (each transformer block checkpointed in training).

Prediction is tabicl's own recipe, run by tabicl's own estimator. ``predict`` hands the module to a
``TabICLClassifier`` / ``TabICLRegressor`` (the package's fine-tuner injects its model the same way)
and lets the estimator do the rest: its per-member preprocessing (``EnsembleGenerator``: imputation,
standard scaling, ``"none"``/``"power"`` normalisation, outlier clipping), Latin-square feature shuffles,
cyclic class shifts, batched members, logits averaged and a softmax at ``softmax_temperature``, its AMP
choice (off on CPU, by table size on CUDA), and for regression the target scaler and the mean of the
quantiles. The boundary: numeric columns reach the estimator as the user gave them (``raw_numbers``:
float64, gaps as NaN); tabtune's shared preprocessor encodes only what the estimator would otherwise
read differently (categoricals as codes, dates, text). With no setting the estimator runs at its own
defaults: 8 members, every training row as context, temperature 0.9, ``random_state=42``, so the same raw
table gives ``TabICLClassifier()``'s probabilities (``tests/test_package_defaults.py``).

Training sees what prediction sees. ``episode_logits`` fits the same estimator on each episode's context
and sends the query rows through its members (``member_outputs``; ``strategy.train_n_estimators`` of them,
tabicl's own fine-tuner uses 2), then runs the module's training forward on those inputs and averages the
members' logits, as prediction averages them; in eval mode that equals the prediction path
(``tests/test_adapters.py::test_the_training_forward_is_the_prediction_forward``).

Mapped settings: ``model.n_estimators`` is the estimator's ``n_estimators``, ``model.softmax_temperature``
its ``softmax_temperature`` and ``model.max_context_rows`` (null: every row) a stratified cap on the
context a user may choose. Queries go to the estimator in one call, as a user of the package would send
them (each call encodes the context again); with ``model.kv_cache=true`` in chunks of ``QUERY_CHUNK`` rows,
so memory stays flat on big tables (query rows never see each other, so chunks change nothing but the last
bits).

The fitted estimator (its members' preprocessing) is kept in the adapter's ``ContextCache``, keyed on
the context arrays and the module's weights; new weights (a training step, an adapter swap) or another
context fit it again. Like the package, it keeps no key/value cache by default: at the default size the
cache holds about 50 KB a context row a member, 1.8x the package's peak memory at 10,000 rows
(``make bench ONLY=context_memory``). ``model.kv_cache=true`` keeps it (column-embedding and ICL
keys/values of every member), so repeated predictions pay only for their own rows; above the head's 10
classes tabicl refuses it (its many-class path re-reads the context).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabicl import TabICLClassifier, TabICLRegressor
from tabicl._model import attention as tabicl_attention
from tabicl._model.layers import MultiheadAttention
from tabicl._model.tabicl import TabICL
from torch import Tensor, nn

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from ..modules.low_rank import packed_linear
from .base import ContextCache, ModelAdapter, Task, known_class_loss, load_weights, to_task_classes
from .specs.tabicl import CHECKPOINTS, TabICLConfig, TabICLSpec

PLAIN_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
QUERY_CHUNK = 8192  # query rows per estimator call (with the context's keys/values cached)


def read_container(path, title: str) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a file in TabICL's container (TabICL, OrionMSP, OrionBix); no code runs.

    The ``_orig_mod.`` (torch.compile) and ``module.`` (DataParallel) key prefixes are stripped, as the
    Orion reference loaders do."""
    a_title = f"{'an' if title[0] in 'AEIOU' else 'a'} {title}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TabTuneError(f"{path}: not {a_title} checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint) \
            or not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["state_dict"], dict):
        raise TabTuneError(f"{path}: not {a_title} checkpoint (expected a dict with 'config' and 'state_dict')")
    state = {}
    for key, value in checkpoint["state_dict"].items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        state[key] = value
    return dict(checkpoint["config"]), state


def write_container(path: Path, config: dict, module: nn.Module) -> Path:
    """Write ``{"config", "state_dict"}`` (TabICL's container) to ``path``, atomically; returns ``path``.

    Only tensors and JSON-plain values go in, so the file loads with ``torch.load(weights_only=True)``."""
    try:
        config = json.loads(json.dumps(config))
    except TypeError as exc:
        raise TabTuneError(f"{path.name}: the model config is not plain data ({exc})") from None
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    return rundir.write_file(path, lambda tmp: torch.save({"config": config, "state_dict": state}, tmp))


class LiveOutProjAttention(MultiheadAttention):
    """TabICL's attention with its projections as calls of its own: ``out_proj`` through its forward (so
    a LoRA layer on it is live), and the packed q/k/v projection through ``packed_linear`` (so LoRA
    on ``in_proj_weight`` adds ``scaling·(x·Aᵀ)·Bᵀ`` and never rebuilds ``W + B·A``). The rest (masks,
    RoPE, scalable softmax, the key/value cache) is tabicl's ``multi_head_attention_forward`` step by
    step, with torch's packed-projection layout, so the numbers are the package's."""

    low_rank_parameters = ("in_proj_weight",)  # LoRA reaches it as factors (modules.lora_layers.LowRankParamWrapper)

    def forward(self, query, key=None, value=None, cached_kv=None, key_padding_mask=None, attn_mask=None,
                rope=None, need_kv=False):
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="src_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        *batch, tgt_len, dim = query.shape
        heads = self.num_heads
        if cached_kv is None:
            if key is None or value is None:
                raise ValueError("key and value must be provided when cached_kv is None")
            q, k, v = self._in_projection(query, key, value)
            src_len = key.shape[-2]
            k = k.view(*batch, src_len, heads, dim // heads).transpose(-3, -2)
            v = v.view(*batch, src_len, heads, dim // heads).transpose(-3, -2)
            if rope is not None:
                k = rope.rotate_queries_or_keys(k)
        else:
            k, v = cached_kv.key, cached_kv.value
            src_len = k.shape[-2]
            q = packed_linear(self, "in_proj_weight", query, slice(0, dim))
        q = q.view(*batch, tgt_len, heads, dim // heads).transpose(-3, -2)
        if rope is not None:
            q = rope.rotate_queries_or_keys(q)
        attn_mask = _attention_mask(attn_mask, key_padding_mask, batch, heads, tgt_len, src_len)
        out = tabicl_attention.sdpa_with_flattened_batch(q, k, v, attn_mask, self.dropout if self.training else 0.0,
                                                         ssmax_layer=self.ssmax_layer)
        out = self.out_proj(out.transpose(-3, -2).contiguous().view(*batch, tgt_len, dim))
        return (out, k, v) if need_kv and cached_kv is None else out

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as torch's ``_in_projection_packed`` computes them (one product for self-attention,
        two when key is value), each through ``packed_linear``."""
        dim = self.embed_dim
        if key is value:
            if query is key:
                proj = packed_linear(self, "in_proj_weight", query)
                proj = proj.unflatten(-1, (3, dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                return proj[0], proj[1], proj[2]
            kv = packed_linear(self, "in_proj_weight", key, slice(dim, 3 * dim))
            kv = kv.unflatten(-1, (2, dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return packed_linear(self, "in_proj_weight", query, slice(0, dim)), kv[0], kv[1]
        return tuple(packed_linear(self, "in_proj_weight", x, slice(i * dim, (i + 1) * dim))
                     for i, x in enumerate((query, key, value)))


def _attention_mask(attn_mask, key_padding_mask, batch: list, heads: int, tgt_len: int, src_len: int):
    """tabicl's mask handling: ``attn_mask`` broadcast to (..., heads, tgt, src), plus the key padding."""
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise ValueError(f"2D attn_mask should have shape {(tgt_len, src_len)}, but got {attn_mask.shape}")
            attn_mask = attn_mask.expand(*batch, heads, tgt_len, src_len)
        elif attn_mask.shape != (*batch, heads, tgt_len, src_len):
            raise ValueError(f"attn_mask should have shape {(*batch, heads, tgt_len, src_len)}, "
                             f"but got {attn_mask.shape}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (*batch, src_len):
            raise ValueError(f"key_padding_mask should have shape {(*batch, src_len)}, "
                             f"but got {key_padding_mask.shape}")
        key_padding_mask = key_padding_mask.view(*batch, 1, 1, src_len).expand(*batch, heads, tgt_len, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    return attn_mask


def _make_attention_live(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if type(sub) is MultiheadAttention:
            sub.__class__ = LiveOutProjAttention
    return module


class TabICLAdapter(TabICLSpec, ModelAdapter):
    def __init__(self):
        # one entry: the pipeline's context; a training step or another context replaces it
        self.context_cache = ContextCache(size=1)
        self.cache_context = True  # False: every predict fits the estimator and encodes the context anew

    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {**self.random_size(config), "max_classes": self.max_classes if task.is_classification else 0,
                            "zero_init": False}
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        architecture, state = read_container(path, self.title)
        is_regressor = architecture.get("max_classes", 10) == 0
        if is_regressor == task.is_classification:
            kind = "regression" if is_regressor else "classification"
            raise TabTuneError(f"{path}: this is a TabICL {kind} checkpoint, but the task is {task.kind}")
        module = self.from_architecture(architecture)
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        return _make_attention_live(TabICL(**architecture))

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """TabICL's own container under its official file name: ``TabICLClassifier(model_path=...)`` (or
        ``TabICLRegressor``) loads it into the package's ``TabICL``; the state-dict keys are the official ones."""
        return write_container(Path(path) / CHECKPOINTS[task.kind], architecture, module)

    # -- forward -------------------------------------------------------------------------------
    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        """Each episode as ``predict`` sees it: through the estimator's own members (``member_outputs``), their
        logits (regression: quantiles, in the episode's target units) averaged as the estimator averages them.

        Classes run in the episode's numbering; a class the episode's context lacks has no output (-inf), as
        the estimator gives it no probability. ``config.n_estimators`` members (``strategy.train_n_estimators``)."""
        config = config if config is not None else TabICLConfig()
        outputs = []
        for Xc, yc, Xq in zip(X_context, y_context, X_query):
            estimator, members = member_outputs(module, Xc, yc, Xq, task, config)
            if task.is_classification:
                outputs.append(to_task_classes(members.mean(0), estimator.classes_, task.n_classes))
            else:
                scale = estimator.y_scaler_
                outputs.append(members.mean(0) * float(scale.scale_[0]) + float(scale.mean_[0]))
        return torch.stack(outputs)

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        if task.is_classification:
            return known_class_loss(outputs, y_query)
        # pinball loss over the model's quantile levels
        n = outputs.shape[-1]
        alphas = torch.linspace(0.0, 1.0, n + 2, device=outputs.device, dtype=outputs.dtype)[1:-1]
        diff = y_query.unsqueeze(-1) - outputs
        return torch.where(diff >= 0, alphas * diff, (alphas - 1) * diff).mean()

    def pretrain_logits(self, module, X: Tensor, y_context: Tensor, n_features: Tensor) -> Tensor:
        """tabicl's own pretraining forward (``tabicl.train``): the whole table in training mode, the padded
        columns read as columns (``d=None``, its v2 default ``ignore_d``, which its feature grouping needs)."""
        return module(X, y_context, d=None)

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        """Class probabilities (n_query, n_classes) or values (n_query,): tabicl's estimator on tabtune's matrix."""
        module.eval()
        n_out = task.n_classes if task.is_classification else None
        if len(X_query) == 0:
            return np.zeros((0, n_out) if n_out else (0,), dtype=np.float32)
        # the package's default is no key/value cache; tabicl keeps none past its head's classes either way
        # (its many-class path re-reads the context)
        kv_cache = getattr(config, "kv_cache", False) and (
            not task.is_classification or len(np.unique(y_context)) <= module.max_classes)

        def fit(kv: bool):
            return own_estimator(module, task, config, device, kv).fit(X_context, y_context)

        settings = (task, config.n_estimators, config.softmax_temperature, str(device), kv_cache)
        if self.cache_context:
            estimator = self.context_cache.get(module, (X_context, y_context), lambda: fit(kv_cache), settings)
        else:
            estimator = fit(False)
        # without the cache every call encodes the context again: all queries in one call, as the package (its
        # own batching and offloading bound the memory); with it, chunks keep memory flat for nothing
        chunk = QUERY_CHUNK if estimator.kv_cache else len(X_query)
        answer = estimator.predict_proba if task.is_classification else estimator.predict
        out = np.concatenate([answer(X_query[start:start + chunk]) for start in range(0, len(X_query), chunk)])
        if self.cache_context and hasattr(module, "peft_config"):  # only peft's forward moves the counters
            self.context_cache.settle(module, (X_context, y_context), estimator, settings)
        if not task.is_classification:
            return out
        probs = np.zeros((len(X_query), n_out), dtype=out.dtype)
        probs[:, estimator.classes_] = out  # a class the context lacks keeps probability 0
        return probs

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        targets = self.modules_under(module, prefixes)
        # plain linear layers only: TabICL's OneHotAndLinear/SkippableLinear transform their input
        # before the matmul, so a LoRA beside them would see the wrong input
        linears = [n for n, m in targets.items() if type(m) in PLAIN_LINEAR and "ssmax" not in n]
        packed = [f"{n}.in_proj_weight" for n, m in targets.items() if isinstance(m, MultiheadAttention)]
        return linears, packed

    def set_gradient_checkpointing(self, module: nn.Module, enabled: bool = True) -> None:
        """TabICL's own switch, ``recompute``, on its column, row and ICL transformers: tabicl runs each of
        their blocks through ``torch.utils.checkpoint`` (non-reentrant) in the training forward."""
        for sub in module.modules():
            if hasattr(sub, "recompute"):
                sub.recompute = enabled


def member_outputs(module: nn.Module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                   config: ModelConfig):
    """``(estimator, outputs)``: tabicl's estimator fitted on one episode's context, and the module's outputs
    for the query rows from each of its members, with gradients (E, n_query, classes present) or
    (E, n_query, quantiles in the estimator's scaled target units).

    The members are the estimator's own (``EnsembleGenerator``: imputation, scaling, ``"none"``/``"power"``
    normalisation, outlier clipping, Latin-square feature shuffles, cyclic class shifts), fitted on the
    context exactly as ``predict`` fits them; each member's class columns are put back in the context's class
    order (the estimator's ``classes_``), as its ``predict_proba`` does. In eval mode the outputs are the
    ones ``predict`` averages (``tests/test_adapters.py::test_the_training_forward_is_the_prediction_forward``); in train mode tabicl's training forward
    runs on the same inputs."""
    device = X_context.device
    estimator = own_estimator(module, task, config, device, kv_cache=False)
    training = module.training
    y = y_context.detach().cpu().numpy()
    estimator.fit(X_context.detach().cpu().numpy(), y.astype(np.int64) if task.is_classification else y)
    module.train(training)  # the estimator's fit switches the model it holds to eval
    views = estimator.ensemble_generator_.transform(estimator.X_encoder_.transform(X_query.detach().cpu().numpy()),
                                                    mode="both")
    outputs = []
    for norm_method, (Xs, ys) in views.items():
        shuffles = np.asarray(estimator.ensemble_generator_.feature_shuffles_[norm_method]).tolist()
        kwargs = dict(return_logits=True, softmax_temperature=estimator.softmax_temperature) \
            if task.is_classification else {}
        outputs.append(module(X=torch.from_numpy(Xs).float().to(device), y_train=torch.from_numpy(ys).float().to(device),
                              feature_shuffles=shuffles, inference_config=estimator.inference_config_, **kwargs))
    outputs = torch.cat(outputs)
    if not task.is_classification:
        return estimator, outputs
    n_present = len(estimator.classes_)
    shifts = [shift for member in estimator.ensemble_generator_.class_shuffles_.values() for shift in member]
    return estimator, torch.stack([out[..., :n_present][..., list(shift)] for out, shift in zip(outputs, shifts)])


def own_estimator(module: nn.Module, task: Task, config: ModelConfig, device, kv_cache: bool):
    """tabicl's own unfitted ``TabICLClassifier`` / ``TabICLRegressor`` at tabtune's settings, holding ``module``.

    ``module`` replaces the checkpoint the estimator would load (no copy: the estimator predicts
    with these weights, LoRA included), as tabicl's own fine-tuner does for its validation."""
    settings = dict(kv_cache=kv_cache, device=torch.device(device), allow_auto_download=False, verbose=False)
    if config.n_estimators is not None:  # null: the estimator's own default
        settings["n_estimators"] = config.n_estimators
    if task.is_classification:
        if config.softmax_temperature is not None:
            settings["softmax_temperature"] = config.softmax_temperature
        estimator = TabICLClassifier(**settings)
    else:
        estimator = TabICLRegressor(**settings)
    estimator.model_ = module
    estimator._load_model = lambda: None  # the instance attribute shadows the checkpoint loader
    return estimator
