"""TabPFN's spec: its config keys (the architecture version), tasks, limits, random sizes and checkpoints
(torch-free; a pretrained checkpoint's file name comes from the tabpfn package, imported then only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...config import ModelConfig
from ...errors import TabTuneError
from ..base import ModelSpec, Task, resolve_checkpoint

# model.version -> the package's architecture name
VERSIONS = {"v2": "tabpfn_v2", "v2.5": "tabpfn_v2_5", "v2.6": "tabpfn_v2_6", "v3": "tabpfn_v3", "v3.5": "tabpfn_v3_5"}
ESTIMATOR = {"classification": "classifier", "regression": "regressor"}


@dataclass
class TabPFNConfig(ModelConfig):
    """TabPFN's keys: the shared ones plus the architecture version, at ``TabPFNClassifier()``'s defaults:
    members and temperature from the checkpoint's inference config ("auto": null), every training row."""

    name: str = "tabpfn"
    version: str = "v2"
    n_estimators: Optional[int] = None
    max_context_rows: Optional[int] = None
    softmax_temperature: Optional[float] = None
    # the package's default, fit_mode="fit_preprocessors": no key/value cache; true fits with
    # "fit_with_cache", keeping the context's keys/values so repeated predictions skip the context
    kv_cache: bool = False


class TabPFNSpec(ModelSpec):
    name = "tabpfn"
    title = "TabPFN"
    config_class = TabPFNConfig
    raw_numbers = True  # each member transforms the numbers itself (quantile, power, SVD)
    tasks = ("classification", "regression")
    max_classes = 10
    limits = "10 classes a head (more: class hierarchy); every training row as context (cap: max_context_rows)"
    repo_id = "Prior-Labs/TabPFN-v2-clf"
    # the package's default v2 files (tabpfn.model_loading.ModelSource)
    checkpoints = {"classification": "tabpfn-v2-classifier-finetuned-zk73skhh.ckpt",
                   "regression": "tabpfn-v2-regressor.ckpt"}
    sizes = {
        "tiny": dict(emsize=16, nlayers=2, nhead=2, features_per_group=2, num_buckets=32),
        "small": dict(emsize=64, nlayers=4, nhead=4, features_per_group=2, num_buckets=256),
    }
    # v2, v2.5, v2.6: the seed's defaults under their real names (see models/tabpfn.py's docstring)
    default_lora_prefixes = ("feature_group_embedder", "target_embedder", "blocks", "output_projection")
    # v3, v3.5: the in-context transformer (its attention's q/k/v/out projections and MLPs)
    default_lora_prefixes_v3 = ("icl_blocks",)

    def checkpoint_file(self, config: ModelConfig, task: Task, fetch: bool = True) -> Path | None:
        if not config.pretrained:
            return None
        version = getattr(config, "version", "v2")
        if version not in VERSIONS:
            raise TabTuneError(f"model.version: unknown TabPFN version {version!r} (known: {', '.join(VERSIONS)})")
        from tabpfn.constants import ModelVersion
        from tabpfn.model_loading import ModelType, _get_model_source

        source = _get_model_source(ModelVersion(version), ModelType(ESTIMATOR[task.kind]))
        try:
            return resolve_checkpoint(config, repo_id=source.repo_id, filename=source.default_filename,
                                      model_title=f"TabPFN {version}", fetch=fetch)
        except TabTuneError as exc:
            if version == "v2" or config.checkpoint:
                raise
            raise TabTuneError(f"{exc}. TabPFN {version} weights are gated: accept the license at "
                               f"https://huggingface.co/{source.repo_id} while logged in, download "
                               f"{source.default_filename!r} (e.g. `hf download {source.repo_id} "
                               f"{source.default_filename}`), then pass model.checkpoint=/path/to/"
                               f"{source.default_filename}") from None
