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

Context and retrieval. TabDPT was trained, and its estimator predicts on large
tables, with *retrieved* context: per test row, the nearest training rows
(``context_reduction="retrieval"``, FAISS L2 on standardised features). We do
the same: ``predict`` gets the whole training split (``prediction_context``
hands over every row); when it has at most ``max_context_rows`` rows, all of
them are one shared context and queries go through in chunks; when it has more,
each query row gets its own context, its ``max_context_rows`` nearest training
rows (L2 on features standardised with the training rows' statistics), batched
one query per context as the package does. Fine-tuning then trains on the same
kind of context: when the training split exceeds ``max_context_rows``,
``plan_episodes`` regroups each epoch's query rows into neighbourhoods (a random
unvisited anchor row and its nearest unvisited rows) and gives each episode the
rows nearest the anchor among the non-query rows as context, so the model is
tuned on local, retrieved contexts rather than random ones it never sees at
prediction. On a smaller split prediction uses all rows as context, and the
trainer's random disjoint contexts are already that kind.

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

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from .base import ModelAdapter, Task, class_shift_probs

REPO_ID = "Layer6/TabDPT"
CHECKPOINT = "tabdpt1_3.safetensors"  # tabdpt.estimator._MODEL_NAME
ROWS_PER_FORWARD = 65536  # query chunking: rows (context + query) per forward pass


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


def _pad(X: Tensor, width: int) -> Tensor:
    if X.shape[-1] > width:
        raise TabTuneError(f"TabDPT reads at most {width} features; this table has {X.shape[-1]} after "
                           f"preprocessing (drop columns with dataset.drop_columns)")
    return F.pad(X, (0, width - X.shape[-1]))


def _standardise_like(reference: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = reference.mean(0), reference.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return [(t - mean) / std for t in (reference, *others)]


def nearest_rows(X_pool: Tensor, X_query: Tensor, k: int) -> Tensor:
    """(n_query, k) indices of each query's ``k`` nearest pool rows (L2 on pool-standardised features)."""
    pool, query = _standardise_like(X_pool.float(), X_query.float())
    parts = []
    for start in range(0, len(query), 1024):
        d = torch.cdist(query[start:start + 1024], pool)
        parts.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(parts)


class TabDPTAdapter(ModelAdapter):
    name = "tabdpt"
    title = "TabDPT"
    tasks = ("classification", "regression")
    max_classes = 10
    limits = ("10 classes a head (more: class hierarchy); features <= the checkpoint's max_num_features; "
              "past max_context_rows each query retrieves its nearest rows")
    repo_id = REPO_ID
    checkpoints = {"classification": CHECKPOINT, "regression": CHECKPOINT}
    sizes = {
        "tiny": dict(emsize=16, nlayers=2, nhead=2, ff_dim=32, max_num_features=32, regression_bin_count=32),
        "small": dict(emsize=64, nlayers=4, nhead=4, ff_dim=128, max_num_features=64, regression_bin_count=64),
    }
    # the seed's transformer_encoder, encoder, y_encoder, head under their real names (module docstring)
    default_lora_prefixes = ("transformer_encoder", "encoder", "y_encoder", "head")

    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {"cfg": _cfg(**self.random_size(config), max_num_classes=self.max_classes),
                            "task": task.kind}
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
        module.eval()
        model = _tabdpt_model(module)
        rng = np.random.default_rng(0)
        Xc_all = torch.as_tensor(X_context, device=device, dtype=torch.float32)
        Xq_all = torch.as_tensor(X_query, device=device, dtype=torch.float32)
        y_all = torch.as_tensor(y_context, device=device, dtype=torch.float32)
        if not task.is_classification:
            from tabdpt.utils import normalize_data

            y_all, y_mean, y_std = normalize_data(y_all, return_mean_std=True)
        cap = config.max_context_rows
        neighbours = nearest_rows(Xc_all, Xq_all, cap) if len(Xc_all) > cap else None
        total = None
        for member in range(config.n_estimators):
            order = torch.arange(Xc_all.shape[1]) if member == 0 else torch.as_tensor(rng.permutation(Xc_all.shape[1]))
            shift = member % task.n_classes if task.is_classification else 0
            yc = (y_all + shift) % task.n_classes if task.is_classification else y_all
            Xc, Xq = Xc_all[:, order], Xq_all[:, order]
            parts = []
            if neighbours is None:  # one shared context, queries in chunks
                chunk = max(1, ROWS_PER_FORWARD - len(Xc))
                for start in range(0, len(Xq), chunk):
                    parts.append(self._forward(module, Xc[None], yc[None], Xq[None, start:start + chunk],
                                               task.is_classification)[0])
            else:  # retrieval: each query with its own nearest training rows
                chunk = max(1, ROWS_PER_FORWARD // (cap + 1))
                for start in range(0, len(Xq), chunk):
                    idx = neighbours[start:start + chunk]
                    parts.append(self._forward(module, Xc[idx], yc[idx], Xq[start:start + chunk, None],
                                               task.is_classification)[:, 0])
            out = torch.cat(parts).float()
            if task.is_classification:
                pred = torch.softmax(out[:, : task.n_classes] / config.softmax_temperature, dim=-1).cpu().numpy()
                pred = class_shift_probs(pred, shift)
            else:
                edges = torch.linspace(model.regression_bin_min, model.regression_bin_max,
                                       model.regression_bin_count + 1, device=out.device)
                centres = 0.5 * (edges[:-1] + edges[1:])
                value = (torch.softmax(out[:, model.n_out:], dim=-1) * centres).sum(-1)
                pred = (value * y_std + y_mean).cpu().numpy()
            total = pred if total is None else total + pred
        pred = total / config.n_estimators
        if task.is_classification:
            pred = pred / pred.sum(axis=1, keepdims=True)
        return pred

    # -- context -------------------------------------------------------------------------------
    def prediction_context(self, labels, n_rows: int, config: ModelConfig, seed: int) -> np.ndarray:
        """Every training row: ``predict`` retrieves each query's nearest rows itself past ``max_context_rows``."""
        return np.arange(n_rows)

    def plan_episodes(self, episodes: list, X: np.ndarray, config: ModelConfig, rng: np.random.Generator) -> list:
        """Past ``max_context_rows``, local episodes: neighbourhood queries, their nearest non-query rows as context."""
        n_rows = len(X)
        if n_rows <= config.max_context_rows or not episodes:
            return episodes
        n_query, n_context = len(episodes[0].query), len(episodes[0].context)
        Z = _standardise_like(torch.as_tensor(X, dtype=torch.float32))[0]
        visited = np.zeros(n_rows, dtype=bool)
        planned = []
        for episode in episodes:
            anchor = rng.choice(np.flatnonzero(~visited)) if (~visited).any() else rng.integers(n_rows)
            by_distance = torch.cdist(Z[anchor][None], Z)[0].argsort().numpy()
            fresh = by_distance[~visited[by_distance]][:n_query]
            query = np.concatenate([fresh, by_distance[~np.isin(by_distance, fresh)][: n_query - len(fresh)]])
            visited[query] = True
            context = by_distance[~np.isin(by_distance, query)][:n_context]
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
