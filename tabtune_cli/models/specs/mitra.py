"""Mitra's spec: its config defaults, tasks, limits, random sizes and checkpoint folders (torch-free)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...config import ModelConfig
from ...errors import TabTuneError
from ..base import ModelSpec, Task, resolve_checkpoint

REPOS = {"classification": "autogluon/mitra-classifier", "regression": "autogluon/mitra-regressor"}


@dataclass
class MitraConfig(ModelConfig):
    """Mitra's defaults: AutoGluon's one member, plain softmax and 8,192-row context cap."""

    name: str = "mitra"
    n_estimators: int = 1
    max_context_rows: int = 8192
    softmax_temperature: float = 1.0


def read_folder(path: Path) -> tuple[dict, Path]:
    """``(config, weights file)`` of a Mitra checkpoint folder, or of its ``model.safetensors``."""
    folder = path if path.is_dir() else path.parent
    weights = folder / "model.safetensors" if path.is_dir() else path
    config_file = folder / "config.json"
    for needed in (config_file, weights):
        if not needed.is_file():
            raise TabTuneError(f"model.checkpoint: {str(needed)!r} is missing (a Mitra checkpoint is a folder "
                               f"with config.json and model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        config = {k: config[k] for k in ("dim", "dim_output", "n_layers", "n_heads", "task")}
    except (ValueError, KeyError, TypeError) as exc:
        raise TabTuneError(f"{config_file}: not a Mitra config.json ({type(exc).__name__}: {exc})") from None
    return config, weights


class MitraSpec(ModelSpec):
    name = "mitra"
    title = "Mitra"
    config_class = MitraConfig
    tasks = ("classification", "regression")
    max_classes = 10
    limits = "10 classes a head (more: class hierarchy); context <= max_context_rows (8,192); 500 features"
    repo_id = REPOS["classification"]
    sizes = {"tiny": dict(dim=16, n_layers=2, n_heads=2), "small": dict(dim=64, n_layers=4, n_heads=4)}
    default_lora_prefixes = ("x_embedding", "layers", "final_layer")

    max_features = 500  # AutoGluon's limit for Mitra
    # numbers reach the model as given (a gap as NaN): it reads each value only as its rank among the context's
    # quantiles, which tabtune's standardising would keep but its 4-sigma clipping would not (clipped outliers tie)
    raw_numbers = True

    def feature_limit(self, config: ModelConfig, strategy: str) -> int:
        return self.max_features

    def checkpoint_file(self, config: ModelConfig, task: Task, fetch: bool = True) -> Path | None:
        """The checkpoint folder's ``model.safetensors``: ``model.checkpoint``, or the Hub's cached folder."""
        if not config.pretrained:
            return None
        if config.checkpoint:
            return read_folder(Path(config.checkpoint).expanduser())[1]
        # config.json first: it is small, and a missing one says the same as a missing weights file
        resolve_checkpoint(config, repo_id=REPOS[task.kind], filename="config.json", model_title=self.title,
                           fetch=fetch)
        return resolve_checkpoint(config, repo_id=REPOS[task.kind], filename="model.safetensors",
                                  model_title=self.title, fetch=fetch)
