"""``strategy=context``: context tuning. The model stays frozen; what trains is a small set of context rows
(features in the model's input space, i.e. after tabtune's preprocessing), learned by gradient descent through
the same episodes and loss as fine-tuning, in the spirit of TuneTables (Feuer et al., 2024), which tuned a
learned context for TabPFN.

The rows start as a seeded, stratified sample of the training rows and keep those rows' labels (hard labels:
a model's own label encoder decides how a label is read, and TabPFN reads a class as a number, so a soft
label cannot pass through every model's forward); their features move. At prediction they ``replace`` the
real context (the cost of a prediction no longer grows with the table: the saved context is these rows) or
``join`` it. A model whose episodes reach the context only through its package's own numpy preprocessing has
no gradient there, and says so in one line before anything runs (``ModelSpec.context_gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import StrategyConfig
from ..errors import TabTuneError
from .base import Strategy

if TYPE_CHECKING:
    import torch

MODES = ("replace", "join")


@dataclass
class ContextConfig(StrategyConfig):
    """base-ft's training keys, plus how many context rows learn and how they meet the real ones."""

    name: str = "context"
    context_rows: int = 64    # learned rows (classification: every class at least one, else in proportion)
    context_mode: str = "replace"  # replace: the learned rows are the whole context; join: added to the real one


class LearnedContext:
    """The learned rows: ``X`` (a parameter) and their labels ``y``; ``mode`` says how they meet an episode's
    real context. The trainer reads it through ``named_parameters()``, ``episode()`` and ``rows()``."""

    def __init__(self, X: np.ndarray, y: np.ndarray, mode: str, device):
        import torch

        self.X = torch.nn.Parameter(torch.as_tensor(X, dtype=torch.float32, device=device).clone())
        self.y = torch.as_tensor(y, device=device)
        self.mode = mode

    def named_parameters(self):
        return [("context.X", self.X)]

    def episode(self, Xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's context (B, rows, features) with the learned rows in place of, or beside, the real rows."""
        import torch

        X = self.X.unsqueeze(0).expand(Xc.shape[0], -1, -1)
        y = self.y.unsqueeze(0).expand(yc.shape[0], -1).to(yc.dtype)
        if self.mode == "replace":
            return X, y
        return torch.cat([Xc, X], dim=1), torch.cat([yc, y], dim=1)

    def rows(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The context prediction uses, given the real rows ``(X, y)``."""
        Xl, yl = self.X.detach().cpu().numpy(), self.y.cpu().numpy().astype(y.dtype)
        if self.mode == "replace":
            return Xl, yl
        return np.concatenate([X, Xl]), np.concatenate([y, yl])


class Context(Strategy):
    name = "context"
    description = "a few context rows (features; the model stays frozen)"
    config_class = ContextConfig
    changes_weights = False

    def check(self, config):
        if config.context_rows < 1:
            raise TabTuneError(f"strategy.context_rows must be at least 1, got {config.context_rows}")
        if config.context_mode not in MODES:
            raise TabTuneError(f"strategy.context_mode: {config.context_mode!r} is not one of: {', '.join(MODES)}")

    def check_model(self, spec):
        if not spec.context_gradients:
            raise TabTuneError(f"strategy=context: {spec.title}'s episodes reach the context rows only through "
                               f"its package's own preprocessing, which carries no gradient; this model cannot "
                               f"learn context rows (strategy=peft or base-ft can tune it)")

    def learned_context(self, adapter, task, config, X: np.ndarray, y: np.ndarray, seed: int, device):
        rng = np.random.default_rng([seed, 7])
        if task.is_classification:
            if adapter.max_classes and task.n_classes > adapter.max_classes:
                raise TabTuneError(f"strategy=context: {task.n_classes} classes, more than {adapter.title}'s "
                                   f"{adapter.max_classes} in one context; learned rows cannot hold them all")
            if config.context_rows < task.n_classes:
                raise TabTuneError(f"strategy.context_rows={config.context_rows}: fewer than the {task.n_classes} "
                                   f"classes; every class needs a row")
            keep = _stratified(y, config.context_rows, rng)
        else:
            keep = np.sort(rng.choice(len(y), size=min(config.context_rows, len(y)), replace=False))
        return LearnedContext(X[keep], y[keep], config.context_mode, device)

    def final_context(self, learned, X, y):
        return learned.rows(X, y)


def _stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` row indices (fewer if the table has fewer): every class at least one row, the rest in proportion."""
    classes, counts = np.unique(y, return_counts=True)
    n = min(n, len(y))
    share = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    while share.sum() > n:
        share[np.argmax(share)] -= 1
    for k in np.argsort(-counts):
        if share.sum() >= n:
            break
        share[k] += min(counts[k] - share[k], n - share.sum())
    picked = [rng.choice(np.flatnonzero(y == c), size=s, replace=False) for c, s in zip(classes, share)]
    return np.sort(np.concatenate(picked))
