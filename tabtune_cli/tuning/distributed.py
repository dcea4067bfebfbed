"""Data-parallel fine-tuning through ``torch.distributed``, launched by ``torchrun``.

Every rank draws the same seeded episode stream and takes its share of each batch
(``shard``: a contiguous slice); gradients are averaged across ranks before every
optimizer step. Each rank runs on its own device (``cuda:LOCAL_RANK``, or the CPU), and
the collectives run on tensors of the process group's device (CUDA for NCCL, the CPU for
gloo). Randomness inside the forward (dropout, LoRA dropout) is seeded per micro-batch
from the run's seed and the micro-batch's place in the episode stream (``micro_batch_seed``),
so ranks draw different masks for their different episodes, and N ranks with batch B
train exactly as one process with batch B/N and N gradient-accumulation steps, dropout
included. Validation runs on every rank (the same answer everywhere, so all keep the
same best epoch); only rank 0 records, checkpoints and writes the run directory.

    torchrun --nproc_per_node 2 $(which tabtune) train strategy=peft strategy.batch_size=8

This module imports torch only in the functions that compute, so config checks stay light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import TabTuneError

if TYPE_CHECKING:
    import torch


def world_size() -> int:
    """How many processes ``torchrun`` started (1 when it did not)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one of several ``torchrun`` started."""
    return world_size() > 1


def rank() -> int:
    """This process's rank (0 when not launched by ``torchrun``): only rank 0 writes."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def check_shardable(strategy, trains: bool) -> None:
    """Settings that cannot be shared among the ``torchrun`` processes, refused before anything runs
    (``trains``: whether the strategy trains at all)."""
    size = world_size()
    if size == 1 or not trains:
        return
    if strategy.batch_size % size:
        raise TabTuneError(f"strategy.batch_size={strategy.batch_size} must be a multiple of the {size} processes "
                           f"(torchrun --nproc_per_node) that share each batch")
    if strategy.steps_per_epoch is None:
        raise TabTuneError(f"strategy.steps_per_epoch=null: a pass's last batch is short and may not share among "
                           f"the {size} torchrun processes; set strategy.steps_per_epoch to a number")


def device(name: str) -> torch.device:
    """The device ``name`` (auto, cpu, cuda) means for this process: under ``torchrun`` with CUDA, its own
    GPU (``cuda:LOCAL_RANK``), made the current one so that NCCL and every default allocation use it."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise TabTuneError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if not launched():
        return torch.device("cuda")
    if local_rank() >= torch.cuda.device_count():
        raise TabTuneError(f"LOCAL_RANK={local_rank()}: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s); start at most that many processes a node")
    gpu = torch.device("cuda", local_rank())
    torch.cuda.set_device(gpu)
    return gpu


def join(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); return ``(rank, size)``."""
    if not launched():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU for NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(batch: list, rank: int, size: int) -> list:
    """This rank's episodes of a batch: the ``rank``-th of ``size`` contiguous slices."""
    if len(batch) % size:
        raise TabTuneError(f"strategy.batch_size={len(batch)} must be a multiple of the {size} processes "
                           f"(torchrun --nproc_per_node) that share each batch")
    share = len(batch) // size
    return batch[rank * share:(rank + 1) * share]


def micro_batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the randomness inside the forward of micro-batch ``index`` of ``epoch``.

    A micro-batch is the episodes one forward takes: in one process, those of one gradient-accumulation
    step; under ``torchrun``, one rank's share of it. ``index`` counts them in the epoch's stream order
    (batch x ranks + rank), so it names the same episodes whichever process feeds them."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a divergence on one rank stops them all together)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_gradients(params: list, size: int) -> None:
    """Average every parameter's gradient across ranks; one no rank computed stays None, as in one process."""
    import torch
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=collective_device())
    dist.all_reduce(has)
    for p, count in zip(params, has.tolist()):
        if not count:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(size)
