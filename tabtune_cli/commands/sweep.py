"""What each job of a sweep (``tabtune train -m``) needs to stand alone, and what a sweep says at its end.

Hydra runs a sweep's jobs one after another in one process (its basic launcher) or side by side in worker
processes (joblib, submitit, Ray). So each job seeds every generator from its own ``seed``, takes its share
of the cores, measures its own peak memory (``memory.reset_peak``) and, when it fails, is
recorded as failed in its run directory and returns, so that the other jobs go on; at the end the sweep
reports which jobs failed and exits non-zero if any did. Command-line side: this module knows Hydra.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .. import rundir
from ..errors import TabTuneError
from ..evaluation.metrics import METRICS, objective_metric

# what the last sweep of this process ended with (SweepEnd, read by `tabtune train` for its exit status)
LAST_SWEEP: dict = {}


def cores() -> int:
    """The cores this process may run on (a SLURM allocation's or a container's, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def job_threads(threads: int | None, launcher: DictConfig | None) -> int | None:
    """Torch threads for one job: ``threads`` when set; else, under a launcher that runs jobs side by side,
    this job's share of the cores (joblib: cores / ``n_jobs``; submitit: ``cpus_per_task``; Ray:
    ``ray.remote.num_cpus``); else None (torch's default, every core: jobs run one at a time)."""
    if threads is not None:
        return threads
    if launcher is None:
        return None
    for key in ("cpus_per_task", "ray.remote.num_cpus"):
        value = OmegaConf.select(launcher, key, default=None)
        if value:
            return int(value)
    n_jobs = OmegaConf.select(launcher, "n_jobs", default=None)
    if not n_jobs:
        return None
    parallel = n_jobs if n_jobs > 0 else max(1, cores() + 1 + n_jobs)  # joblib: -1 = one job a core
    return max(1, cores() // parallel)


def start_job(seed: int, threads: int | None) -> int:
    """Make this job independent of those that ran before it in this process: every generator seeded from
    its ``seed``, torch's threads set (when ``threads`` says); returns the threads it runs with."""
    import matplotlib
    import numpy as np
    import pyarrow.parquet  # noqa: F401
    import torch

    # what a run imports after its fit (its plot, its Parquet file) is imported before it: a job's peak
    # memory is then the same whether it runs alone, first in its process or after others
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # and every CUDA device's
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_objective(objective, task: str) -> None:
    objective = getattr(objective, "value", objective)
    if objective != "auto" and objective not in METRICS[task]:
        raise TabTuneError(f"objective={objective} is not a {task} metric (those are: "
                           f"{', '.join(METRICS[task])}; or auto)")


def objective_value(objective, metrics: dict) -> float | None:
    """What a job returns to its sweeper (Optuna's minimises or maximises it): the validation metric
    ``objective`` names, from metrics.json's content; None without validation rows."""
    val = metrics.get("val") or {}
    task = "classification" if "log_loss" in val else "regression"
    value = val.get(objective_metric(objective, task))
    return None if value is None else float(value)


def job_failed(run_dir: Path, error: str, overrides: list[str]) -> None:
    """Say on stderr, in one line, that a sweep job failed and where that is recorded."""
    what = " ".join(overrides) or "no overrides"
    print(f"tabtune: error: job {run_dir.name} ({what}) failed: {error}; recorded in {run_dir / rundir.MANIFEST}",
          file=sys.stderr)


def sweep_runs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """Each run directory of a sweep with its manifest, in job order."""
    found = []
    for manifest in sorted(sweep_dir.glob(f"*/{rundir.MANIFEST}")):
        try:
            found.append((manifest.parent, json.loads(manifest.read_text())))
        except (OSError, ValueError):
            found.append((manifest.parent, {"status": "unreadable"}))
    return sorted(found, key=lambda item: _job_number(item[0]))


def _job_number(path: Path) -> tuple:
    head = path.name.split("_", 1)[0]
    return (0, int(head), path.name) if head.isdigit() else (1, 0, path.name)


class SweepEnd(Callback):
    """At a sweep's end, in the process that launched it: how many jobs completed, which failed and why
    (their run.json files say), Optuna's best trial, and the command that compares them."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = sweep_runs(sweep_dir)
        failed = [(path, manifest) for path, manifest in runs if manifest.get("status") != "complete"]
        LAST_SWEEP.clear()
        LAST_SWEEP.update(dir=sweep_dir, runs=len(runs), failed=len(failed))
        if not runs:
            return  # run elsewhere (a cluster's own disk): nothing here to count
        print(f"tabtune: sweep {sweep_dir}: {len(runs) - len(failed)} of {len(runs)} jobs complete")
        for path, manifest in failed:  # the errors on stderr, as each job's own line was
            print(f"tabtune: {path.name}: {manifest.get('status')}: {manifest.get('error', '')}", file=sys.stderr)
        if (sweep_dir / "optimization_results.yaml").is_file():
            from ..evaluation.report import best_trial

            found = best_trial(sweep_dir)
            if found is not None:
                print(f"tabtune: best trial: {found['run'].name} ({found['params']}): "
                      f"{found['metric']} {found['value']:.4g}")
        print(f"tabtune: compare them: tabtune report {sweep_dir}")
