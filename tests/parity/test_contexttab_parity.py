"""Parity: our ContextTab equals the competitor's reference on the same random weights and inputs (``make parity``).

The reference outputs come from ``tests/parity/ref_contexttab.py`` run in the parity environment; the
``contexttab.pt`` files it wrote in the official format (that of both releases, ``SAP/contexttab`` and
``SAP/sap-rpt-1-oss``) load here through the adapter's ``model.checkpoint=`` path: the size read from the
file, one-layer files shared across the layers as the reference's loader does. Each module is then
written back with ``write_checkpoint``, which must give the reference's own tensors under its own keys and
read back to the same outputs. The reference's input dict is turned into our forward's tensors here, which
is the mapping a table-to-tensor adapter has to reproduce.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli.models.base import Task
from tabtune_cli.models.contexttab import ContextTabAdapter, ContextTabConfig, load_contexttab_state

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(p for p in ROOT.glob("contexttab-*/io.safetensors") if not p.parent.name.startswith("contexttab-defaults-"))
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


def query_outputs(module, data: dict) -> dict:
    """``kind -> (ours, the reference's)``: the case's query-row outputs."""
    result = {}
    for kind in ("classification", "regression"):
        inputs, n_context = our_inputs(data, kind)
        with torch.no_grad():
            ours = module(*inputs, regression=kind == "regression")
        reference = data[f"out_{kind}"][n_context:]
        result[kind] = ours, reference[:, 0] if kind == "regression" else reference
    return result


@pytest.mark.skipif(not CASES, reason=f"no ContextTab reference outputs under {ROOT} (run `make parity`)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_contexttab_equals_the_reference(io, tmp_path):
    torch.set_num_threads(1)
    data = load_file(io)
    path = io.parent / "contexttab.pt"
    n_layers = int(data["n_layers"])
    written_by_reference, n_in_file = load_contexttab_state(path)
    assert n_in_file == (1 if "one-layer" in io.parent.name else n_layers)
    adapter, task = ContextTabAdapter(), Task("classification", 64)
    module, architecture = adapter.build(ContextTabConfig(checkpoint=str(path)), task)
    module.eval()
    # the size the reference's model had, read from the file alone (a one-layer file: its last index)
    assert (architecture["n_layers"], module.n_heads) == (n_layers, architecture["hidden_size"] // 64)
    outputs = query_outputs(module, data)
    report = []
    for kind, (ours, reference) in outputs.items():
        assert ours.shape == reference.shape, (kind, ours.shape, reference.shape)
        report.append((kind, (ours - reference).abs().max().item()))
    print(f"{io.parent.name}: {n_layers} layers x {architecture['hidden_size']}, " +
          "; ".join(f"{kind} max |ours - reference| = {diff:.2e}" for kind, diff in report))
    assert all(diff <= TOLERANCE for _, diff in report), report

    # written back: the reference's tensors under its keys (every layer: a one-layer file's layer in each)
    exported = adapter.write_checkpoint(module, architecture, task, tmp_path)
    written = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(written) == set(module.state_dict())  # the strict load made these the reference's keys
    last = f"in_context_encoder.{n_layers - 1}."
    for key, tensor in written.items():
        source = last + key.split(".", 2)[2] if n_in_file == 1 and key.startswith("in_context_encoder.") else key
        assert torch.equal(tensor, written_by_reference[source]), key
    reread, _ = adapter.build(ContextTabConfig(checkpoint=str(exported)), task)
    again = query_outputs(reread.eval(), data)
    assert all(torch.equal(again[kind][0], outputs[kind][0]) for kind in outputs)
    exported.unlink()  # 0.7 GB at the base size
