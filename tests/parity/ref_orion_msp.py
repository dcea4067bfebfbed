"""Reference outputs of the competitor's OrionMSP (tabtune 0.2.1) on random weights, for test_orion_msp_parity.py.

Run with the parity environment's Python (never imported by tabtune or its tests):
    .venv-parity/bin/python tests/parity/ref_orion_msp.py runs/parity
Each case is a folder ``orionmsp-<name>/`` holding ``Orion-MSP-v1.0.ckpt`` in the official layout
(``torch.save({"config": kwargs, "state_dict": ...})``) and ``io.safetensors`` with the inputs and the
reference's outputs: ``eval`` (the default eval forward: logits, or ``T * log p`` past max_classes),
``eval_proba`` (``return_logits=False``) and, where the labels fit the head, ``train`` (train mode).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tabtune.models.orion_msp.model.orion_msp import OrionMSP

SMALL = dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=3, row_nhead=2,
             row_num_cls=2, row_num_global=2, icl_num_blocks=2, icl_nhead=2, perc_num_latents=4, perc_layers=1)

# name: (config overrides, batch, rows, context rows, features, classes)
CASES = {
    "small": (SMALL, 1, 40, 30, 5, 3),
    "wide-10-classes": (SMALL, 2, 50, 35, 13, 10),
    "one-feature-binary": (SMALL, 3, 24, 17, 1, 2),
    "two-blocks-per-scale": ({**SMALL, "row_num_blocks": 4, "row_scales": (1, 3), "perc_layers": 2}, 1, 60, 40, 23, 7),
    "pma-grouping": ({**SMALL, "row_group_mode": "pma"}, 2, 30, 20, 6, 4),
    "no-memory": ({**SMALL, "perc_num_latents": 0}, 1, 30, 20, 6, 4),
    "post-norm-relu": ({**SMALL, "norm_first": False, "activation": "relu"}, 1, 30, 20, 6, 4),
    "random-links": ({**SMALL, "row_num_random": 1}, 1, 30, 20, 9, 3),
    "hierarchy-9-classes": ({**SMALL, "max_classes": 4}, 2, 70, 55, 7, 9),
    "hierarchy-20-classes": ({**SMALL, "max_classes": 4}, 1, 90, 70, 7, 20),
    "official-size": ({}, 1, 48, 36, 12, 5),
}
# the reference draws its random row links (row_num_random) from torch's global generator on every call
FORWARD_SEED = 5


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for name, (config, batch, rows, n_context, n_features, n_classes) in CASES.items():
        torch.manual_seed(0)
        model = OrionMSP(**config)
        with torch.no_grad():  # zero-initialised projections would hide a wrong loading or a skipped branch
            for tensor in model.state_dict().values():
                if tensor.is_floating_point() and not tensor.any():
                    tensor.normal_(0.0, 0.1)
        folder = out / f"orionmsp-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"config": dict(config), "state_dict": model.state_dict()}, folder / "Orion-MSP-v1.0.ckpt")
        g = torch.Generator().manual_seed(1)
        X = torch.randn(batch, rows, n_features, generator=g)
        # every class in every table's context, in random order
        y = torch.stack([torch.randperm(n_context, generator=g) % n_classes for _ in range(batch)]).float()
        tensors = {"X": X, "y_train": y}
        model.eval()
        with torch.no_grad():
            torch.manual_seed(FORWARD_SEED)
            tensors["eval"] = model(X.clone(), y.clone())
            torch.manual_seed(FORWARD_SEED)
            tensors["eval_proba"] = model(X.clone(), y.clone(), return_logits=False)
            if n_classes <= model.max_classes:  # the reference's train path has no class hierarchy
                model.train()
                torch.manual_seed(FORWARD_SEED)
                tensors["train"] = model(X.clone(), y.clone())
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "io.safetensors")
        print(f"{name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k not in ("X", "y_train")))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
