"""TabICL's spec: tasks, limits, random sizes and the official checkpoints (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import ModelConfig
from ..base import ModelSpec

REPO_ID = "jingang/TabICL"
CHECKPOINTS = {"classification": "tabicl-classifier-v2-20260212.ckpt",
               "regression": "tabicl-regressor-v2-20260212.ckpt"}


@dataclass
class TabICLConfig(ModelConfig):
    """TabICL's keys, at ``TabICLClassifier()``'s defaults: 8 members, every training row as context."""

    name: str = "tabicl"
    n_estimators: Optional[int] = 8
    max_context_rows: Optional[int] = None
    softmax_temperature: Optional[float] = 0.9
    # the package's default: no key/value cache; true keeps the context's keys/values of every member
    # (about 50 KB a context row a member at the default size) so repeated predictions skip the context
    kv_cache: bool = False


class TabICLSpec(ModelSpec):
    name = "tabicl"
    title = "TabICL"
    config_class = TabICLConfig
    raw_numbers = True  # the estimator imputes, scales and power-transforms each member
    tasks = ("classification", "regression")
    max_classes = 10
    native_many_classes = True  # TabICL's eval path builds its own class hierarchy
    limits = "10 classes a head (more: TabICL's own hierarchy); every training row as context (cap: max_context_rows)"
    repo_id = REPO_ID
    checkpoints = CHECKPOINTS
    sizes = {
        "tiny": dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=1, row_nhead=2,
                     row_num_cls=2, icl_num_blocks=2, icl_nhead=2, num_quantiles=99),
        "small": dict(embed_dim=64, col_num_blocks=1, col_nhead=4, col_num_inds=32, row_num_blocks=2,
                      row_nhead=4, row_num_cls=4, icl_num_blocks=4, icl_nhead=4, num_quantiles=99),
        # TabICL's own constructor defaults (27.6M parameters), for benchmarks on random weights
        "default": {},
    }
    # the seed's defaults: column embedder, row interactor, ICL transformer, decoder head
    default_lora_prefixes = ("col_embedder.tf_col", "row_interactor", "icl_predictor.tf_icl", "icl_predictor.decoder")
