"""The one resumable checkpoint of every training loop: fine-tuning (``trainer``) and pretraining.

A checkpoint is a folder ``<root>/<name>/`` (names sort in training order, e.g. ``epoch-0003``):

- one safetensors file per group of tensors the loop names (``trainable``, ``best``, ``model``),
- ``optimizer.safetensors``: the optimizer's per-parameter state (moments, step counts),
- ``rng.safetensors``: torch's RNG states (CPU and every CUDA device),
- ``state.json``: the optimizer's parameter groups, the scheduler's and gradient scaler's state,
  Python's and NumPy's global RNG states, and the loop's own counters.

It is written whole under a hidden name and renamed into place, then older checkpoints are
removed: a kill at any moment leaves the previous checkpoint or the new one, never half of one.
Nothing here is pickle; loading runs no code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import rundir
from ..errors import TabTuneError

STATE, OPTIMIZER, RNG = "state.json", "optimizer.safetensors", "rng.safetensors"


def latest(root: Path) -> Path | None:
    """The newest whole checkpoint under ``root`` (None when there is none)."""
    if not Path(root).is_dir():
        return None
    whole = sorted(p for p in Path(root).iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / STATE).is_file())
    return whole[-1] if whole else None


def save(root: Path, name: str, *, tensors: dict[str, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
         state: dict, scheduler=None, scaler=None) -> Path:
    """Write checkpoint ``root/name`` whole, then remove the older ones; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    try:
        for group, values in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, staging / f"{group}.safetensors")
        full = optimizer.state_dict()
        moments = {f"{index}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
                   for index, per_param in full["state"].items() for key, value in per_param.items()}
        save_file(moments, staging / OPTIMIZER)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, staging / RNG)
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        record = {
            **state,
            "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in full["param_groups"]],
            "scheduler": None if scheduler is None else {k: v for k, v in scheduler.state_dict().items()
                                                         if k != "lr_lambdas"},
            "scaler": None if scaler is None else scaler.state_dict(),
            "python_rng": [version, list(internal), gauss],
            "numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached],
        }
        (staging / STATE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        for path in [staging, *staging.iterdir()]:  # mkdtemp's 0700: as readable as the run's other files
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~rundir.UMASK)
        target = root / name
        if target.exists():  # the same point saved again (a resumed loop re-saving): replace it
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old.name != target.name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)  # older checkpoints and stale partial ones
    return target


def load(folder: Path, *, optimizer: torch.optim.Optimizer, scheduler=None,
         scaler=None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Restore the optimizer, scheduler, scaler and every RNG from ``folder``; return the tensor groups
    (``{group: {name: tensor}}``) and the loop's state."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        tensors = {p.name[:-len(".safetensors")]: load_file(p) for p in folder.glob("*.safetensors")
                   if p.name not in (OPTIMIZER, RNG)}
        moments, rng = load_file(folder / OPTIMIZER), load_file(folder / RNG)
    except (OSError, ValueError) as exc:
        raise TabTuneError(f"{folder}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    full = optimizer.state_dict()
    per_param: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    if len(state["optimizer_groups"]) != len(full["param_groups"]) or not set(per_param) <= {
            i for g in full["param_groups"] for i in g["params"]}:
        raise TabTuneError(f"{folder}: its optimizer state does not fit this model's trainable parameters")
    full["state"] = per_param
    for group, saved in zip(full["param_groups"], state["optimizer_groups"]):
        # JSON gave lists back: a tuple setting (Adam's betas) must be a tuple again, or Adam takes another path
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict(full)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return tensors, state
