"""Pretraining nano on synthetic tables: prior batches in, a checkpoint that resumes out.

Every step's batch is drawn from tabicl's prior after seeding the global RNGs with
``(seed, step)``, so a run is reproducible from its config and a resumed run sees
the same tables it would have seen without the interruption. The resumable state is
fine-tuning's own checkpoint (``checkpoint``: weights, optimizer, schedule, RNG states,
in ``checkpoints/step-N/``, written whole); ``nano-last.safetensors`` beside it is the
latest weights as a nano checkpoint, loadable by the nano adapter as is.
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
import torch.nn.functional as F
from safetensors.torch import save_file

from .. import rundir
from ..errors import TabTuneError
from ..models.nano import NanoICL
from . import checkpoint
from .trainer import _schedule

# the weights to use (a nano checkpoint) and the folder the run resumes from (``checkpoint``)
WEIGHTS, CHECKPOINTS = "nano-last.safetensors", "checkpoints"


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


def batch_loss(model: NanoICL, X: torch.Tensor, y: torch.Tensor, d: torch.Tensor, train_sizes: torch.Tensor,
               group: int) -> torch.Tensor:
    """Mean query cross-entropy over the groups of a prior batch (a group shares its context size)."""
    losses = []
    for start in range(0, X.shape[0], group):
        sl = slice(start, start + group)
        n_ctx = int(train_sizes[start])
        width = int(d[sl].max())
        Xg, yg = X[sl, :, :width], y[sl].long()
        logits = model(Xg[:, :n_ctx], yg[:, :n_ctx], Xg[:, n_ctx:], n_features=d[sl])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yg[:, n_ctx:].reshape(-1)))
    return torch.stack(losses).mean()


def save_weights(model: NanoICL, architecture: dict, path: Path, extra: dict | None = None) -> None:
    metadata = {"architecture": json.dumps(architecture), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    rundir.write_file(path, lambda tmp: save_file(state, tmp, metadata=metadata))


@dataclass
class PretrainResult:
    step: int
    loss: float
    out_dir: Path


def pretrain(cfg: dict, log=print, evaluate=None) -> PretrainResult:
    """Run (or resume) pretraining as ``cfg`` says; ``evaluate(model) -> dict`` is called every eval_every steps."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    rows = cfg["prior"]["min_rows"], cfg["prior"]["max_rows"]
    if rows[0] is not None and not 2 <= rows[0] < rows[1]:
        raise TabTuneError(f"prior.min_rows: must be at least 2 and below prior.max_rows ({rows[1]}), got {rows[0]}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    architecture = dict(cfg["model"])
    torch.manual_seed(cfg["seed"])
    model = NanoICL(**architecture)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg["scheduler"], cfg["warmup_steps"],
                                                                       cfg["steps"]))
    start, earlier_seconds, loss_value = 0, 0.0, math.nan
    saved = checkpoint.latest(out / CHECKPOINTS)
    if saved is not None:
        tensors, state = checkpoint.load(saved, optimizer=optimizer, scheduler=scheduler)
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
            loss = batch_loss(model, X, y, d, train_sizes, group)
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
                save_weights(model, architecture, out / WEIGHTS, {"step": step + 1})
                checkpoint.save(out / CHECKPOINTS, f"step-{step + 1:08d}", tensors={"model": model.state_dict()},
                                optimizer=optimizer, scheduler=scheduler,
                                state={"step": step + 1, "architecture": architecture, "loss": loss_value,
                                       "wall_seconds": earlier_seconds + time.perf_counter() - started})
            progress.update(bar, advance=1, status=f"loss {loss_value:.4f} {seconds:.2f}s/step")
            t0 = time.perf_counter()
    return PretrainResult(step=max(start, end), loss=loss_value, out_dir=out)
