"""``tabtune merge`` / ``tabtune export``: a fine-tuned run's weights in the model's official checkpoint format.

``merge run=<peft run>`` folds every LoRA adapter into the weight it adapts
(W0 + (alpha/r)·BA: Hugging Face peft's ``merge_and_unload``, packed attention
parameters included, then the nested layers peft leaves unmerged, see
``lora.fold``) and writes the whole model with the adapter's
``write_checkpoint``: a file the model's own package loads (``TabICLClassifier(
model_path=...)``, TabPFN's ``model_path``, TabDPT's ``model_weight_path``) and
tabtune's ``model.checkpoint=`` reads, with no adapter left to run. On a base-ft
run (and under the name ``export``) the fine-tuned weights are written the same
way, and so are an inference run's weights when it folded another run's adapters
in (``model.adapters``). A plain inference run changed no weight, so there is
nothing to write: that is a one-line error pointing at the checkpoint it ran.

The output is a folder (default ``<run>/merged/``) that is never written over
unless ``overwrite=true``. Before anything is reported, the written file is read
back through ``model.checkpoint`` and its predictions on rows of the run's own
context are compared with the run's model (``verify=false`` skips that).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import rundir
from ..errors import TabTuneError
from ..strategies import get_strategy
from .args import key_values

KNOWN_KEYS = ("run", "output", "overwrite", "verify")
DEFAULT_FOLDER = "merged"
VERIFY_ROWS = (256, 64)  # context rows, query rows of the read-back check
TOLERANCE = 1e-4


USAGE = """usage: tabtune {command} run=<run dir> [output=<folder>] [overwrite=true] [verify=false]

  run        a peft run (its LoRA is merged) or a base-ft run (its weights are exported)
  output     the folder for the official checkpoint (default: <run>/merged/)
  overwrite  replace the files of an output folder that holds some (default: false)
  verify     read the file back and compare predictions with the run's (default: true)"""


def run(argv: list[str], command: str = "merge") -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(command=command))
        return 0
    args = key_values(argv, command, KNOWN_KEYS, required=("run",), flags={"overwrite": False, "verify": True},
                      usage=f"tabtune {command} run=<run dir> [output=<folder>]")
    result = merge_run(args["run"], args.get("output"), overwrite=args["overwrite"], verify=args["verify"],
                       command=command)
    show_summary(result)
    return 0


def export(argv: list[str]) -> int:
    return run(argv, command="export")


def merge_run(run_dir: str | Path, output: str | Path | None = None, *, overwrite: bool = False,
              verify: bool = True, command: str = "merge") -> dict:
    """Write the run's (merged) weights in the official format; returns the facts the summary shows."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "pipeline.json"
    if not meta_path.is_file():
        raise TabTuneError(f"{run_dir}: not a run directory or saved pipeline (pipeline.json is missing)")
    manifest = run_dir / rundir.MANIFEST
    if manifest.is_file() and not rundir.is_complete(run_dir):
        status = json.loads(manifest.read_text()).get("status")
        raise TabTuneError(f"{run_dir}: the run is not complete (status {status!r}); only a finished run is written")
    meta = json.loads(meta_path.read_text())
    strategy = get_strategy(meta["tuning_strategy"])
    if not strategy.changes_weights and not meta["model_params"].get("adapters"):
        raise TabTuneError(f"{run_dir}: a {strategy.name} run changed no weight; there is nothing to {command} "
                           f"(its model is the checkpoint it ran: model.checkpoint or the official file)")
    out_dir = Path(output) if output else run_dir / DEFAULT_FOLDER
    if out_dir.exists() and not out_dir.is_dir():
        raise TabTuneError(f"output={out_dir}: is a file; output names a folder for the checkpoint")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TabTuneError(f"output={out_dir}: already holds files; pass overwrite=true to replace them")

    from ..pipeline import TabularPipeline

    pipeline = TabularPipeline.load(run_dir, device="cpu")
    adapter, task, module = pipeline.adapter_, pipeline.task_, pipeline.module_
    rows = _verify_rows(pipeline) if verify else None
    before = _predict(pipeline, module, rows) if verify else None
    module, facts = strategy.for_export(module)
    module.eval()
    path = adapter.write_checkpoint(module, pipeline.architecture_, task, out_dir)
    difference = None
    if verify:
        config = dataclasses.replace(pipeline.model_config_, pretrained=True, checkpoint=str(path))
        reread, _ = adapter.build(config, task)
        difference = float(np.abs(_predict(pipeline, reread, rows) - before).max())
        if not difference <= TOLERANCE:
            raise TabTuneError(f"{path}: read back, it predicts up to {difference:.2e} away from the run's model "
                               f"(tolerance {TOLERANCE:g}); the file is kept for inspection")
    adapter_file = run_dir / "adapter_model.safetensors"
    files = sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"command": command, "run": run_dir, "model": adapter.title, "strategy": strategy.name,
            "title": strategy.export_title, "checkpoint": path,
            "files": files, "tensors": len(module.state_dict()),
            "parameters": int(sum(p.numel() for p in module.parameters())),
            "lora_layers": facts.get("lora_layers", 0), "saved_modules": facts.get("saved_modules", 0),
            "checkpoint_bytes": path.stat().st_size,
            "adapter_bytes": adapter_file.stat().st_size if strategy.lora and adapter_file.is_file() else None,
            "verified_difference": difference}




def _verify_rows(pipeline) -> tuple[np.ndarray, np.ndarray]:
    """Seeded context and query rows from the run's own context (disjoint), for the read-back check."""
    n = len(pipeline.context_y_)
    order = np.random.default_rng(0).permutation(n)
    n_query = min(VERIFY_ROWS[1], max(1, n // 4))
    return order[n_query:n_query + VERIFY_ROWS[0]], order[:n_query]


def _predict(pipeline, module, rows) -> np.ndarray:
    from ..models.base import predict_classes

    context, query = rows
    X, y = pipeline.context_X_, pipeline.context_y_
    return predict_classes(pipeline.adapter_, module, X[context], y[context], X[query], pipeline.task_,
                           pipeline.model_config_, pipeline.device_)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MB"


def show_summary(result: dict) -> None:
    table = Table(title=f"{result['model']} · {result['strategy']} · {result['title']}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("run", str(result["run"]))
    table.add_row("checkpoint", str(result["checkpoint"]))
    if len(result["files"]) > 1:
        table.add_row("folder", ", ".join(p.name for p in result["files"]))
    if result["lora_layers"]:
        n_saved = result["saved_modules"]
        extra = f" (+ {n_saved} module{'s' if n_saved > 1 else ''} trained in full)" if n_saved else ""
        table.add_row("LoRA merged into", f"{result['lora_layers']} weight tensors{extra}")
    table.add_row("weights", f"{result['tensors']} tensors, {result['parameters']:,} parameters, "
                             f"{_mb(result['checkpoint_bytes'])}")
    if result["adapter_bytes"] is not None:
        ratio = result["adapter_bytes"] / max(result["checkpoint_bytes"], 1)
        table.add_row("adapter file", f"{_mb(result['adapter_bytes'])} = {ratio:.1%} of the merged weights")
    if result["verified_difference"] is not None:
        table.add_row("read back", f"predictions equal the run's model (max |difference| "
                                   f"{result['verified_difference']:.1e})")
    Console().print(table)
