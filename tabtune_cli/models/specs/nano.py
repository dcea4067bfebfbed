"""nano's spec: its config keys, its random sizes and the weights shipped in the package (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import List

from ...config import ModelConfig
from ...errors import TabTuneError
from ..base import ModelSpec, Task


class View(str, Enum):
    """How an ensemble member sees the features: as given (the model standardises them), their quantiles,
    or the principal components of all columns."""

    standard = "standard"
    quantile = "quantile"
    pca = "pca"


@dataclass
class NanoConfig(ModelConfig):
    """nano's keys: the shared ones plus how a user's table is shown to the model."""

    name: str = "nano"
    n_estimators: int = 64
    max_input_features: int = 30
    one_hot_max_levels: int = 16
    preprocessing: List[View] = field(default_factory=lambda: list(View))
    # rescale the ensemble's log-probabilities and shift each class's, fitted to context rows that the
    # other half of the context predicts (the ensemble alone is underconfident)
    calibrate: bool = True

    def __post_init__(self):
        if self.one_hot_max_levels < 0:
            raise TabTuneError(f"model.one_hot_max_levels: must be 0 or more, got {self.one_hot_max_levels}")
        if self.max_input_features < 1:
            raise TabTuneError(f"model.max_input_features: must be at least 1, got {self.max_input_features}")
        if not self.preprocessing:
            raise TabTuneError(f"model.preprocessing: name at least one view ({', '.join(v.value for v in View)})")


def shipped_checkpoint() -> Path:
    """The pretrained weights inside the package."""
    return Path(str(resources.files("tabtune_cli") / "weights" / "nano.safetensors"))


class NanoSpec(ModelSpec):
    name = "nano"
    title = "nano"
    config_class = NanoConfig
    tasks = ("classification",)
    max_classes = 10
    context_gradients = True  # its episodes are torch from the matrix on (strategy=context)
    limits = "10 classes a head (more: class hierarchy); wider than max_input_features: the most separating columns"
    sizes = {"tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64),
             "small": dict(d_model=128, n_layers=6, n_heads=4, d_ff=256)}
    default_lora_prefixes = ("blocks", "decoder")

    def checkpoint_file(self, config: ModelConfig, task: Task, fetch: bool = True) -> Path | None:
        if not config.pretrained:
            return None
        path = Path(config.checkpoint).expanduser() if config.checkpoint else shipped_checkpoint()
        if not path.is_file():
            where = "model.checkpoint" if config.checkpoint else "the package's nano weights"
            raise TabTuneError(f"{where}: no such file {str(path)!r}")
        return path
