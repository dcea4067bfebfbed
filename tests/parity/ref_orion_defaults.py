"""Reference answers of the Orions' wrappers at their defaults, for test_orion_defaults_parity.py.

Run with the parity environment's Python (never imported by tabtune):
    .venv-parity/bin/python tests/parity/ref_orion_defaults.py runs/parity
For OrionMSP and OrionBix: a random-weight checkpoint in the official layout and a raw numeric table (3,000
training rows, columns on scales from 1 to 1e4, a skewed one, an integer one, outliers) go to
``OrionMSPClassifier()`` / ``OrionBixClassifier()`` at their defaults (32 members, Latin-square feature
orders, class shifts, "none" + "power" normalisations, outlier threshold 4, temperature 0.9, seed 42); the
folder ``orion-defaults-<model>/`` keeps the checkpoint and ``io.safetensors`` with the table and
``predict_proba``'s answers. One setting is not the default, for OrionBix only: ``batch_size=1``, because its
batched path (several members in one forward) fails in tabtune 0.2.1 (a ``view`` of a non-contiguous tensor
in ``BiAxialAttention``); one member a forward is its working computation. For OrionMSP the folder also keeps
the answers at ``batch_size=1``: the batch size alone moves the wrapper's answers (``orion_members.member_views``).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tabtune.models.orion_bix.model.orion_bix import OrionBix
from tabtune.models.orion_bix.sklearn.classifier import OrionBixClassifier
from tabtune.models.orion_msp.model.orion_msp import OrionMSP
from tabtune.models.orion_msp.sklearn.classifier import OrionMSPClassifier

N_TRAIN, N_TEST, N_CLASSES = 3000, 400, 4
MODELS = {
    "orionmsp": (OrionMSP, OrionMSPClassifier, "Orion-MSP-v1.0.ckpt", {},
                 dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=3, row_nhead=2,
                      row_num_cls=2, row_num_global=2, icl_num_blocks=2, icl_nhead=2, perc_num_latents=4,
                      perc_layers=1)),
    "orionbix": (OrionBix, OrionBixClassifier, "Orion-BiX-v1.1.ckpt", {"batch_size": 1},
                 dict(embed_dim=16, col_num_blocks=2, col_nhead=2, row_num_blocks=2, row_nhead=2, row_num_cls=4,
                      icl_num_blocks=2, icl_nhead=4)),
}


def raw_table(seed: int = 0):
    """Numbers as a user has them: scales 1 to 1e4, a log-normal column, an integer count, a few outliers;
    the class depends on several columns, so the model's answer varies across rows."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    X = rng.normal(size=(n, 6)) * np.array([1.0, 10.0, 1e3, 1e4, 1.0, 3.0]) + np.array([0, 5, 100, 0, 0, 0])
    X[:, 4] = np.exp(2 * X[:, 4])
    X[:, 5] = np.round(np.abs(X[:, 5]))
    X[rng.choice(n, 20, replace=False), 0] *= 50  # outliers for the 4-sigma clipping
    score = X[:, 0] + X[:, 1] / 10 + np.log(X[:, 4]) + rng.normal(size=n) * 0.5
    y = np.digitize(score, np.quantile(score, [0.25, 0.5, 0.75]))
    return X, y


def noisy(model_class, config: dict, seed: int) -> torch.nn.Module:
    """Seeded weights plus noise everywhere (zero-initialised projections would hide a skipped branch)."""
    torch.manual_seed(seed)
    model = model_class(**config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.3)
    return model


def main(out: Path) -> None:
    torch.set_num_threads(2)
    X, y = raw_table()
    for seed, (name, (model_class, wrapper, filename, settings, config)) in enumerate(MODELS.items()):
        folder = out / f"orion-defaults-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        model = noisy(model_class, config, seed)
        torch.save({"config": config, "state_dict": model.state_dict()}, folder / filename)
        clf = wrapper(model_path=str(folder / filename), allow_auto_download=False, device="cpu", **settings)
        proba = clf.fit(X[:N_TRAIN], y[:N_TRAIN]).predict_proba(X[N_TRAIN:])
        members = sum(len(o) for o in clf.ensemble_generator_.class_shift_offsets_.values())
        tensors = {"X_train": torch.as_tensor(X[:N_TRAIN]), "y_train": torch.as_tensor(y[:N_TRAIN]),
                   "X_test": torch.as_tensor(X[N_TRAIN:]), "proba": torch.as_tensor(proba)}
        if "batch_size" not in settings:  # what the batch size alone changes in the wrapper's answers
            one = wrapper(model_path=str(folder / filename), allow_auto_download=False, device="cpu", batch_size=1)
            tensors["proba_batch_size_1"] = torch.as_tensor(one.fit(X[:N_TRAIN], y[:N_TRAIN]).predict_proba(X[N_TRAIN:]))
        save_file(tensors,
                  folder / "io.safetensors", metadata={"checkpoint": filename, "members": str(members)})
        print(f"{name}: {members} members, proba {proba.shape}, spread {np.ptp(proba[:, 0]):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
