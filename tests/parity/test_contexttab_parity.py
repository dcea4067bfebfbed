"""Parity: our ContextTab equals the competitor's reference on the same random weights and inputs (``make parity``).

The reference outputs come from ``tests/parity/ref_contexttab.py`` run in the parity environment; the
``contexttab.pt`` files it wrote in the official format load here through ``load_contexttab``, one-layer
files shared across the layers as the reference's loader does. The reference's input dict is turned
into our forward's tensors here, which is the mapping a table-to-tensor adapter has to reproduce.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli.models.contexttab import (
    ConTextTab,
    load_contexttab,
    load_contexttab_state,
)

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("contexttab-*/io.safetensors"))
TOLERANCE = 1e-4

pytestmark = pytest.mark.parity


def our_inputs(data: dict, kind: str) -> tuple[tuple, int]:
    """Our forward's positional tensors from the reference's dict, and the number of context rows."""
    target = data[f"ref.target_{kind}"]
    n_context = int((target > -99).sum())
    assert (target[:n_context] > -99).all(), "the reference case must list its context rows first"
    numbers, dates = data["ref.number_normalized"], data["ref.date_year_month_day_weekday"]
    # the target column (last) carries no number and no date in the reference's dict: we add neither
    assert (numbers[:, -1] <= -99).all() and not dates[:, -1].any()
    has_number = numbers[:, :-1] > -99
    return (data["ref.column_embeddings"], data["ref.text_embeddings"][:, :-1],
            torch.where(has_number, numbers[:, :-1], 0.0), has_number, dates[:, :-1],
            target[:n_context]), n_context


@pytest.mark.skipif(not CASES, reason=f"no ContextTab reference outputs under {ROOT} (run `make parity`)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_contexttab_equals_the_reference(io):
    torch.set_num_threads(1)
    data = load_file(io)
    path = io.parent / "contexttab.pt"
    state, n_in_file = load_contexttab_state(path)
    hidden = state["embeddings.layer_norm.weight"].shape[0]
    n_layers = int(data["n_layers"])
    assert n_in_file == (1 if "one-layer" in io.parent.name else n_layers)
    module = load_contexttab(ConTextTab(n_layers, hidden, n_heads=max(1, hidden // 64)), path).eval()
    report = []
    for kind in ("classification", "regression"):
        inputs, n_context = our_inputs(data, kind)
        with torch.no_grad():
            ours = module(*inputs, regression=kind == "regression")
        reference = data[f"out_{kind}"][n_context:]
        reference = reference[:, 0] if kind == "regression" else reference
        assert ours.shape == reference.shape, (kind, ours.shape, reference.shape)
        report.append((kind, (ours - reference).abs().max().item()))
    print(f"{io.parent.name}: {n_layers} layers x {hidden}, " +
          "; ".join(f"{kind} max |ours - reference| = {diff:.2e}" for kind, diff in report))
    assert all(diff <= TOLERANCE for _, diff in report), report
