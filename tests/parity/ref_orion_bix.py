"""Reference outputs of the competitor's OrionBix (tabtune 0.2.1) on random weights, for test_orion_bix_parity.py.

Run with the reference environment's Python (never imported by tabtune):
    .venv-parity/bin/python tests/parity/ref_orion_bix.py runs/parity
Each case is a folder ``orionbix-<name>/`` holding ``Orion-BiX-v1.1.ckpt`` in the official layout
(``{"config": constructor kwargs, "state_dict": ...}``, written with ``torch.save``) and ``io.safetensors``
with the inputs and the reference's outputs: ``eval`` (its default eval forward), ``train`` (its training
forward; absent past max_classes, where the reference's training forward cannot run) and, for the
``wrapper`` cases, its ``OrionBixClassifier.predict_proba`` with one member and the arrays it fed the model.
Its eval forward with ``feature_shuffles`` (the wrapper's path) is not compared: for more than one table
it fails on a ``view`` of a non-contiguous tensor in ``BiAxialAttention``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tabtune.models.orion_bix.model.orion_bix import OrionBix
from tabtune.models.orion_bix.sklearn.classifier import OrionBixClassifier

SMALL = dict(embed_dim=16, col_num_blocks=2, col_nhead=2, row_num_blocks=2, row_nhead=2, row_num_cls=4,
             icl_num_blocks=2, icl_nhead=4)

# name: (config, tables, rows, training rows, features, classes, extra)
CASES = {
    "official-size": ({}, 1, 48, 40, 5, 3, {}),
    "wide": (SMALL, 2, 64, 48, 13, 7, {}),
    "one-feature": (SMALL, 3, 25, 20, 1, 2, {}),
    "ten-classes-compiled": ({**SMALL, "embed_dim": 24, "row_num_blocks": 3, "row_nhead": 4}, 1, 60, 50, 11, 10,
                             {"prefix": "_orig_mod.", "unknown_key": True}),
    "standard-columns": ({**SMALL, "col_attention_type": "standard", "col_num_inds": 8}, 2, 30, 20, 6, 4, {}),
    "post-norm-relu": ({**SMALL, "norm_first": False, "activation": "relu"}, 2, 30, 20, 6, 4, {}),
    "many-classes": (SMALL, 2, 90, 78, 7, 13, {}),
    "three-tables": (SMALL, 3, 40, 32, 8, 5, {}),
    "wrapper": (SMALL, 1, 90, 70, 9, 4, {"wrapper": True}),
    "wrapper-many-classes": (SMALL, 1, 110, 90, 6, 12, {"wrapper": True}),
}


def noisy_model(config: dict, seed: int) -> OrionBix:
    """The reference model with seeded weights plus noise: constant tensors (zero-initialised projections
    and biases, unit norm scales) get N(0, 0.2), every other tensor N(0, 0.1) on top of its initialisation,
    so no weight is trivially zero or one and every row's output depends on its cells."""
    torch.manual_seed(seed)
    model = OrionBix(**config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                constant = tensor.numel() == 1 or bool((tensor == tensor.flatten()[0]).all())
                tensor.add_(torch.randn(tensor.shape, generator=g) * (0.2 if constant else 0.1))
    return model


def labels(g, tables, n_train, n_classes):
    """Training labels with every class present in every table (the reference requires equal class counts)."""
    return torch.stack([torch.randperm(n_train, generator=g) % n_classes for _ in range(tables)]).float()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for i, (name, (config, tables, rows, n_train, n_features, n_classes, extra)) in enumerate(CASES.items()):
        model = noisy_model(config, seed=i)
        folder = out / f"orionbix-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = extra.get("prefix", "")
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
        saved_config = {**config, "a_key_the_constructor_ignores": 1} if extra.get("unknown_key") else dict(config)
        ckpt = folder / "Orion-BiX-v1.1.ckpt"
        torch.save({"config": saved_config, "state_dict": state}, ckpt)

        g = torch.Generator().manual_seed(100 + i)
        X = torch.randn(tables, rows, n_features, generator=g)
        y = labels(g, tables, n_train, n_classes)
        tensors = {"X": X, "y_train": y}
        model.eval()
        with torch.no_grad():
            tensors["eval"] = model(X.clone(), y.clone())
        if n_classes <= model.max_classes:
            model.train()
            with torch.no_grad():
                tensors["train"] = model(X.clone(), y.clone())
        if extra.get("wrapper"):
            rng = np.random.default_rng(i)
            X_all = rng.normal(size=(rows, n_features)) * rng.uniform(0.5, 3.0, size=n_features)
            y_all = np.arange(rows) % n_classes
            clf = OrionBixClassifier(n_estimators=1, norm_methods="none", model_path=str(ckpt),
                                     allow_auto_download=False, device="cpu", random_state=0)
            clf.fit(X_all[:n_train], y_all[:n_train])
            tensors["proba"] = torch.as_tensor(clf.predict_proba(X_all[n_train:]))
            (X_model, y_model), = clf.ensemble_generator_.transform(X_all[n_train:]).values()
            tensors["wrapper_X_context"] = torch.as_tensor(X_model[0][:n_train], dtype=torch.float32)
            tensors["wrapper_y_context"] = torch.as_tensor(y_model[0])
            tensors["wrapper_X_query"] = torch.as_tensor(X_model[0][n_train:], dtype=torch.float32)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "io.safetensors",
                  metadata={"n_classes": str(n_classes), "config": json.dumps(saved_config)})
        print(f"{name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k not in ("X", "y_train")))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
