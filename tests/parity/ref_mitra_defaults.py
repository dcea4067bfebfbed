"""Reference answers of AutoGluon's Mitra wrappers at their zero-shot defaults, for test_mitra_defaults_parity.py.

Run with the AutoGluon environment's Python (never imported by tabtune):
    .venv-parity-ag/bin/python tests/parity/ref_mitra_defaults.py runs/parity
For classification and regression: a random-weight Tab2D (dim 64, 3 layers, noise of 0.15 on every tensor)
written by AutoGluon's own ``Tab2D.save_pretrained``, and a raw numeric table (3,000 training rows, 400 test
rows; columns on scales from 1 to 1e4, a skewed one, an integer one, outliers, 5% gaps in two columns) go to
``MitraClassifier(fine_tune=False, device="cpu", hf_model=<folder>)`` / ``MitraRegressor(...)``: zero-shot,
every other setting the wrapper's default. The folder ``mitra-defaults-<case>/`` keeps the checkpoint and
``io.safetensors`` with the table and the answers.

The wrapper's default answer (``answer``) is not reproducible by itself: its one member multiplies every feature
by a random sign (``random_mirror_x``) and, for regression, mirrors the target (``y -> 1 - y``) at random, both
drawn from NumPy's global state, as is the regressor's 80% split below. The global state is seeded here so the
file is reproducible (for regression, the first seed from 0 whose split lacks the target's minimum or maximum,
so that the split's effect shows), and what was drawn is kept (``mirror``, ``regression_mirror``). The same
fitted wrapper is then asked again with one of its choices undone at a time, so each difference is measured
on its own:

* ``answer_fp32``: autocast off. The wrapper hard-codes ``precision="bfloat16"``; on CPU every linear layer and
  attention of the forward then runs in bfloat16.
* ``answer_fp32_allrows``: also with the preprocessing statistics of all training rows (the gap means; for
  regression, the target's min and max). The wrapper fits its preprocessor on an 80% split of the training
  rows (made for fine-tuning's validation, made without fine-tuning too) while every row is support at
  prediction; ``y_min``/``y_max`` (the split's) are kept.
* ``answer_fp32_allrows_unmirrored``: also without the random feature signs and target mirror (what
  ``random_mirror_x=False, random_mirror_regression=False`` do).
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from autogluon.tabular.models.mitra._internal.models.tab2d import Tab2D
from autogluon.tabular.models.mitra.sklearn_interface import MitraClassifier, MitraRegressor

N_TRAIN, N_TEST = 3000, 400
ARCH = dict(dim=64, n_layers=3, n_heads=4)
CASES = {"cls": ("CLASSIFICATION", 10), "reg": ("REGRESSION", 1)}  # name: (task, dim_output)


def raw_table(seed: int = 0):
    """Numbers as a user has them (as ref_orion_defaults.py): scales 1 to 1e4, a log-normal column, an integer
    count, a few outliers, gaps; the class and the value depend on several columns."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    X = rng.normal(size=(n, 6)) * np.array([1.0, 10.0, 1e3, 1e4, 1.0, 3.0]) + np.array([0, 5, 100, 0, 0, 0])
    X[:, 4] = np.exp(2 * X[:, 4])
    X[:, 5] = np.round(np.abs(X[:, 5]))
    X[rng.choice(n, 20, replace=False), 0] *= 50
    score = X[:, 0] + X[:, 1] / 10 + np.log(X[:, 4]) + rng.normal(size=n) * 0.5
    y_cls = np.digitize(score, np.quantile(score, [0.25, 0.5, 0.75]))
    y_reg = 3.0 * score + 50.0
    for column in (1, 3):
        X[rng.random(n) < 0.05, column] = np.nan
    return X, y_cls, y_reg


def noisy_tab2d(task: str, dim_output: int, seed: int) -> Tab2D:
    torch.manual_seed(seed)
    model = Tab2D(**ARCH, dim_output=dim_output, task=task, use_pretrained_weights=False, path_to_weights="",
                  device="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # noise in every tensor, so nothing is trivially zero or one
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def answers(wrapper, X_train, X_test) -> np.ndarray:
    wrapper.X = X_train.copy()  # the wrapper fills the gaps of its support and query in place: fresh copies
    if isinstance(wrapper, MitraClassifier):
        return wrapper.predict_proba(X_test.copy())
    return wrapper.predict(X_test.copy())


def fitted(kind, folder: Path, X_train, y_train, seed: int):
    np.random.seed(seed)  # the wrapper draws its regression split and its signs from the global state
    wrapper = kind(fine_tune=False, device="cpu", hf_model=str(folder), verbose=False)
    return wrapper.fit(X_train.copy(), y_train.copy())


def main(out: Path) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
    X, y_cls, y_reg = raw_table()
    for index, (name, (task, dim_output)) in enumerate(CASES.items()):
        folder = out / f"mitra-defaults-{name}"
        noisy_tab2d(task, dim_output, index).save_pretrained(str(folder))
        y = y_cls if task == "CLASSIFICATION" else y_reg
        X_train, y_train, X_test = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:]
        kind = MitraClassifier if task == "CLASSIFICATION" else MitraRegressor
        seed = 0
        wrapper = fitted(kind, folder, X_train, y_train, seed)
        pre = wrapper.trainers[0].preprocessor
        while task == "REGRESSION" and (pre.y_min, pre.y_max) == (y_train.min(), y_train.max()):
            seed += 1
            wrapper = fitted(kind, folder, X_train, y_train, seed)
            pre = wrapper.trainers[0].preprocessor
        (trainer,) = wrapper.trainers
        tensors = {"X_train": torch.as_tensor(X_train), "y_train": torch.as_tensor(y_train),
                   "X_test": torch.as_tensor(X_test), "mirror": torch.as_tensor(pre.mirror.reshape(-1).astype(float))}
        tensors["answer"] = torch.as_tensor(answers(wrapper, X_train, X_test))
        trainer.cfg.hyperparams["precision"] = "float32"  # CPU autocast refuses float32 (a warning): autocast off
        tensors["answer_fp32"] = torch.as_tensor(answers(wrapper, X_train, X_test))
        pre.pre_nan_mean = np.nanmean(X_train, axis=0)
        if task == "REGRESSION":
            tensors["y_min"], tensors["y_max"] = torch.tensor(float(pre.y_min)), torch.tensor(float(pre.y_max))
            pre.y_min, pre.y_max = float(y_train.min()), float(y_train.max())
        tensors["answer_fp32_allrows"] = torch.as_tensor(answers(wrapper, X_train, X_test))
        pre.mirror = np.ones_like(pre.mirror)
        if task == "REGRESSION":
            tensors["regression_mirror"] = torch.tensor(float(pre.regression_mirror))
            pre.regression_mirror = False
        tensors["answer_fp32_allrows_unmirrored"] = torch.as_tensor(answers(wrapper, X_train, X_test))
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "io.safetensors",
                  metadata={"task": task.lower(), "numpy_seed": str(seed)})
        a = tensors["answer"].numpy()
        print(f"{name}: answer {a.shape}, spread over rows {np.ptp(a, axis=0).max():.3f}, NumPy seed {seed}, "
              f"feature signs drawn {tensors['mirror'].int().tolist()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
