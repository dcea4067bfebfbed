"""Parity: our OrionBix equals the competitor's (tabtune 0.2.1) on the same random weights and inputs.

The reference outputs come from ``tests/parity/ref_orion_bix.py`` run in the reference environment; the
checkpoints it wrote in the official ``.ckpt`` layout load here through our adapter's ``build``
(``model.checkpoint=``), so the loader is under test too.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tabtune_cli.config import ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.orion_bix import OrionBixAdapter

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("orionbix-*/io.safetensors"))
TOLERANCE = 1e-5

pytestmark = pytest.mark.parity


@pytest.mark.skipif(not CASES, reason=f"no OrionBix reference outputs under {ROOT} "
                                      f"(run tests/parity/ref_orion_bix.py with .venv-parity, or `make parity`)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_orion_bix_equals_the_reference(io):
    torch.set_num_threads(1)
    data = load_file(io)
    with safe_open(io, "pt") as f:
        n_classes = int(f.metadata()["n_classes"])
    adapter, task = OrionBixAdapter(), Task("classification", n_classes)
    checkpoint = io.parent / "Orion-BiX-v1.1.ckpt"
    module, _ = adapter.build(ModelConfig(name="orionbix", checkpoint=str(checkpoint)), task)
    X, y = data["X"], data["y_train"]
    diffs = {}
    with torch.no_grad():
        ours = module.eval()(X.clone(), y.clone())
        assert ours.shape == data["eval"].shape
        diffs["eval"] = (ours - data["eval"]).abs().max().item()
        if "train" in data:
            ours = module.train()(X.clone(), y.clone())
            assert ours.shape == data["train"].shape
            diffs["train"] = (ours - data["train"]).abs().max().item()
    if "proba" in data:
        config = ModelConfig(name="orionbix", checkpoint=str(checkpoint), n_estimators=1, softmax_temperature=0.9)
        proba = adapter.predict(module, data["wrapper_X_context"].numpy(), data["wrapper_y_context"].numpy(),
                                data["wrapper_X_query"].numpy(), task, config, torch.device("cpu"))
        assert proba.shape == tuple(data["proba"].shape)
        diffs["predict_proba"] = float(np.abs(proba - data["proba"].numpy()).max())
    print(f"{io.parent.name}: " + ", ".join(f"max |ours - reference| {k} = {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs
