"""The strategy contract: every registered strategy keeps the same promises through the seam.

Adding a strategy adds one row to ``CONTRACT`` (and its module, YAML and registry row: CONTRIBUTING.md).
Each runs on a random-weight tiny nano (its start is the pipeline's own ``_base_state_``), on the shared
fixture table, where fine-tuning from random weights improves validation (conftest.TUNE_PARAMS).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tabtune_cli import TabularPipeline
from tabtune_cli.commands.merge import merge_run
from tabtune_cli.config import LoraSettings, ModelConfig, conf_dir, group_defaults
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import get_adapter
from tabtune_cli.strategies import STRATEGIES, check_combination, get_strategy

from conftest import SEED, TUNE_PARAMS

TINY_NANO = {"pretrained": False, "size": "tiny"}

# what each strategy promises: trains (the loop runs), which weights change, whether LoRA keys act, the
# files a saved run holds beyond context/preprocessor/pipeline.json and model.safetensors (random weights: no
# checkpoint file rebuilds them, so every run keeps them; base-ft's are its trained ones)
CONTRACT = {
    "inference": dict(trains=False, weights_change=False, lora=False, files=set()),
    "base-ft": dict(trains=True, weights_change=True, lora=False, files=set()),
    "peft": dict(trains=True, weights_change=False, lora=True,
                 files={"adapter_model.safetensors", "adapter_config.json", "README.md"}),
    "context": dict(trains=True, weights_change=False, lora=False, files=set()),
}


def test_every_registered_strategy_has_a_contract_row_a_yaml_and_a_schema():
    assert set(STRATEGIES) == set(CONTRACT)
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name and strategy.description
        assert group_defaults("strategy", name)["name"] == name, f"conf/strategy/{name}.yaml"
        assert strategy.config_class(**{k: v for k, v in group_defaults("strategy", name).items()}).name == name
    with pytest.raises(TabTuneError, match="unknown strategy 'lora' \\(available: inference, base-ft, peft, context\\)"):
        get_strategy("lora")


@pytest.fixture(scope="module")
def fitted(split):
    X_train, y_train, _, _ = split
    out = {}
    for name in CONTRACT:
        out[name] = TabularPipeline("nano", tuning_strategy=name, tuning_params=dict(TUNE_PARAMS[name]),
                                    model_params=TINY_NANO, device="cpu", seed=SEED).fit(X_train, y_train)
    return out


@pytest.mark.parametrize("name", list(CONTRACT))
def test_what_trains_is_what_the_strategy_says(fitted, name):
    pipe, row = fitted[name], CONTRACT[name]
    assert (pipe.train_result_ is not None) == row["trains"]
    base_state = pipe._base_state_  # the random start
    module = pipe.module_.get_base_model() if row["lora"] else pipe.module_
    changed = [k for k, v in module.state_dict().items()
               if "lora_" not in k and k.replace("base_layer.", "") in base_state
               and not torch.equal(v, base_state[k.replace("base_layer.", "")])]
    assert bool(changed) == row["weights_change"], changed[:3]
    trainable = [n for n, p in pipe.module_.named_parameters() if p.requires_grad]
    if row["lora"]:
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == (len(base_state) if row["weights_change"] else 0)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_a_saved_run_predicts_what_it_predicted(fitted, name, split, tmp_path):
    pipe, row = fitted[name], CONTRACT[name]
    _, _, X_test, _ = split
    pipe.save(tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files - {"context.safetensors", "preprocessor.json", "pipeline.json", "model.safetensors"} == row["files"]
    again = TabularPipeline.load(tmp_path / "run", device="cpu")
    np.testing.assert_allclose(again.predict_proba(X_test), pipe.predict_proba(X_test), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["tuning_strategy"] == name


@pytest.mark.parametrize("name", list(CONTRACT))
def test_merge_writes_changed_weights_or_refuses_in_one_line(fitted, name, tmp_path):
    pipe = fitted[name]
    pipe.save(tmp_path / "run")
    if STRATEGIES[name].changes_weights:
        result = merge_run(tmp_path / "run", tmp_path / "out")
        assert result["verified_difference"] <= 1e-4 and result["title"] == STRATEGIES[name].export_title
    else:
        with pytest.raises(TabTuneError, match=f"a {name} run changed no weight; there is nothing to merge") as err:
            merge_run(tmp_path / "run", tmp_path / "out")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_keys_a_strategy_ignores_are_warned_about(name):
    given = {"lora.r", "strategy.learning_rate"}
    config = get_strategy(name).config_class(**group_defaults("strategy", name))
    warnings = check_combination(ModelConfig(), config, LoraSettings(), given)
    assert any("lora.r" in w for w in warnings) == (not CONTRACT[name]["lora"])
    assert any("strategy.learning_rate" in w for w in warnings) == (not CONTRACT[name]["trains"])


def test_ls_lists_every_strategy_with_what_trains():
    out = subprocess.run([sys.executable, "-m", "tabtune_cli", "ls"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": ""}, check=True).stdout
    for strategy in STRATEGIES.values():
        assert strategy.name in out and strategy.description.split(":")[0] in out


# ---- context tuning ------------------------------------------------------------------------------

def test_context_tuning_learns_rows_that_replace_the_context(fitted, split):
    pipe = fitted["context"]
    X_train, y_train, X_test, y_test = split
    # the saved context is the learned rows, whatever the table's size: prediction cost no longer grows with it
    assert pipe.context_X_.shape == (TUNE_PARAMS["context"]["context_rows"], pipe.context_X_.shape[1])
    assert set(pipe.context_y_) == {0, 1}  # every class keeps a row
    start = pipe.train_result_.val_before
    assert pipe.train_result_.best_val < start  # validation log loss fell: the rows learned something
    assert pipe.summary()["trainable_params"] == pipe.context_X_.size  # only the rows trained


def test_context_tuning_joins_the_real_rows_when_asked(split):
    X_train, y_train, _, _ = split
    params = {**TUNE_PARAMS["context"], "context_mode": "join", "epochs": 1}
    pipe = TabularPipeline("nano", tuning_strategy="context", tuning_params=params, device="cpu",
                           seed=SEED).fit(X_train, y_train)
    real = len(X_train)  # training rows, then the validation rows the pipeline split off, then the learned ones
    assert len(pipe.context_y_) == real + params["context_rows"]


def test_context_tuning_is_refused_in_one_line_where_no_gradient_reaches_the_rows(split):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match="strategy=context: TabICL's episodes reach the context rows only "
                                           "through its package's own preprocessing") as err:
        TabularPipeline("tabicl", tuning_strategy="context", tuning_params=dict(TUNE_PARAMS["context"]),
                        model_params={"pretrained": False, "size": "tiny", "n_estimators": 1}, device="cpu",
                        seed=SEED).fit(X_train, y_train)
    assert "\n" not in str(err.value)


def test_every_adapter_that_claims_context_gradients_has_them():
    from tabtune_cli.models.registry import ADAPTERS

    task = Task("classification", 3)
    for name in ADAPTERS:
        adapter = get_adapter(name)
        if not adapter.context_gradients:
            continue
        module, _ = adapter.build(ModelConfig(name=name, pretrained=False, size="tiny"), task)
        Xc = torch.randn(1, 24, 4, requires_grad=True)
        yc = torch.arange(24).remainder(3)[None]
        out = adapter.episode_logits(module, Xc, yc, torch.randn(1, 8, 4), task, adapter.config_class(name=name))
        out.float().logsumexp(-1).sum().backward()
        assert Xc.grad is not None and Xc.grad.abs().sum() > 0, name


def test_a_strategy_yaml_composes_on_the_command_line():
    for name in STRATEGIES:
        out = subprocess.run([sys.executable, "-m", "tabtune_cli", "train", f"strategy={name}", "--cfg", "job"],
                             capture_output=True, text=True, check=True).stdout
        assert f"name: {name}" in out, name
    assert (conf_dir() / "strategy").is_dir()


def test_context_tuning_stays_finite_on_a_table_with_constant_and_repeated_columns():
    """digits has all-zero pixel columns: the gradient of nano's PCA view through the context's SVD divided by
    zero differences of singular values and the learned rows went NaN (linalg.svd failed at the next step).
    The view's axes are fitted statistics now, with no gradient through them."""
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True)
    X, y = digits.data.iloc[:600], digits.target.iloc[:600].astype(str)
    assert (X.std() == 0).any()
    pipe = TabularPipeline("nano", tuning_strategy="context", device="cpu", seed=SEED,
                           tuning_params={"epochs": 1, "steps_per_epoch": 8, "show_progress": False}).fit(X, y)
    assert pipe.train_result_.steps == 8 and np.isfinite(pipe.context_X_).all()


def test_the_command_line_refuses_context_tuning_of_such_a_model_before_a_run_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tabtune_cli", "train", "debug=smoke", "model=tabicl",
                             "strategy=context"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("tabtune: error: strategy=context: TabICL's episodes reach the context rows")
    assert not list(tmp_path.rglob("run.json"))
