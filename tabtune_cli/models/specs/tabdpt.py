"""TabDPT's spec: tasks, limits, random sizes and the official checkpoint (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import ModelConfig
from ...errors import TabTuneError
from ..base import ModelSpec

REPO_ID = "Layer6/TabDPT"
CHECKPOINT = "tabdpt1_3.safetensors"  # tabdpt.estimator._MODEL_NAME


REDUCTIONS = ("subsample", "subsample-balanced", "retrieval")


@dataclass
class TabDPTConfig(ModelConfig):
    """TabDPT's keys, at ``TabDPTClassifier().predict_proba``'s defaults: one pass over the table as given
    (no ensemble), temperature 1, every training row as context; past ``max_context_rows`` (when set) the
    context is reduced the package's default way, ``subsample``, or by ``retrieval`` of each query's
    nearest rows."""

    name: str = "tabdpt"
    n_estimators: Optional[int] = 1
    max_context_rows: Optional[int] = None
    softmax_temperature: Optional[float] = 1.0
    context_reduction: str = "subsample"

    def __post_init__(self):
        if self.context_reduction not in REDUCTIONS:
            raise TabTuneError(f"model.context_reduction: {self.context_reduction!r} is not one of: "
                               f"{', '.join(REDUCTIONS)}")


class TabDPTSpec(ModelSpec):
    name = "tabdpt"
    title = "TabDPT"
    config_class = TabDPTConfig
    raw_numbers = True  # the estimator imputes and scales the numbers itself
    tasks = ("classification", "regression")
    max_classes = 10  # the random sizes' head; a checkpoint's own max_num_classes replaces it (from_architecture)
    limits = ("the checkpoint's max_num_classes a head (10 in random sizes; more: class hierarchy); features <= "
              "the checkpoint's max_num_features; every training row as context (past max_context_rows: "
              "model.context_reduction)")
    repo_id = REPO_ID
    checkpoints = {"classification": CHECKPOINT, "regression": CHECKPOINT}
    sizes = {
        "tiny": dict(emsize=16, nlayers=2, nhead=2, ff_dim=32, max_num_features=32, regression_bin_count=32),
        "small": dict(emsize=64, nlayers=4, nhead=4, ff_dim=128, max_num_features=64, regression_bin_count=64),
        # the released architecture (tabdpt1_2 / tabdpt1_3: 63M parameters), for benchmarks on random weights
        "official": dict(emsize=512, nlayers=32, nhead=8, ff_dim=512, y_encoder_dim=128, max_num_features=128,
                         max_num_classes=16, regression_bin_count=2048, regression_bin_min=-10.0,
                         regression_bin_max=10.0, min_eval_context=64, max_eval_context=1048576,
                         n_thinking_rows=64),
    }
    # the seed's transformer_encoder, encoder, y_encoder, head under their real names (models/tabdpt.py)
    default_lora_prefixes = ("transformer_encoder", "encoder", "y_encoder", "head")

    def feature_limit(self, config: ModelConfig, strategy: str) -> int | None:
        # training feeds episodes to the model as they are; tabdpt's estimator (inference) reduces wider
        # tables itself; a checkpoint's own width is known once it is read (at build)
        if strategy == "inference" or config.pretrained:
            return None
        return self.random_size(config)["max_num_features"]
