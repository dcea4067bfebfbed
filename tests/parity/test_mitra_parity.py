"""Parity: our Mitra equals AutoGluon's Tab2D on the same random weights and inputs (``make parity``).

The reference outputs come from ``tests/parity/ref_mitra.py`` run in AutoGluon's own environment;
the checkpoints it wrote with AutoGluon's ``save_pretrained`` load here through ``model.checkpoint=``.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli.config import ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.mitra import MitraAdapter

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(p for p in ROOT.glob("mitra-*/io.safetensors") if not p.parent.name.startswith("mitra-defaults-"))
TOLERANCE = 1e-5

pytestmark = pytest.mark.parity


@pytest.mark.skipif(not CASES, reason=f"no Mitra reference outputs under {ROOT} (run `make parity`)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_mitra_equals_autogluon_tab2d(io):
    torch.set_num_threads(1)
    data = load_file(io)
    kind = "classification" if io.parent.name.startswith("mitra-cls") else "regression"
    module, _ = MitraAdapter().build(ModelConfig(name="mitra", checkpoint=str(io.parent)), Task(kind, 3))
    with torch.no_grad():
        ours = module.eval()(data["x_support"], data["y_support"], data["x_query"])
    diff = (ours - data["output"]).abs().max().item()
    print(f"{io.parent.name}: max |ours - reference| = {diff:.2e} over {tuple(ours.shape)}")
    assert ours.shape == data["output"].shape and diff <= TOLERANCE
