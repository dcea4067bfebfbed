"""Reference outputs of the competitor's ContextTab (tabtune 0.2.1) on random weights, for test_contexttab_parity.py.

Run with the parity environment's Python (never imported by tabtune or its tests):
    .venv-parity/bin/python tests/parity/ref_contexttab.py runs/parity
Each case is a folder ``contexttab-<name>/`` holding ``contexttab.pt`` in the official format (a raw
``torch.save(state_dict)``) and ``io.safetensors``: the reference's own input dict, already embedded
(random vectors stand in for the sentence encoder, so no embedding server runs), as ``ref.<key>``,
plus its outputs over all rows, ``out_classification`` (rows, 64) and ``out_regression`` (rows, 1),
and ``n_layers``, the depth of the model that gave them.
"Full" files hold every encoder layer and the outputs come from the model that wrote them;
"one-layer" files hold only the highest-numbered layer, as the official checkpoints, and the
outputs come from a fresh reference model that read the file through its own ``load_weights``.
"base-one-layer" is the layout of both official files: ``SAP/contexttab``'s ``l2/base.pt`` and
``SAP/sap-rpt-1-oss``'s ``2025-11-04_sap-rpt-one-oss.pt``, which SAP's ``sap_rpt_oss`` estimator reads
into ``RPT(ModelSize.base, regression_type="l2", classification_type="cross-entropy")``, this same
module under a new name, through this same ``load_weights``.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from tabtune.models.contexttab.torch_model import ConTextTab

TEXT_DIM = 384

# name: ((n_layers, hidden), context rows, query rows, feature kinds, classes, file layout, key prefix)
CASES = {
    "tiny-full": ((2, 128), 24, 8, "tndtn", 3, "full", ""),
    "tiny-one-layer": ((3, 128), 20, 6, "ntdt", 4, "one-layer", ""),
    "one-feature-one-query": ((2, 64), 10, 1, "n", 2, "full", "module."),
    "mini-63-class-ids": ((4, 256), 80, 10, "tnnddtnntnnt", 63, "full", ""),
    "base-one-layer": ((12, 768), 16, 4, "tndn", 3, "one-layer", ""),
}


def perturb(model: torch.nn.Module) -> None:
    """Noise on LayerNorm weights and biases (ones and zeros would hide a swapped or skipped norm), larger heads.

    The default initialisation leaves the outputs within about 0.5 and the regression output nearly
    constant over rows; heads ten times larger make a small deviation inside the network visible."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "layer_norm" in name or "LayerNorm" in name:
                tensor.add_(torch.randn_like(tensor) * 0.1)
            elif name.startswith("output_head"):
                tensor.mul_(10.0)


def reference_inputs(n_context: int, n_query: int, kinds: str, n_classes: int, g: torch.Generator) -> dict:
    """The reference tokenizer's dict for a table of ``kinds`` columns (t text, n number, d date) + the target."""
    rows, cols = n_context + n_query, len(kinds) + 1
    data = {
        "column_embeddings": torch.randn(cols, TEXT_DIM, generator=g).half(),
        "text_embeddings": torch.zeros(rows, cols, TEXT_DIM, dtype=torch.float16),
        "date_year_month_day_weekday": torch.zeros(rows, cols, 4, dtype=torch.int64),
        "number_normalized": torch.full((rows, cols), -100.0),
    }
    for c, kind in enumerate(kinds):
        if kind == "t":
            data["text_embeddings"][:, c] = torch.randn(rows, TEXT_DIM, generator=g).half()
        elif kind == "n":
            data["number_normalized"][:, c] = torch.randn(rows, generator=g)
        else:
            for part, high in enumerate((52, 13, 32, 8)):
                data["date_year_month_day_weekday"][:, c, part] = torch.randint(1, high, (rows,), generator=g)
            missing = torch.rand(rows, generator=g) < 0.2  # a missing date is all zeros
            data["date_year_month_day_weekday"][missing, c] = 0
    # the tokenizer puts the class names' embeddings in the target column; the model must ignore them
    data["text_embeddings"][:n_context, -1] = torch.randn(n_context, TEXT_DIM, generator=g).half()
    labels = torch.randperm(n_context, generator=g) % n_classes  # every class present, in random order
    data["target_classification"] = torch.cat([labels.float(), torch.full((n_query,), -100.0)])
    data["target_regression"] = torch.cat([torch.randn(n_context, generator=g), torch.full((n_query,), -100.0)])
    return data


def forward(model: ConTextTab, data: dict, regression: bool) -> torch.Tensor:
    kind = "regression" if regression else "classification"
    batch = {k: v.clone() for k, v in data.items() if not k.startswith("target_")}  # it writes into its inputs
    batch["target"] = data[f"target_{kind}"].clone()
    batch["target_delta"] = torch.zeros_like(batch["target"])
    with torch.no_grad():
        return model(batch, is_regression=regression)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for name, ((n_layers, hidden), n_context, n_query, kinds, n_classes, layout, prefix) in CASES.items():
        size = SimpleNamespace(value=(n_layers, hidden))  # the reference reads only .value of its ModelSize
        torch.manual_seed(0)
        model = ConTextTab(size, regression_type="l2", classification_type="cross-entropy")
        perturb(model)
        folder = out / f"contexttab-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        if layout == "one-layer":
            last = f"in_context_encoder.{n_layers - 1}."
            state = {k: v for k, v in state.items() if not k.startswith("in_context_encoder.") or k.startswith(last)}
        torch.save({prefix + k: v for k, v in state.items()}, folder / "contexttab.pt")
        if layout == "one-layer":  # the outputs of what the reference's own loader makes of the file
            model = ConTextTab(size, regression_type="l2", classification_type="cross-entropy")
            model.load_weights(folder / "contexttab.pt", torch.device("cpu"))
        model.eval()
        data = reference_inputs(n_context, n_query, kinds, n_classes, torch.Generator().manual_seed(1))
        tensors = {f"ref.{k}": v for k, v in data.items()}
        tensors["n_layers"] = torch.tensor(n_layers)  # a one-layer file does not say how many layers read it
        tensors["out_classification"] = forward(model, data, regression=False)
        tensors["out_regression"] = forward(model, data, regression=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "io.safetensors")
        print(f"{name}: {n_layers} layers x {hidden}, {layout} file, {n_context}+{n_query} rows, "
              f"{len(kinds)} features, {n_classes} classes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
