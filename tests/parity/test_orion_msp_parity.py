"""Parity: our OrionMSP equals the competitor's reference on the same random weights and inputs.

The reference outputs come from ``tests/parity/ref_orion_msp.py`` run in the parity environment; the
``Orion-MSP-v1.0.ckpt`` files it wrote in the official layout load here through ``model.checkpoint=``.
The adapter builds modules with ``isolate_queries`` off, the reference's computation (queries see each
other in the Perceiver read), and the comparison prints how far the isolated outputs (the option) are
from the reference's, for information.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli.config import ModelConfig
from tabtune_cli.models.base import Task
from tabtune_cli.models.orion_msp import OrionMSPAdapter

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("orionmsp-*/io.safetensors"))
TOLERANCE = 1e-5
FORWARD_SEED = 5  # as ref_orion_msp.py: random row links come from torch's global generator

pytestmark = pytest.mark.parity


def outputs(module, data, mode):
    module.train(mode == "train")
    with torch.no_grad():
        torch.manual_seed(FORWARD_SEED)
        return module(data["X"], data["y_train"], return_logits=mode != "eval_proba")


@pytest.mark.skipif(not CASES, reason=f"no OrionMSP reference outputs under {ROOT} (run tests/parity/ref_orion_msp.py)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_orion_msp_equals_the_reference(io):
    torch.set_num_threads(1)
    data = load_file(io)
    n_classes = len(data["y_train"][0].unique())
    module, _ = OrionMSPAdapter().build(ModelConfig(name="orionmsp", checkpoint=str(io.parent / "Orion-MSP-v1.0.ckpt")),
                                        Task("classification", n_classes))
    assert not module.isolate_queries  # the default is the reference's computation
    report = []
    for mode in ("eval", "eval_proba", "train"):
        if mode not in data:
            continue
        module.isolate_queries = False
        ours = outputs(module, data, mode)
        assert ours.shape == data[mode].shape, (mode, ours.shape, data[mode].shape)
        diff = (ours - data[mode]).abs().max().item()
        module.isolate_queries = True
        isolated = (outputs(module, data, mode) - data[mode]).abs().max().item()
        report.append((mode, diff, isolated))
    print(f"{io.parent.name}: " + "; ".join(f"{m} max |ours - reference| = {d:.2e} (isolated queries: {i:.2e})"
                                            for m, d, i in report))
    assert all(d <= TOLERANCE for _, d, _ in report), report
