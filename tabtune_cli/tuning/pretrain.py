"""Pretraining an in-context model on synthetic tables: prior batches in, a checkpoint that resumes out.

The model is any adapter with a training forward on prior tables (``ModelAdapter.pretrain_logits``: nano,
TabICL); the loss is the adapter's own ``episode_loss``, as in fine-tuning. Every step's batch is drawn
from tabicl's prior after seeding the global RNGs with ``(seed, step)``, so a run is reproducible from its
config and a resumed run sees the same tables it would have seen without the interruption. The resumable
state is fine-tuning's own checkpoint (``checkpoint``: weights, optimizer, schedule, RNG states, in
``checkpoints/step-N/``, written whole); ``weights/`` beside it holds the latest weights in the model's
official format (``adapter.write_checkpoint``: ``nano.safetensors``, TabICL's ``{config, state_dict}``
container), loadable by ``model.checkpoint=`` and, for TabICL, by tabicl's own estimators.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..errors import TabTuneError
from ..models.base import ModelAdapter, Task
from ..models.registry import get_adapter
from . import checkpoint
from .trainer import _schedule

# the latest weights (the model's official checkpoint) and the folder the run resumes from (``checkpoint``)
WEIGHTS, CHECKPOINTS = "weights", "checkpoints"


def seed_everything(seed: int, step: int) -> None:
    mixed = (seed * 1_000_003 + step) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def make_prior(cfg: dict):
    from tabicl.prior import PriorDataset

    p = cfg["prior"]
    return PriorDataset(batch_size=p["tables_per_step"], batch_size_per_gp=p["tables_per_group"],
                        min_seq_len=p["min_rows"] or p["max_rows"] - 1, max_seq_len=p["max_rows"], min_features=2,
                        max_features=p["max_features"], max_classes=p["max_classes"],
                        log_n_features=p["log_n_features"], min_train_size=p["min_context_fraction"],
                        max_train_size=p["max_context_fraction"], prior_type=p["type"], n_jobs=1)


class PriorStream(torch.utils.data.IterableDataset):
    """The prior batches of steps ``start..end-1``, each drawn after seeding with ``(seed, step)``."""

    def __init__(self, cfg: dict, start: int, end: int):
        self.cfg, self.start, self.end = cfg, start, end

    def __iter__(self):
        torch.set_num_threads(1)
        prior = make_prior(self.cfg)
        for step in range(self.start, self.end):
            seed_everything(self.cfg["seed"], step)
            yield prior.get_batch()


def batch_loss(adapter: ModelAdapter, module, X: torch.Tensor, y: torch.Tensor, d: torch.Tensor,
               train_sizes: torch.Tensor, group: int, task: Task) -> torch.Tensor:
    """Mean query loss over the groups of a prior batch (a group shares its context size), each group cut to
    the widest of its tables (the prior pads every table to ``max_features`` columns)."""
    losses = []
    for start in range(0, X.shape[0], group):
        sl = slice(start, start + group)
        n_ctx = int(train_sizes[start])
        Xg, yg = X[sl, :, :int(d[sl].max())], y[sl]
        outputs = adapter.pretrain_logits(module, Xg, yg[:, :n_ctx], d[sl])
        losses.append(adapter.episode_loss(outputs, yg[:, n_ctx:].long(), task))
    return torch.stack(losses).mean()


def build_module(cfg: dict) -> tuple[ModelAdapter, torch.nn.Module, dict]:
    """``(adapter, module, architecture)`` of ``cfg["model"]``: ``name`` picks the adapter, the other keys are
    the architecture (the constructor's arguments); a key the constructor does not take is one line."""
    import re

    settings = dict(cfg["model"])
    adapter = get_adapter(settings.pop("name", "nano"))
    try:
        module = adapter.from_architecture(settings)
    except TypeError as exc:
        bad = re.search(r"argument '(\w+)'", str(exc))
        if bad is None:
            raise
        raise TabTuneError(f"model.{bad.group(1)}: not an architecture setting of {adapter.title} "
                           f"({str(exc).splitlines()[0]})") from None
    return adapter, module, settings


@dataclass
class PretrainResult:
    step: int
    loss: float
    out_dir: Path
    weights: Path | None  # the latest weights, in the model's official checkpoint format


def pretrain(cfg: dict, log=print, evaluate=None) -> PretrainResult:
    """Run (or resume) pretraining as ``cfg`` says; ``evaluate(model) -> dict`` is called every eval_every steps."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    rows = cfg["prior"]["min_rows"], cfg["prior"]["max_rows"]
    if rows[0] is not None and not 2 <= rows[0] < rows[1]:
        raise TabTuneError(f"prior.min_rows: must be at least 2 and below prior.max_rows ({rows[1]}), got {rows[0]}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    adapter, model, architecture = build_module(cfg)
    task = Task("classification", int(cfg["prior"]["max_classes"]))
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg["scheduler"], cfg["warmup_steps"],
                                                                       cfg["steps"]))
    start, earlier_seconds, loss_value = 0, 0.0, math.nan
    saved = checkpoint.latest(out / CHECKPOINTS)
    if saved is not None:
        tensors, state = checkpoint.load(saved, optimizer=optimizer, scheduler=scheduler)
        if state.get("model", "nano") != adapter.name:
            raise TabTuneError(f"{out} holds a pretraining run of {state['model']}, not {adapter.name}; "
                               f"choose another out_dir")
        if state["architecture"] != architecture:
            changed = sorted(k for k in set(state["architecture"]) | set(architecture)
                             if state["architecture"].get(k) != architecture.get(k))
            raise TabTuneError(f"{out} holds a run of another architecture (model.{changed[0]}: "
                               f"{state['architecture'].get(changed[0])} there, {architecture.get(changed[0])} asked); "
                               f"match it or choose another out_dir")
        model.load_state_dict(tensors["model"])
        start, earlier_seconds, loss_value = state["step"], state["wall_seconds"], state["loss"]
        if (out / "history.jsonl").is_file():  # steps after the checkpoint will be run again: drop their lines
            kept = [line for line in (out / "history.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            rundir.write_text(out / "history.jsonl", "".join(line + "\n" for line in kept))
        log(f"resumed from {saved} at step {start}")
    # one worker process draws prior batches while the main process trains on the previous ones
    # a run may stop early (stop_at) and go on later: the schedule always follows `steps`
    end = min(cfg["stop_at"] or cfg["steps"], cfg["steps"])
    if start >= end:
        log(f"already at step {start}: nothing to run (raise steps= to go on)")
    batches = torch.utils.data.DataLoader(PriorStream(cfg, start, end), batch_size=None,
                                          num_workers=cfg["prior_workers"],
                                          prefetch_factor=4 if cfg["prior_workers"] else None)
    group = cfg["prior"]["tables_per_group"]
    history = out / "history.jsonl"
    started = time.perf_counter()
    progress = Progress(TextColumn("[bold]pretraining"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not cfg["show_progress"])
    with progress:
        bar = progress.add_task("pretrain", total=cfg["steps"], completed=start, status="")
        t0 = time.perf_counter()
        for step, (X, y, d, _, train_sizes) in zip(range(start, end), batches):
            t_prior = time.perf_counter() - t0
            model.train()
            loss = batch_loss(adapter, model, X, y, d, train_sizes, group, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            seconds = time.perf_counter() - t0
            record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                      "seconds": seconds, "prior_wait_seconds": t_prior, "tables_per_second": X.shape[0] / seconds}
            if evaluate is not None and (step + 1) % cfg["eval_every"] == 0:
                record["zero_shot"] = evaluate(model)
                log(f"step {step + 1}: zero-shot {record['zero_shot']}")
            rundir.append_jsonl(history, record)
            if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == end:
                adapter.write_checkpoint(model, architecture, task, out / WEIGHTS)
                checkpoint.save(out / CHECKPOINTS, f"step-{step + 1:08d}", tensors={"model": model.state_dict()},
                                optimizer=optimizer, scheduler=scheduler,
                                state={"step": step + 1, "model": adapter.name, "architecture": architecture,
                                       "loss": loss_value,
                                       "wall_seconds": earlier_seconds + time.perf_counter() - started})
            progress.update(bar, advance=1, status=f"loss {loss_value:.4f} {seconds:.2f}s/step")
            t0 = time.perf_counter()
    written = sorted(p for p in (out / WEIGHTS).glob("*") if not p.name.startswith("."))  # not a .partial
    return PretrainResult(step=max(start, end), loss=loss_value, out_dir=out, weights=(written or [None])[0])
