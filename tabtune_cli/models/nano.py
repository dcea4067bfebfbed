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
"""

from __future__ import annotations

import json
from importlib import resources
from dataclasses import dataclass, field
from enum import Enum
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
from .base import ModelAdapter, Task, ensemble_predict, load_weights

CLIP = 5.0
TAIL = 1e-7  # the quantile view maps onto [-5.2, 5.2]


class View(str, Enum):
    """How an ensemble member sees the features: as given (the model standardises them), their quantiles,
    or the principal components of all columns."""

    standard = "standard"
    quantile = "quantile"
    pca = "pca"


@dataclass
class NanoConfig(ModelConfig):
    """nano's keys: the shared ones plus how a user's table is shown to the model."""

    name: str = "nano"
    n_estimators: int = 64
    max_input_features: int = 30
    one_hot_max_levels: int = 16
    preprocessing: List[View] = field(default_factory=lambda: list(View))
    # rescale the ensemble's log-probabilities and shift each class's, fitted to context rows that the
    # other half of the context predicts (the ensemble alone is underconfident)
    calibrate: bool = True

    def __post_init__(self):
        if self.one_hot_max_levels < 0:
            raise TabTuneError(f"model.one_hot_max_levels: must be 0 or more, got {self.one_hot_max_levels}")
        if self.max_input_features < 1:
            raise TabTuneError(f"model.max_input_features: must be at least 1, got {self.max_input_features}")
        if not self.preprocessing:
            raise TabTuneError(f"model.preprocessing: name at least one view ({', '.join(v.value for v in View)})")


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


def select_features(X_context: Tensor, y_context: Tensor, X_query: Tensor, limit: int):
    """Keep the ``limit`` columns that best separate the context's classes, in their given order."""
    if X_context.shape[-1] <= limit:
        return X_context, X_query
    keep = class_separation(X_context, y_context).topk(limit, dim=-1).indices.sort(dim=-1).values
    take = lambda X: X.gather(-1, keep.unsqueeze(1).expand(-1, X.shape[1], -1))  # noqa: E731
    return take(X_context), take(X_query)


def quantile_view(X_context: Tensor, X_query: Tensor):
    """Each feature's mid-rank among the context rows, mapped through the normal quantile function."""
    ordered = X_context.transpose(1, 2).contiguous().sort(dim=-1).values     # (B, F, n)
    n = ordered.shape[-1]

    def transform(X: Tensor) -> Tensor:
        values = X.transpose(1, 2).contiguous()
        # ties share the middle of their ranks; the context's extremes (and beyond) go to the far tails
        rank = (torch.searchsorted(ordered, values) + torch.searchsorted(ordered, values, right=True) - 1) / 2
        level = (rank.double() / max(n - 1, 1)).clamp(TAIL, 1 - TAIL)
        return torch.special.ndtri(level).transpose(1, 2).to(X.dtype)

    return transform(X_context), transform(X_query)


def pca_view(X_context: Tensor, X_query: Tensor, limit: int):
    """The rows projected on the leading ``limit`` principal axes of the standardised context.

    Axes are found per table of the batch; those with (numerically) no variance in any table are dropped.
    """
    mean = X_context.mean(dim=1, keepdim=True)
    std = X_context.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    Xc, Xq = ((X_context - mean) / std).double(), ((X_query - mean) / std).double()
    _, singular, axes = torch.linalg.svd(Xc, full_matrices=False)          # axes: (B, k, F)
    rank = int((singular > 1e-6 * singular[:, :1].clamp(min=1e-12)).sum(dim=-1).max())
    axes = axes[:, : max(1, min(limit, rank))].transpose(1, 2)
    return (Xc @ axes).to(X_context.dtype), (Xq @ axes).to(X_query.dtype)


def table_views(views: List[View], X_context: Tensor, y_context: Tensor, X_query: Tensor, limit: int):
    """``(context, query)`` features of each view in ``views``, at most ``limit`` columns each.

    The columns are chosen once for the views that take the most class-separating ones; ``pca`` sees all.
    """
    kept = select_features(X_context, y_context, X_query, limit)
    for view in views:
        if view == View.pca:
            yield pca_view(X_context, X_query, limit)
        else:
            yield quantile_view(*kept) if view == View.quantile else kept


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


def normalise(X_context: Tensor, X_query: Tensor, n_features: Tensor | None, max_features: int):
    """Standardise every feature by the context rows' mean and std, clip, rescale by width, zero-pad."""
    mean = X_context.mean(dim=1, keepdim=True)
    std = X_context.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    Xc = ((X_context - mean) / std).clamp(-CLIP, CLIP)
    Xq = ((X_query - mean) / std).clamp(-CLIP, CLIP)
    width = X_context.shape[-1]
    if n_features is None:
        n_features = torch.full((X_context.shape[0],), width, device=X_context.device)
    scale = torch.sqrt(max_features / n_features.clamp(min=1).float()).view(-1, 1, 1)
    pad = max_features - width
    return F.pad(Xc * scale, (0, pad)), F.pad(Xq * scale, (0, pad))


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

    def forward(self, h: Tensor, n_context: int) -> Tensor:
        x = self.norm1(h)
        context = x[:, :n_context]
        attended = F.scaled_dot_product_attention(self._heads(self.q(x)), self._heads(self.k(context)),
                                                  self._heads(self.v(context)))
        h = h + self.dropout(self.out(attended.transpose(1, 2).flatten(2)))
        return h + self.dropout(self.linear2(F.gelu(self.linear1(self.norm2(h)))))


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
        if X_context.shape[-1] > self.max_features:
            raise ValueError(f"nano takes at most {self.max_features} features, got {X_context.shape[-1]}")
        Xc, Xq = normalise(X_context, X_query, n_features, self.max_features)
        context = self.encoder(Xc) + self.label_embedding(y_context.long())
        h = torch.cat([context, self.encoder(Xq)], dim=1)
        for block in self.blocks:
            h = block(h, X_context.shape[1])
        return self.decoder(self.norm(h[:, X_context.shape[1]:]))


def shipped_checkpoint() -> Path:
    """The pretrained weights inside the package."""
    return Path(str(resources.files("tabtune_cli") / "weights" / "nano.safetensors"))


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


class NanoAdapter(ModelAdapter):
    name = "nano"
    title = "nano"
    config_class = NanoConfig
    tasks = ("classification",)
    max_classes = 10
    limits = "10 classes a head (more: class hierarchy); wider than max_input_features: the most separating columns"
    sizes = {"tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64),
             "small": dict(d_model=128, n_layers=6, n_heads=4, d_ff=256)}
    default_lora_prefixes = ("blocks", "decoder")

    def checkpoint_file(self, config: ModelConfig, task: Task) -> Path | None:
        if not config.pretrained:
            return None
        path = Path(config.checkpoint).expanduser() if config.checkpoint else shipped_checkpoint()
        if not path.is_file():
            where = "model.checkpoint" if config.checkpoint else "the package's nano weights"
            raise TabTuneError(f"{where}: no such file {str(path)!r}")
        return path

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

    def one_hot_max_levels(self, config: ModelConfig) -> int:
        return config.one_hot_max_levels

    @staticmethod
    def _input_limit(module, config: NanoConfig) -> int:
        width = getattr(module, "max_features", None) or module.get_base_model().max_features
        return min(config.max_input_features, width)

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        module.eval()
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None]  # noqa: E731
        Xc, yc, Xq = as_tensor(X_context), torch.as_tensor(y_context)[None], as_tensor(X_query)

        def forward(Xc, yc, Xq):
            logits = module(torch.as_tensor(Xc, device=device)[None], torch.as_tensor(yc, device=device)[None],
                            torch.as_tensor(Xq, device=device)[None])[0, :, : task.n_classes].float()
            return torch.softmax(logits / config.softmax_temperature, dim=-1).cpu().numpy()

        def ensemble(Xc, yc, Xq, n_estimators):
            # the members are shared out over the views in turn
            total = 0.0
            views = table_views(config.preprocessing, Xc, yc, Xq, self._input_limit(module, config))
            for i, (Xc_view, Xq_view) in enumerate(views):
                members = len(range(i, n_estimators, len(config.preprocessing)))
                if members:
                    total = total + members * ensemble_predict(Xc_view[0].numpy(), yc[0].numpy(), Xq_view[0].numpy(),
                                                               task, members, forward, chunk=4096)
            return total / max(n_estimators, 1)

        proba = ensemble(Xc, yc, Xq, config.n_estimators)
        if not config.calibrate:
            return proba
        # each half of the context is predicted from the other half (with at most 16 members); the halves
        # split every class, and the rows of a class that only one half holds (a class of one row) are not fitted
        labels = np.asarray(y_context)
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
        halves = order[0::2], order[1::2]
        fitted = np.isin(labels, np.intersect1d(labels[halves[0]], labels[halves[1]]))
        if not fitted.any():
            return proba
        cross = np.empty((len(labels), proba.shape[1]))
        for given, asked in (halves, halves[::-1]):
            cross[asked] = ensemble(Xc[:, given], yc[:, given], Xc[:, asked], min(config.n_estimators, 16))
        return rescale(proba, fit_calibration(cross[fitted], labels[fitted]))

    def lora_targets(self, module: nn.Module, prefixes):
        return [n for n, m in self.modules_under(module, prefixes).items() if isinstance(m, nn.Linear)], []
