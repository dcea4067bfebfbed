"""Data-parallel fine-tuning through ``torch.distributed``, launched by ``torchrun``.

Every rank draws the same seeded episode stream and takes its share of each batch
(``shard``); gradients are averaged across ranks before every optimizer step, so N
ranks with ``strategy.batch_size`` B train as one process with batch size B does.
Validation runs on every rank (the same answer everywhere, so all keep the same best
epoch); only rank 0 records, checkpoints and writes the run directory.

    torchrun --nproc_per_node 2 $(which tabtune) train strategy=peft strategy.batch_size=8
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import TabTuneError


def launched() -> bool:
    """Whether this process is one of several ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 when not launched by ``torchrun``): only rank 0 writes."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def join(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); return ``(rank, size)``."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(batch: list, rank: int, size: int) -> list:
    """This rank's episodes of a batch."""
    if len(batch) % size:
        raise TabTuneError(f"strategy.batch_size={len(batch)} must be a multiple of the {size} processes "
                           f"(torchrun --nproc_per_node) that share each batch")
    return batch[rank::size]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a divergence on one rank stops them all together)."""
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_gradients(params: list[torch.nn.Parameter], size: int) -> None:
    """Average every parameter's gradient across ranks; one no rank computed stays None, as in one process."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has)
    for p, count in zip(params, has.tolist()):
        if not count:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(size)
