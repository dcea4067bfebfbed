"""OrionMSP's spec: its config keys, tasks, limits, random sizes and the official checkpoint (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import ModelConfig
from ..base import ModelSpec

REPO_ID = "Lexsi/Orion-MSP"
CHECKPOINTS = {"classification": "Orion-MSP-v1.0.ckpt"}


@dataclass
class OrionMSPConfig(ModelConfig):
    """OrionMSP's keys: the shared ones plus whether query rows are kept apart (models/orion_msp.py)."""

    name: str = "orionmsp"
    n_estimators: int = 32  # the reference wrapper's default
    max_context_rows: Optional[int] = None  # every training row, as the reference wrapper
    # false (the reference's computation, the one the released weights were trained with): the Perceiver
    # memory's read layers let every row attend to every query row, so a query's prediction depends on which
    # other queries share its batch; true keeps query rows apart (models/orion_msp.py says what it costs)
    isolate_queries: bool = False


class OrionMSPSpec(ModelSpec):
    name = "orionmsp"
    title = "OrionMSP"
    config_class = OrionMSPConfig
    raw_numbers = True  # the wrapper's members impute, scale, power-transform and clip the numbers
    tasks = ("classification",)
    max_classes = 10
    native_many_classes = True  # the module's eval path builds the reference's class hierarchy
    limits = "10 classes a head (more: OrionMSP's own hierarchy); every training row as context (cap: max_context_rows)"
    repo_id = REPO_ID
    checkpoints = CHECKPOINTS
    sizes = {
        "tiny": dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=3, row_nhead=2,
                     row_num_cls=2, row_num_global=2, icl_num_blocks=2, icl_nhead=2, perc_num_latents=4,
                     perc_layers=1),
        "small": dict(embed_dim=64, col_num_blocks=1, col_nhead=4, col_num_inds=32, row_num_blocks=3, row_nhead=4,
                      row_num_cls=4, row_num_global=2, icl_num_blocks=4, icl_nhead=4, perc_num_latents=16,
                      perc_layers=1),
    }
    default_lora_prefixes = ("col_embedder.tf_col", "row_interactor", "icl_predictor.tf_icl", "icl_predictor.decoder")
