"""Mitra's prediction memory as query rows grow: peak RSS at 1k, 10k and 100k query rows (``make bench-mitra``).

Each size runs in a fresh process (peak RSS only ever grows), on random weights of a small
architecture (dim 64, 4 layers) or, with ``--size official``, the official one (dim 512, 12 layers,
4 heads: about 36 ms a query row on one CPU thread, so an hour for 100k rows), with the same
context (512 rows x 8 features). Queries go through in chunks of 1,024 rows, so the growth past
the first chunk should be only the predictions themselves (8 bytes per query per class).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {"official": dict(dim=512, n_layers=12, n_heads=4), "small": dict(dim=64, n_layers=4, n_heads=4)}


def measure(n_query: int, size: str) -> dict:
    import numpy as np
    import torch

    from tabtune_cli.config import ModelConfig
    from tabtune_cli.models.base import Task
    from tabtune_cli.models.mitra import MitraAdapter, Tab2D

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Tab2D(**SIZES[size], dim_output=10, task="CLASSIFICATION").eval()
    rng = np.random.default_rng(0)
    Xc = rng.normal(size=(512, 8)).astype(np.float32)
    yc = rng.integers(0, 3, 512)
    Xq = rng.normal(size=(n_query, 8)).astype(np.float32)
    from tabtune_cli.memory import peak_mb, reset_peak

    reset_peak(torch.device("cpu"))
    before = peak_mb(torch.device("cpu"))
    started = time.perf_counter()
    MitraAdapter().predict(module, Xc, yc, Xq, Task("classification", 3), ModelConfig(name="mitra", n_estimators=1),
                           torch.device("cpu"))
    seconds = time.perf_counter() - started
    peak = peak_mb(torch.device("cpu"))
    return {"query_rows": n_query, "peak_mb": peak, "growth_mb": peak - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Mitra prediction memory ({args.size} architecture, 512 context rows x 8 features, CPU)")
    for col in ("query rows", "peak RSS (MB)", "growth during predict (MB)", "seconds", "ms / query row"):
        table.add_column(col, justify="right")
    for n in args.rows:
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--one", str(n)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        table.add_row(f"{n:,}", f"{r['peak_mb']:.0f}", f"{r['growth_mb']:.0f}", f"{r['seconds']:.1f}",
                      f"{1000 * r['seconds'] / n:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
