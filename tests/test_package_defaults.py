"""With no setting given, tabtune answers as the model's own package does at its defaults.

One raw table of 3,200 training rows (numbers on their own scales, a skewed column, missing values) goes
to tabtune with nothing but the checkpoint, and to the package's estimator as a user would call it:
``TabICLClassifier()``, ``TabPFNClassifier()`` and ``TabDPTClassifier().predict_proba`` on the same
random-weight checkpoint in the official format. Every training row is context on both sides, with the
package's members, temperature and seed. The only arguments given to the packages name the checkpoint and
the CPU, and switch off what changes no number (TabDPT's compilation and flash attention, progress output);
TabPFN's refusal of more than 1,000 rows on a CPU is lifted through its own setting
(``TABPFN_ALLOW_CPU_LARGE_DATASET``), not through the estimator's arguments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tabtune_cli import TabularPipeline

from test_tabdpt import official_checkpoint as tabdpt_checkpoint
from test_tabicl_recipe import write_official as tabicl_checkpoint
from test_tabpfn import released_v2_checkpoint as tabpfn_checkpoint

TOLERANCE = 1e-4
N_TRAIN, N_TEST = 3200, 300


def raw_table(seed: int = 0):
    """Five numeric columns as a user has them: other scales and offsets, one skewed, gaps in one."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    X = pd.DataFrame(rng.normal(size=(n, 5)) * [1.0, 250.0, 0.01, 3.0, 1.0] + [0.0, 1e4, -2.0, 7.0, 0.0],
                     columns=["a", "b", "c", "d", "e"])
    X["e"] = np.exp(2.0 * X["e"])
    X.loc[rng.random(n) < 0.05, "d"] = np.nan
    score = X["a"] + (X["b"] - 1e4) / 250.0 - 50.0 * (X["c"] + 2.0) + rng.normal(scale=0.5, size=n)
    y = pd.Series(np.digitize(score, np.quantile(score, [0.3, 0.7])), name="label").map({0: "lo", 1: "mid", 2: "hi"})
    return X.iloc[:N_TRAIN], y.iloc[:N_TRAIN], X.iloc[N_TRAIN:]


def tabtune_probabilities(model: str, path, X, y, X_test) -> np.ndarray:
    pipe = TabularPipeline(model_name=model, tuning_strategy="inference", tuning_params={"show_progress": False},
                           model_params={"checkpoint": str(path)}, device="cpu").fit(X, y)
    assert len(pipe.context_y_) == N_TRAIN  # every training row is context, as in the package
    return pipe.predict_proba(X_test), list(pipe.classes_)


def compare(ours, classes, theirs, their_classes, name):
    assert list(their_classes) == classes
    gap = np.abs(ours - theirs).max()
    print(f"{name}: max |tabtune - package| = {gap:.2e}")
    assert gap <= TOLERANCE
    return gap


def test_tabicl_with_no_settings_equals_tabiclclassifier_at_its_defaults(tmp_path):
    from tabicl import TabICLClassifier

    path = tabicl_checkpoint(tmp_path / "tabicl.ckpt", 10, 3)
    X, y, X_test = raw_table()
    ours, classes = tabtune_probabilities("tabicl", path, X, y, X_test)
    package = TabICLClassifier(model_path=str(path), device="cpu", allow_auto_download=False).fit(X, y)
    assert package.n_estimators == 8
    compare(ours, classes, package.predict_proba(X_test), package.classes_, "TabICL")


def test_tabpfn_with_no_settings_equals_tabpfnclassifier_at_its_defaults(tmp_path, monkeypatch):
    from tabpfn import TabPFNClassifier
    from tabpfn.settings import settings

    monkeypatch.setattr(settings.tabpfn, "allow_cpu_large_dataset", True)
    path = tmp_path / "tabpfn-v2-classifier.ckpt"
    tabpfn_checkpoint(path)
    X, y, X_test = raw_table()
    ours, classes = tabtune_probabilities("tabpfn", path, X, y, X_test)
    package = TabPFNClassifier(model_path=str(path), device="cpu").fit(X, y)
    assert package.n_estimators == "auto" and package.softmax_temperature == "auto"
    compare(ours, classes, package.predict_proba(X_test), package.classes_, "TabPFN")


def test_tabdpt_with_no_settings_equals_tabdptclassifier_at_its_defaults(tmp_path):
    from tabdpt import TabDPTClassifier

    path = tmp_path / "tabdpt1_3.safetensors"
    tabdpt_checkpoint(path)
    X, y, X_test = raw_table()
    ours, classes = tabtune_probabilities("tabdpt", path, X, y, X_test)
    labels = np.array(sorted(y.unique()))
    package = TabDPTClassifier(model_weight_path=str(path), device="cpu", compile=False, use_flash=False,
                               verbose=False)
    package.fit(X.to_numpy(dtype=np.float64), np.searchsorted(labels, y.to_numpy()))
    compare(ours, classes, package.predict_proba(X_test.to_numpy(dtype=np.float64)), labels, "TabDPT")


@pytest.mark.parametrize("model", ["tabicl", "tabpfn", "tabdpt"])
def test_the_package_sees_the_users_numbers_not_tabtunes_rescaling(model):
    """The matrix handed to the package is the table's numbers (a gap stays a gap), for these three models."""
    from tabtune_cli.models.registry import get_adapter

    X, y, _ = raw_table()
    pre = get_adapter(model).preprocessor(get_adapter(model).config_class()).fit(X, y)
    matrix = pre.transform(X)
    np.testing.assert_array_equal(np.isnan(matrix), X.isna().to_numpy())
    np.testing.assert_array_equal(matrix, X.to_numpy(dtype=np.float64))  # not even rounded to float32
    assert pre.feature_names == list(X.columns)  # no missing-value indicator: the package handles gaps itself
    # a saved pipeline reloads the same behaviour; one saved before the option existed keeps standardising
    from tabtune_cli.data.preprocess import Preprocessor

    np.testing.assert_array_equal(Preprocessor.from_json(pre.to_json()).transform(X), matrix)
    old = {k: v for k, v in pre.to_json().items() if k != "raw_numbers"}
    assert np.nanmax(np.abs(Preprocessor.from_json(old).transform(X))) <= 4.0


def test_models_without_a_numeric_package_keep_the_shared_standardisation():
    from tabtune_cli.models.registry import get_adapter

    X, y, _ = raw_table()
    matrix = get_adapter("nano").preprocessor(get_adapter("nano").config_class()).fit(X, y).transform(X)
    assert not np.isnan(matrix).any() and np.abs(matrix).max() <= 4.0
    torch.testing.assert_close(torch.tensor(np.nanmean(matrix[:, :3], 0)), torch.zeros(3), atol=1e-2, rtol=0)
