"""The one training loop, shared by every model and by base-ft and peft alike.

Episodic: each step feeds a batch of episodes (context rows with labels, disjoint
query rows) through the adapter's differentiable forward and takes the loss on the
query rows. After every epoch the validation split is predicted through the
inference path with the training split as context; the best epoch's trainable
weights are restored at the end, and training stops early when validation has
not improved for ``early_stopping_patience`` epochs.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ..config import ModelConfig, StrategyConfig
from ..errors import TabTuneError
from ..evaluation.metrics import VALIDATION_METRIC, compute_metrics
from ..models.base import ModelAdapter, Task, predict_classes
from .episodes import epoch_episodes

log = logging.getLogger("tabtune")


@dataclass
class Split:
    X: np.ndarray
    y: np.ndarray


@dataclass
class TrainResult:
    best_epoch: int
    best_val: float
    val_before: float
    epochs_run: int
    steps: int
    history: list[dict] = field(default_factory=list)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def _autocast(precision: str, device: torch.device):
    if precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimizer(module: nn.Module, params: list, strategy: StrategyConfig, lr_ratio: float | None):
    if strategy.optimizer.value == "adamw":
        cls, extra = torch.optim.AdamW, {}
    else:
        cls, extra = torch.optim.SGD, {"momentum": 0.9}
    if lr_ratio is None:
        return cls(params, lr=strategy.learning_rate, weight_decay=strategy.weight_decay, **extra)
    from peft.optimizers import create_loraplus_optimizer

    # LoRA on embeddings learns at the plain rate here, not peft's default of 1e-6
    return create_loraplus_optimizer(module, cls, lr=strategy.learning_rate, loraplus_lr_ratio=lr_ratio,
                                     loraplus_weight_decay=strategy.weight_decay,
                                     loraplus_lr_embedding=strategy.learning_rate, **extra)


def validate(adapter: ModelAdapter, module: nn.Module, task: Task, train: Split, val: Split,
             model_config: ModelConfig, device: torch.device, seed: int) -> float:
    """The validation metric (lower is better) with the training split as context."""
    labels = train.y if task.is_classification else None
    ctx = adapter.prediction_context(labels, len(train.y), model_config, seed)
    pred = predict_classes(adapter, module, train.X[ctx], train.y[ctx], val.X, task, model_config, device)
    name, _ = VALIDATION_METRIC[task.kind]
    return compute_metrics(task.kind, val.y, pred)[name]


def _episode_tensors(batch, X_all: torch.Tensor, y_all: torch.Tensor, device: torch.device):
    """Stack a batch of episodes into (B, rows, features) tensors, applying each one's relabelling."""
    def stack(key):
        return torch.as_tensor(np.stack([getattr(e, key) for e in batch]), device=device)

    ctx, qry = stack("context"), stack("query")
    Xc, Xq, yc, yq = X_all[ctx], X_all[qry], y_all[ctx], y_all[qry]
    if batch[0].feature_order is not None:
        order = stack("feature_order")[:, None, :]
        Xc = Xc.gather(2, order.expand_as(Xc))
        Xq = Xq.gather(2, order.expand_as(Xq))
    if batch[0].class_order is not None:
        relabel = stack("class_order")
        yc, yq = relabel.gather(1, yc), relabel.gather(1, yq)
    return Xc, yc, Xq, yq


def train(adapter: ModelAdapter, module: nn.Module, task: Task, train_split: Split, val_split: Split,
          strategy: StrategyConfig, model_config: ModelConfig, device: torch.device, seed: int,
          on_record: Callable[[dict], None] | None = None, on_best: Callable[[nn.Module], None] | None = None,
          lr_ratio: float | None = None) -> TrainResult:
    """Fine-tune the trainable parameters of ``module`` in place; return what happened.

    ``on_best(module)`` runs whenever validation improves (``save_checkpoint_path``); ``lr_ratio`` is
    LoRA+ (peft's optimizer: the B matrices learn at ``lr_ratio`` x the learning rate)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TabTuneError("nothing to train: the model has no trainable parameters")
    optimizer = _optimizer(module, params, strategy, lr_ratio)
    n_rows = len(train_split.y)
    query_size = min(strategy.query_size, max(1, n_rows // 2))
    labels = train_split.y if task.is_classification else None

    def episodes_of(rng):
        return epoch_episodes(labels, n_rows, strategy.context_size, query_size, rng,
                              n_features=train_split.X.shape[1], n_classes=task.n_classes or None,
                              max_classes=adapter.max_classes)

    episodes_per_epoch = len(episodes_of(np.random.default_rng(0)))
    batches_per_epoch = math.ceil(episodes_per_epoch / strategy.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / strategy.gradient_accumulation_steps)
    total_steps = steps_per_epoch * strategy.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(strategy.scheduler.value, strategy.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type) if strategy.mixed_precision.value == "fp16" else None
    autocast = lambda: _autocast(strategy.mixed_precision.value, device)  # noqa: E731

    history: list[dict] = []

    def record(entry: dict) -> None:
        history.append(entry)
        if on_record is not None:
            on_record(entry)

    rng = np.random.default_rng(seed)
    X_all = torch.as_tensor(train_split.X, device=device)
    y_all = torch.as_tensor(train_split.y, device=device)
    metric_name, _ = VALIDATION_METRIC[task.kind]

    val_before = validate(adapter, module, task, train_split, val_split, model_config, device, seed)
    record({"epoch": 0, "step": 0, f"val_{metric_name}": val_before})
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    # the starting weights compete too: training that only makes validation worse is not kept
    best_val, best_epoch, stale, step = val_before, 0, 0, 0
    best_state = {n: p.detach().clone() for n, p in trainable.items()}

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not strategy.show_progress, transient=False)
    epoch = 0
    with progress:
        bar = progress.add_task("fine-tuning", total=total_steps, status="")
        for epoch in range(1, strategy.epochs + 1):
            module.train()
            episodes = episodes_of(rng)
            if not task.is_classification or task.n_classes <= (adapter.max_classes or task.n_classes):
                # class-grouped episodes (more classes than the head) keep the sampler's groups
                episodes = adapter.plan_episodes(episodes, train_split.X, model_config, rng)
            batches = [episodes[i:i + strategy.batch_size] for i in range(0, len(episodes), strategy.batch_size)]
            optimizer.zero_grad(set_to_none=True)
            running = []
            for b, batch in enumerate(batches):
                Xc, yc, Xq, yq = _episode_tensors(batch, X_all, y_all, device)
                episode_task = task if not task.is_classification else Task(
                    task.kind, max(e.n_classes for e in batch))
                with autocast():
                    out = adapter.episode_logits(module, Xc, yc, Xq, episode_task, model_config)
                    loss = adapter.episode_loss(out.float(), yq, episode_task)
                if not torch.isfinite(loss):
                    raise TabTuneError(f"training diverged at epoch {epoch} (loss {loss.item()}); "
                                       f"lower strategy.learning_rate (now {strategy.learning_rate})")
                scaled = loss / strategy.gradient_accumulation_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                running.append(loss.item())
                last = b == len(batches) - 1
                if (b + 1) % strategy.gradient_accumulation_steps == 0 or last:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if strategy.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, strategy.max_grad_norm)
                    (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    record({"epoch": epoch, "step": step, "loss": float(np.mean(running)),
                            "lr": scheduler.get_last_lr()[0]})
                    scheduler.step()
                    progress.update(bar, advance=1, status=f"epoch {epoch} loss {np.mean(running):.4f}")
                    running = []
            val = validate(adapter, module, task, train_split, val_split, model_config, device, seed)
            record({"epoch": epoch, "step": step, f"val_{metric_name}": val})
            progress.update(bar, status=f"epoch {epoch} val {metric_name} {val:.4f}")
            if val < best_val:
                best_val, best_epoch, stale = val, epoch, 0
                best_state = {n: p.detach().clone() for n, p in trainable.items()}
                if on_best is not None:
                    on_best(module)
            else:
                stale += 1
                if strategy.early_stopping_patience is not None and stale >= strategy.early_stopping_patience:
                    break
    if best_epoch == 0:
        log.warning("no epoch improved validation %s (%.4f before training): keeping the starting weights",
                    metric_name, val_before)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
    module.eval()
    return TrainResult(best_epoch=best_epoch, best_val=best_val, val_before=val_before, epochs_run=epoch,
                       steps=step, history=history)
