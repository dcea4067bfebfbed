"""Reference outputs of AutoGluon's Mitra (Tab2D) on random weights, for tests/parity/test_mitra_parity.py.

Run by ``make parity`` with the AutoGluon environment's Python (never imported by tabtune):
    .venv-parity-ag/bin/python tests/parity/ref_mitra.py runs/parity
Each case is a folder ``mitra-<name>/`` with the checkpoint written by AutoGluon's own
``Tab2D.save_pretrained`` (config.json + model.safetensors, the official layout) and
``io.safetensors`` holding the inputs and the reference's outputs.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from autogluon.tabular.models.mitra._internal.models.tab2d import Tab2D

# name: (task, dim, n_layers, n_heads, dim_output, batch, support rows, query rows, features, classes)
CASES = {
    "cls-official-size": ("CLASSIFICATION", 512, 12, 4, 10, 1, 64, 16, 5, 3),
    "cls-wide": ("CLASSIFICATION", 32, 3, 4, 10, 2, 80, 20, 12, 10),
    "cls-one-feature": ("CLASSIFICATION", 32, 2, 2, 10, 3, 33, 7, 1, 2),
    "reg-official-size": ("REGRESSION", 512, 12, 4, 1, 1, 64, 16, 5, 0),
    "reg-small": ("REGRESSION", 32, 3, 4, 1, 2, 40, 11, 7, 0),
}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for name, (task, dim, n_layers, n_heads, dim_output, b, n_s, n_q, f, n_classes) in CASES.items():
        torch.manual_seed(0)
        model = Tab2D(dim=dim, dim_output=dim_output, n_layers=n_layers, n_heads=n_heads, task=task,
                      use_pretrained_weights=False, path_to_weights="", device="cpu")
        with torch.no_grad():  # noise in every tensor, so nothing is trivially zero or one
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.eval()
        folder = out / f"mitra-{name}"
        model.save_pretrained(str(folder))
        g = torch.Generator().manual_seed(1)
        x_s, x_q = torch.randn(b, n_s, f, generator=g), torch.randn(b, n_q, f, generator=g)
        y_s = torch.randint(0, n_classes, (b, n_s), generator=g) if n_classes else torch.rand(b, n_s, generator=g)
        no_pad = (torch.zeros(b, f, dtype=torch.bool), torch.zeros(b, n_s, dtype=torch.bool),
                  torch.zeros(b, n_q, dtype=torch.bool))
        with torch.no_grad():  # the reference overwrites padded cells of x_support in place: give it copies
            y_q = model(x_s.clone(), y_s.clone(), x_q.clone(), *no_pad)
        save_file({"x_support": x_s, "y_support": y_s, "x_query": x_q, "output": y_q.contiguous()},
                  folder / "io.safetensors")
        print(f"{name}: output {tuple(y_q.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
