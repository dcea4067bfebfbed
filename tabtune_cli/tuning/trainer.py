"""The one training loop, shared by every model and by base-ft and peft alike.

Episodic: each step feeds a batch of episodes (context rows with labels, disjoint
query rows) through the adapter's differentiable forward and takes the loss on the
query rows. Episodes come from successive passes over the training rows, and an
epoch is ``steps_per_epoch`` optimizer steps whatever the table's size (null: one
pass), so a small table trains as long as a large one. After every epoch the
validation split (at most ``val_max_rows`` of it) is predicted through the inference
path, with at most ``val_n_estimators`` ensemble members and the training split as
context; the best epoch's trainable weights are restored at the end (the starting
weights compete as epoch 0, so training that only hurts is not kept; a pretrained
start is replaced only by weights whose validation ROC AUC is at least its own), and
training stops early when validation has not improved for ``early_stopping_patience``
epochs. A non-finite loss stops training too, with the best weights so far kept.

Launched by ``torchrun``, the ranks share every batch and average their gradients
(``distributed``). Given a ``checkpoints`` folder, every epoch ends in a resumable checkpoint (``checkpoint``:
trainable and best weights, optimizer, scheduler, RNG states, the episode stream's place), and a
loop started on a folder that holds one carries on from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ..config import ModelConfig, StrategyConfig, to_dict
from ..errors import TabTuneError
from ..evaluation.metrics import HIGHER_IS_BETTER, VALIDATION_METRIC, compute_metrics
from ..models.base import ModelAdapter, Task, predict_classes
from . import checkpoint, distributed
from ..data.episodes import context_rows, epoch_episodes

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
    best_step: int = 0
    seconds: float = 0.0
    val_seconds: float = 0.0  # of ``seconds``, spent in validation passes (the start's included)
    stopped: str | None = None  # why training ended before its epochs were done (divergence)
    val_metric: str = "log_loss"  # what best_val and val_before measure (strategy.early_stopping_metric)
    resumed_after: int | None = None  # the epoch of the checkpoint this training resumed from


@dataclass
class LoopState:
    """Where training stands: everything a checkpoint saves beside the tensors (the trainable and the best
    weights, the optimizer's, the scheduler's), restored whole by a resumed loop."""

    start: dict                 # the starting weights' validation scores (epoch 0)
    val_before: float           # of those, the watched metric's
    best_val: float
    best_epoch: int = 0         # 0: the start
    best_step: int = 0
    stale: int = 0              # validation passes since the last improvement (early stopping counts them)
    step: int = 0               # optimizer steps taken
    epoch: int = 0              # epochs finished
    finished: bool = False      # early stopping said so
    cursor: dict = field(default_factory=lambda: {"pass": 0, "offset": 0})  # the episode stream's place
    seconds: float = 0.0        # wall time of the parts before this process's (a resumed run's)
    val_seconds: float = 0.0    # of all the training time, spent in validation passes
    history: list = field(default_factory=list)


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


def watched_metric(strategy: StrategyConfig, task: Task) -> str:
    """The validation metric early stopping watches: ``strategy.early_stopping_metric``'s for the task's kind,
    else the training objective's (``VALIDATION_METRIC``)."""
    return (strategy.early_stopping_metric or {}).get(task.kind) or VALIDATION_METRIC[task.kind][0]


def validate(adapter: ModelAdapter, module: nn.Module, task: Task, train: Split, val: Split,
             model_config: ModelConfig, device: torch.device, seed: int,
             target_scale: tuple[float, float] | None = None, name: str | None = None) -> dict[str, float | None]:
    """The validation metrics with the training split as context: the watched one (``name``; default the
    objective's, ``VALIDATION_METRIC``) and, for classification, ROC AUC. ``target_scale`` (mean, std): the
    regression target was standardised with it, and the metrics are in the target's own units, as the run
    reports them."""
    labels = train.y if task.is_classification else None
    ctx = adapter.prediction_context(labels, len(train.y), model_config, seed)
    pred = predict_classes(adapter, module, train.X[ctx], train.y[ctx], val.X, task, model_config, device)
    y = val.y
    name = name or VALIDATION_METRIC[task.kind][0]
    if not np.isfinite(pred).all():  # diverged weights: no metric to take (the trainer stops on a NaN)
        return {name: float("nan"), **({"roc_auc": None} if task.is_classification else {})}
    if target_scale is not None:
        mean, std = target_scale
        y, pred = y * std + mean, pred * std + mean
    metrics = compute_metrics(task.kind, y, pred)
    if metrics[name] is None:
        raise TabTuneError(f"strategy.early_stopping_metric.{task.kind}: {name} is undefined on this validation "
                           f"split ({len(np.unique(val.y))} class); choose another metric or more rows")
    return {name: metrics[name], **({"roc_auc": metrics["roc_auc"]} if task.is_classification else {})}


def _episode_tensors(batch, X_all: torch.Tensor, y_all: torch.Tensor, device: torch.device, learned=None):
    """Stack a batch of episodes into (B, rows, features) tensors, applying each one's relabelling;
    ``learned`` (a strategy's learned context rows) stands in for or joins each episode's context."""
    def stack(key):
        return torch.as_tensor(np.stack([getattr(e, key) for e in batch]), device=device)

    ctx, qry = stack("context"), stack("query")
    Xc, Xq, yc, yq = X_all[ctx], X_all[qry], y_all[ctx], y_all[qry]
    if learned is not None:
        Xc, yc = learned.episode(Xc, yc)
    if batch[0].feature_order is not None:
        order = stack("feature_order")[:, None, :]
        Xc = Xc.gather(2, order.expand_as(Xc))
        Xq = Xq.gather(2, order.expand_as(Xq))
    if batch[0].class_order is not None:
        relabel = stack("class_order")
        yc, yq = relabel.gather(1, yc), relabel.gather(1, yq)
    return Xc, yc, Xq, yq


def validation_setup(task: Task, val_split: Split, strategy: StrategyConfig, model_config: ModelConfig,
                     seed: int) -> tuple[Split, ModelConfig]:
    """The validation rows and model settings a validation pass uses: the split capped at ``val_max_rows``
    (seeded, stratified) and at most ``val_n_estimators`` ensemble members."""
    if strategy.val_max_rows is not None and len(val_split.y) > strategy.val_max_rows:
        keep = context_rows(val_split.y if task.is_classification else None, len(val_split.y),
                            strategy.val_max_rows, seed)
        val_split = Split(val_split.X[keep], val_split.y[keep])
    return val_split, capped_members(model_config, strategy.val_n_estimators)


def capped_members(model_config: ModelConfig, cap: int | None) -> ModelConfig:
    """``model_config`` with at most ``cap`` ensemble members (a model's own default, null, counts as more)."""
    members = model_config.n_estimators
    if cap is not None and (members is None or members > cap):
        return dataclasses.replace(model_config, n_estimators=cap)
    return model_config


def train(adapter: ModelAdapter, module: nn.Module, task: Task, train_split: Split, val_split: Split,
          strategy: StrategyConfig, model_config: ModelConfig, device: torch.device, seed: int,
          on_record: Callable[[dict], None] | None = None, on_best: Callable[[nn.Module], None] | None = None,
          lr_ratio: float | None = None, checkpoints: Path | None = None,
          target_scale: tuple[float, float] | None = None, learned=None) -> TrainResult:
    """Fine-tune the trainable parameters of ``module`` in place; return what happened.

    ``on_best(module)`` runs whenever validation improves (``save_checkpoint_path``); ``lr_ratio`` is
    LoRA+ (peft's optimizer: the B matrices learn at ``lr_ratio`` x the learning rate); ``target_scale``
    (mean, std) puts regression validation in the target's own units (history, best value), as evaluation is.

    ``checkpoints``: a folder where every epoch ends in a resumable checkpoint (see ``checkpoint``); if it
    already holds one, training resumes from it, replaying its history through ``on_record`` first, and
    ends as the uninterrupted run would have (the same episodes, RNG states and schedule).

    ``learned``: context rows that train in place of (or beside) each episode's real context
    (``strategies.context.LearnedContext``: ``named_parameters()``, ``episode(Xc, yc)``, ``rows(X, y)``);
    validation predicts with them as its context too."""
    started = time.perf_counter()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    trainable.update(dict(learned.named_parameters()) if learned is not None else {})
    params = list(trainable.values())
    if not params:
        raise TabTuneError("nothing to train: the model has no trainable parameters")
    optimizer = _optimizer(module, params, strategy, lr_ratio)
    n_rows = len(train_split.y)
    labels = train_split.y if task.is_classification else None

    def sample(generator: np.random.Generator) -> list:
        return epoch_episodes(labels, n_rows, strategy.context_size, strategy.query_size, generator,
                              n_features=train_split.X.shape[1], n_classes=task.n_classes or None,
                              max_classes=adapter.max_classes)

    def one_pass(index: int) -> list:
        # each pass over the rows draws from its own seeded generator, so a resumed run re-enters any pass
        generator = np.random.default_rng([seed, index])
        episodes = sample(generator)
        if not task.is_classification or task.n_classes <= (adapter.max_classes or task.n_classes):
            # class-grouped episodes (more classes than the head) keep the sampler's groups
            episodes = adapter.plan_episodes(episodes, train_split.X, model_config, generator)
        return episodes

    current: dict[int, list] = {}

    def take(n: int) -> list:
        cursor = loop.cursor  # where the episode stream stands: saved with every checkpoint
        out: list = []
        while len(out) < n:
            if cursor["pass"] not in current:
                current.clear()
                current[cursor["pass"]] = one_pass(cursor["pass"])
            episodes = current[cursor["pass"]]
            part = episodes[cursor["offset"]:cursor["offset"] + n - len(out)]
            out += part
            cursor["offset"] += len(part)
            if cursor["offset"] >= len(episodes):
                cursor["pass"], cursor["offset"] = cursor["pass"] + 1, 0
        return out

    accumulation, batch_size = strategy.gradient_accumulation_steps, strategy.batch_size
    if strategy.steps_per_epoch is None:  # an epoch is one pass: its batches, the last one maybe short
        per_pass = len(sample(np.random.default_rng(0)))
        steps_per_epoch = math.ceil(math.ceil(per_pass / batch_size) / accumulation)
    else:
        steps_per_epoch = strategy.steps_per_epoch
    total_steps = steps_per_epoch * strategy.epochs

    def epoch_batches(epoch: int) -> list[list]:
        if strategy.steps_per_epoch is None:
            ep = one_pass(epoch - 1)
            return [ep[i:i + batch_size] for i in range(0, len(ep), batch_size)]
        return [take(batch_size) for _ in range(steps_per_epoch * accumulation)]

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(strategy.scheduler.value, strategy.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type) if strategy.mixed_precision.value == "fp16" else None
    autocast = lambda: _autocast(strategy.mixed_precision.value, device)  # noqa: E731

    rank, ranks = distributed.join(device)  # torchrun: this process's share of every batch (else 0 of 1)

    def record(entry: dict) -> None:
        loop.history.append(entry)
        if on_record is not None and rank == 0:
            on_record(entry)

    X_all = torch.as_tensor(train_split.X, device=device)
    y_all = torch.as_tensor(train_split.y, device=device)
    metric_name = watched_metric(strategy, task)
    higher_is_better = metric_name in HIGHER_IS_BETTER
    val_split, val_config = validation_setup(task, val_split, strategy, model_config, seed)
    train_config = capped_members(model_config, strategy.train_n_estimators)
    def validation() -> dict:
        began = time.perf_counter()
        context = train_split if learned is None else Split(*learned.rows(train_split.X, train_split.y))
        scores = validate(adapter, module, task, context, val_split, val_config, device, seed, target_scale,
                          metric_name)
        loop.val_seconds += time.perf_counter() - began
        return scores

    # what a checkpoint must have been made by to be resumed here
    identity = {"rows": n_rows, "features": int(train_split.X.shape[1]), "task": task.kind,
                "n_classes": task.n_classes, "seed": seed,
                "strategy": {k: v for k, v in to_dict(strategy).items() if k != "show_progress"}}
    saved = checkpoint.latest(checkpoints) if checkpoints is not None else None
    if saved is None:
        loop = LoopState(start={}, val_before=math.nan, best_val=math.nan)
        loop.start = validation()
        record({"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in loop.start.items()}})
        loop.val_before = loop.best_val = loop.start[metric_name]
        best_state = {n: p.detach().clone() for n, p in trainable.items()}
    else:
        tensors, state = checkpoint.load(saved, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        _check_identity(saved, state.pop("identity"), identity)
        _restore(saved, trainable, tensors["trainable"])
        best_state = {n: tensors["best"][n].to(device=p.device, dtype=p.dtype) for n, p in trainable.items()}
        loop = LoopState(**{f.name: state[f.name] for f in dataclasses.fields(LoopState) if f.name != "history"})
        for entry in state["history"]:
            record(entry)
        log.info("resumed from %s after epoch %d (step %d)", saved, loop.epoch, loop.step)
    resumed_after = None if saved is None else loop.epoch
    # The starting weights compete too: training that only makes validation worse is not kept. A pretrained
    # start also keeps its ranking: a lower log loss (often only calibration) at a lower ROC AUC than the
    # start's on the validation rows does not replace it, since such weights rank test rows worse too.
    guard_auc = model_config.pretrained and loop.start.get("roc_auc") is not None
    stopped = None

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not strategy.show_progress or rank != 0, transient=False)
    with progress:
        bar = progress.add_task("fine-tuning", total=total_steps, completed=loop.step, status="")
        for epoch in range(loop.epoch + 1, 0 if loop.finished else strategy.epochs + 1):
            loop.epoch = epoch
            module.train()
            batches = epoch_batches(epoch)
            optimizer.zero_grad(set_to_none=True)
            running = []
            for b, batch in enumerate(batches):
                episode_task = task if not task.is_classification else Task(
                    task.kind, max(e.n_classes for e in batch))
                if ranks > 1:
                    batch = distributed.shard(batch, rank, ranks)
                Xc, yc, Xq, yq = _episode_tensors(batch, X_all, y_all, device, learned)
                # dropout's masks follow the episodes, not the process that feeds them (see distributed)
                torch.manual_seed(distributed.micro_batch_seed(seed, epoch, b * ranks + rank))
                with autocast():
                    out = adapter.episode_logits(module, Xc, yc, Xq, episode_task, train_config)
                    loss = adapter.episode_loss(out.float(), yq, episode_task)
                diverged = not bool(torch.isfinite(loss))
                if ranks > 1:  # all ranks stop together, or the others would wait for it forever
                    diverged = distributed.any_rank(diverged)
                if diverged:
                    stopped = (f"training diverged at epoch {epoch}, step {loop.step + 1} (loss {loss.item()}): "
                               f"stopped there, keeping the best weights so far (epoch {loop.best_epoch}); lower "
                               f"strategy.learning_rate (now {strategy.learning_rate})")
                    log.warning(stopped)
                    break
                scaled = loss / accumulation
                (scaler.scale(scaled) if scaler else scaled).backward()
                running.append(loss.item())
                last = b == len(batches) - 1
                if (b + 1) % accumulation == 0 or last:
                    if ranks > 1:
                        distributed.average_gradients(params, ranks)
                    if scaler:
                        scaler.unscale_(optimizer)
                    if strategy.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, strategy.max_grad_norm)
                    (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loop.step += 1
                    record({"epoch": epoch, "step": loop.step, "loss": float(np.mean(running)),
                            "lr": scheduler.get_last_lr()[0]})
                    scheduler.step()
                    progress.update(bar, advance=1, status=f"epoch {epoch} loss {np.mean(running):.4f}")
                    running = []
            if stopped:
                break
            scores = validation()
            val = scores[metric_name]
            if not math.isfinite(val):  # a loss can stay finite while the weights it left predict NaN
                stopped = (f"training diverged at epoch {epoch}, step {loop.step} (its validation predictions are "
                           f"not finite): stopped there, keeping the best weights so far (epoch {loop.best_epoch}); lower "
                           f"strategy.learning_rate (now {strategy.learning_rate})")
                log.warning(stopped)
                break
            record({"epoch": epoch, "step": loop.step, **{f"val_{k}": v for k, v in scores.items()}})
            progress.update(bar, status=f"epoch {epoch} val {metric_name} {val:.4f}")
            ranks_as_well = not guard_auc or (scores["roc_auc"] or 0.0) >= loop.start["roc_auc"]
            if (val > loop.best_val if higher_is_better else val < loop.best_val) and ranks_as_well:
                loop.best_val, loop.best_epoch, loop.best_step, loop.stale = val, epoch, loop.step, 0
                best_state = {n: p.detach().clone() for n, p in trainable.items()}
                if on_best is not None and rank == 0:
                    on_best(module)
            else:
                loop.stale += 1
            loop.finished = (strategy.early_stopping_patience is not None
                             and loop.stale >= strategy.early_stopping_patience)
            if checkpoints is not None and rank == 0:
                checkpoint.save(
                    checkpoints, f"epoch-{epoch:04d}", tensors={"trainable": trainable, "best": best_state},
                    optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    state={"identity": identity, **dataclasses.asdict(loop),
                           "seconds": loop.seconds + time.perf_counter() - started})
            if loop.finished:
                break
    if loop.best_epoch == 0 and not stopped:
        log.warning("no epoch improved validation %s (%.4f before training)%s: keeping the starting weights",
                    metric_name, loop.val_before, " without lowering its ROC AUC" if guard_auc else "")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
    module.eval()
    return TrainResult(best_epoch=loop.best_epoch, best_val=loop.best_val, val_before=loop.val_before,
                       epochs_run=loop.epoch, steps=loop.step, history=loop.history, best_step=loop.best_step,
                       seconds=loop.seconds + time.perf_counter() - started, val_seconds=loop.val_seconds,
                       stopped=stopped, resumed_after=resumed_after, val_metric=metric_name)


def _check_identity(folder: Path, saved: dict, current: dict) -> None:
    """A checkpoint resumes only the training that made it: same rows, task, seed and strategy."""
    flat = lambda d: {f"{k}.{kk}" if isinstance(v, dict) else k: vv  # noqa: E731
                      for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)])}
    before, now = flat(saved), flat(current)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            raise TabTuneError(f"{folder}: made by another training ({key}: {before.get(key)!r} there, "
                               f"{now.get(key)!r} now); it cannot be resumed with these settings")


def _restore(folder: Path, trainable: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(trainable):
        odd = sorted(set(saved) ^ set(trainable))[0]
        raise TabTuneError(f"{folder}: its weights do not fit this model's trainable parameters (first: {odd})")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(saved[n])
