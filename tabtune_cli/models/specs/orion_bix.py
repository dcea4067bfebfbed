"""OrionBix's spec: tasks, limits, random sizes and the official checkpoint (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import ModelConfig
from ..base import ModelSpec

REPO_ID = "Lexsi/Orion-BiX"
CHECKPOINTS = {"classification": "Orion-BiX-v1.1.ckpt"}


@dataclass
class OrionBixConfig(ModelConfig):
    name: str = "orionbix"
    n_estimators: int = 32  # the reference wrapper's default
    max_context_rows: Optional[int] = None  # every training row, as the reference wrapper


class OrionBixSpec(ModelSpec):
    name = "orionbix"
    title = "OrionBix"
    config_class = OrionBixConfig
    raw_numbers = True  # the wrapper's members impute, scale, power-transform and clip the numbers
    tasks = ("classification",)
    max_classes = 10
    native_many_classes = True  # the eval forward builds the reference's class hierarchy itself
    limits = "10 classes a head (more: OrionBix's own hierarchy); every training row as context (cap: max_context_rows)"
    repo_id = REPO_ID
    checkpoints = CHECKPOINTS
    sizes = {
        "tiny": dict(embed_dim=16, col_num_blocks=1, col_nhead=2, row_num_blocks=2, row_nhead=2, row_num_cls=4,
                     icl_num_blocks=2, icl_nhead=2),
        "small": dict(embed_dim=32, col_num_blocks=2, col_nhead=4, row_num_blocks=2, row_nhead=4, row_num_cls=4,
                      icl_num_blocks=4, icl_nhead=4),
    }
    default_lora_prefixes = ("col_embedder.tf_col", "bi_axial_attention", "icl_predictor.tf_icl",
                             "icl_predictor.decoder")
