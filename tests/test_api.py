"""The Python API the guides use: tuning_params as written, one-file saves, adapters as artifacts,
LoRA options, provenance, and the same defaults and context rule as the command line."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tabtune_cli import TabTuneError, TabularLeaderboard, TabularPipeline
from tabtune_cli.config import group_defaults
from tabtune_cli.models.base import Task
from tabtune_cli.models.nano import NanoAdapter
from tabtune_cli.tuning import lora
from tabtune_cli.tuning.trainer import _optimizer

from conftest import SEED, Bomb, TINY_MODEL, TUNE_PARAMS, fit_pipeline

PEFT = {**TUNE_PARAMS["peft"], "epochs": 2}


def test_tuning_params_take_the_guides_keys(split, tmp_path):
    X_train, y_train, X_test, _ = split
    best = tmp_path / "best_model.pt"
    pipe = TabularPipeline("TabICL", "classification", "peft", model_params=TINY_MODEL, tuning_params={
        **PEFT, "device": "cpu", "save_checkpoint_path": str(best),
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": None, "bias": "none"}})
    pipe.fit(X_train, y_train)
    assert pipe.device_.type == "cpu" and pipe.lora_settings_.r == 4 and pipe.lora_settings_.lora_alpha == 8
    # the best weights, as safetensors whatever the extension says: the adapters the pipeline ends with
    from peft import get_peft_model_state_dict

    saved = load_file(best)
    final = get_peft_model_state_dict(pipe.module_)
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "cpu", "tuning_params": {"device": "cuda"}}, "device given twice"),
    ({"peft_config": {"r": 4}, "tuning_params": {"peft_config": {"r": 8}}}, "peft_config given twice"),
    ({"tuning_params": {"device": "tpu"}}, "device: 'tpu' is not one of"),
    ({"tuning_params": {"peft_config": {"rank": 4}}}, "unknown peft_config key 'rank'"),
    ({"tuning_params": {"peft_config": {"r": "many"}}}, "lora.r': expected a whole number >= 1 or 'auto'"),
    ({"tuning_params": {"peft_config": {"bias": "some"}}}, "bias"),
])
def test_contradictions_and_bad_values_are_one_line_errors(split, kwargs, message):
    X_train, y_train, _, _ = split
    with pytest.raises(TabTuneError, match=message) as info:
        TabularPipeline("tabicl", tuning_strategy="peft", model_params=TINY_MODEL, **kwargs).fit(X_train, y_train)
    assert "\n" not in str(info.value)


def test_library_defaults_are_the_command_lines(caplog):
    pipe = TabularPipeline(tuning_strategy="peft")
    adapter, _, strategy, model, lora_settings, device, _ = pipe._configs()
    assert adapter.name == "nano"  # conf/train.yaml's default model
    for key, value in group_defaults("strategy", "peft").items():
        got = getattr(strategy, key)
        assert (got.value if hasattr(got, "value") else got) == value, key
    assert model.n_estimators == group_defaults("model", "nano")["n_estimators"] and device == "auto"
    assert lora_settings.r == group_defaults("lora", "default")["r"]
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        TabularPipeline(tuning_params={"epochs": 3}, peft_config={"r": 4})._configs()
    assert "strategy.epochs" in caplog.text and "lora.r" in caplog.text


def test_validation_rows_are_scored_then_join_the_context(split):
    X_train, y_train, X_test, y_test = split
    args = dict(model_name="tabicl", model_params=TINY_MODEL, device="cpu")
    with_val = TabularPipeline(**args).fit(X_train, y_train, X_test, y_test)
    alone = TabularPipeline(**args).fit(X_train, y_train)
    expected = alone.evaluate(X_test, y_test)
    expected.pop("predict_seconds")
    assert with_val.val_metrics_ == pytest.approx(expected)
    assert len(with_val.context_y_) == len(X_train) + len(X_test)


def test_a_one_file_save_is_safetensors_and_reloads(split, tmp_path):
    X_train, y_train, X_test, _ = split
    pipe = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT)
    path = pipe.save(tmp_path / "pipeline_with_lora.joblib")
    assert path.is_file() and not (tmp_path / "pipeline_with_lora.joblib.partial").exists()
    with safe_open(path, framework="pt") as fh:  # a safetensors file: header, tensors, JSON metadata
        meta = fh.metadata()
        assert meta["format"] == "tabtune-pipeline"
        assert any(k.startswith("adapter_model.safetensors/") for k in fh.keys())
    assert json.loads(meta["file:pipeline.json"])["tuning_strategy"] == "peft"
    loaded = TabularPipeline.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), pipe.predict_proba(X_test))


@pytest.mark.parametrize("target", ["x.joblib", "model.safetensors", "adapter_model.safetensors"])
def test_a_pickle_where_an_artifact_belongs_is_refused_never_run(split, tmp_path, target):
    X_train, y_train, _, _ = split
    marker = tmp_path / "executed"
    if target == "x.joblib":
        path = tmp_path / target
    else:
        strategy = "base-ft" if target == "model.safetensors" else "peft"
        pipe = fit_pipeline(strategy, X_train, y_train, tuning_params={**TUNE_PARAMS[strategy], "epochs": 1})
        path = pipe.save(tmp_path / "saved") / target
    path.write_bytes(pickle.dumps(Bomb(marker)))
    with pytest.raises(TabTuneError, match="never unpickles|only as safetensors|not a safetensors|cannot load") as info:
        TabularPipeline.load(path if target == "x.joblib" else path.parent)
    assert str(path.name) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_an_adapter_bin_is_never_read(split, tmp_path):
    X_train, y_train, _, _ = split
    saved = fit_pipeline("peft", X_train, y_train, tuning_params={**PEFT, "epochs": 1}).save(tmp_path / "run")
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(TabTuneError, match="adapter_model.safetensors: missing"):
        TabularPipeline.load(saved)


def test_lora_r_auto_follows_the_seed_rule_and_is_recorded(split, tmp_path):
    assert [lora.auto_rank(n) for n in (100, 200_000, 300_000, 1_000_000, 3_200_000)] == [4, 4, 8, 16, 64]
    X_train, y_train, _, _ = split
    pipe = fit_pipeline("peft", X_train, y_train, tuning_params={**PEFT, "epochs": 1}, peft_config={"r": "auto"})
    saved = pipe.save(tmp_path / "run")
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((saved / "pipeline.json").read_text())["peft_config"]["r"] == 4


def test_lora_plus_gives_the_b_matrices_lr_ratio_times_the_rate(split):
    X_train, y_train, _, _ = split
    pipe = fit_pipeline("peft", X_train, y_train, tuning_params={**PEFT, "epochs": 1}, peft_config={"lr_ratio": 16})
    assert pipe.lora_settings_.lr_ratio == 16
    pipe.module_.requires_grad_(False)
    for name, p in pipe.module_.named_parameters():
        p.requires_grad_("lora_" in name)
    params = [p for p in pipe.module_.parameters() if p.requires_grad]
    rate = {id(p): g["lr"] for g in _optimizer(pipe.module_, params, pipe.strategy_, 16).param_groups
            for p in g["params"]}
    names = {n: rate[id(p)] for n, p in pipe.module_.named_parameters() if p.requires_grad}
    lr = pipe.strategy_.learning_rate
    assert names and all(v == pytest.approx(lr * (16 if "lora_B" in n else 1)) for n, v in names.items())


def test_a_run_starts_from_another_runs_adapters(split, tmp_path):
    X_train, y_train, X_test, _ = split
    first = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT)
    source = first.save(tmp_path / "first")
    # inference with the adapters folded in predicts as the adapter model does
    folded = fit_pipeline("inference", X_train, y_train, model_params={**TINY_MODEL, "adapters": str(source)})
    folded.preprocessor_, folded.context_X_, folded.context_y_ = first.preprocessor_, first.context_X_, first.context_y_
    np.testing.assert_allclose(folded.predict_proba(X_test), first.predict_proba(X_test), atol=1e-5)
    # peft goes on from them: before its first step it scores what the first run ended with
    more = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT,
                        model_params={**TINY_MODEL, "adapters": str(source)})
    assert more.train_result_.val_before == pytest.approx(first.train_result_.best_val)
    with pytest.raises(TabTuneError, match="holds no saved peft run"):
        fit_pipeline("peft", X_train, y_train, model_params={**TINY_MODEL, "adapters": str(tmp_path)})


def test_adapters_are_refused_on_other_base_weights_of_the_same_shape(split, tmp_path):
    """The same architecture is not enough: adapters trained on one checkpoint (or random draw) are refused on
    another, naming both fingerprints; the same base is accepted."""
    from tabtune_cli.models.registry import get_adapter

    X_train, y_train, _, _ = split
    adapter, task = get_adapter("tabicl"), Task("classification", 2)
    module, architecture = adapter.build(adapter.config_class(**TINY_MODEL), task)
    first = adapter.write_checkpoint(module, architecture, task, tmp_path / "a")
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    second = adapter.write_checkpoint(module, architecture, task, tmp_path / "b")
    on_first = {"checkpoint": str(first), "n_estimators": 1}
    source = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT, model_params=on_first).save(tmp_path / "run")
    with pytest.raises(TabTuneError, match=r"model.adapters: .* was trained on other base weights \(.*/a/"):
        fit_pipeline("inference", X_train, y_train, model_params={"checkpoint": str(second), "n_estimators": 1,
                                                                  "adapters": str(source)})
    fit_pipeline("inference", X_train, y_train, model_params={**on_first, "adapters": str(source)})  # same base
    # random weights: another seed draws another base
    random_run = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT).save(tmp_path / "random")
    with pytest.raises(TabTuneError, match="random weights"):
        fit_pipeline("inference", X_train, y_train, seed=SEED + 1,
                     model_params={**TINY_MODEL, "adapters": str(random_run)})
    fit_pipeline("inference", X_train, y_train, model_params={**TINY_MODEL, "adapters": str(random_run)})


def test_adapters_swap_over_one_loaded_base(split, tmp_path):
    X_train, y_train, X_test, _ = split
    a = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT)
    b = fit_pipeline("peft", X_train, y_train, tuning_params={**PEFT, "learning_rate": 1e-2}, peft_config={"r": 2})
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    pipe = TabularPipeline.load(tmp_path / "a")
    base = pipe.module_.get_base_model()
    pipe.load_adapters(tmp_path / "b", "b")
    assert pipe.module_.get_base_model() is base  # the same base module: nothing reloaded
    np.testing.assert_allclose(pipe.predict_proba(X_test), b.predict_proba(X_test), atol=1e-6)
    pipe.use_adapters("default")
    np.testing.assert_allclose(pipe.predict_proba(X_test), a.predict_proba(X_test), atol=1e-6)
    with pytest.raises(TabTuneError, match="no adapters named 'c'"):
        pipe.use_adapters("c")


def test_provenance_names_versions_checkpoint_and_data(split, tmp_path):
    X_train, y_train, _, _ = split
    pipe = TabularPipeline("nano", model_params={"n_estimators": 1}, device="cpu").fit(X_train, y_train)
    meta = json.loads((pipe.save(tmp_path / "p") / "pipeline.json").read_text())["provenance"]
    checkpoint = NanoAdapter().checkpoint_file(pipe.model_config_, pipe.task_)
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["packages"]["torch"] == torch.__version__ and "peft" in meta["packages"]
    other = TabularPipeline("nano", model_params={"n_estimators": 1}, device="cpu")
    other.fit(X_train.iloc[1:], y_train.iloc[1:])
    assert other.provenance_["data_sha256"] != meta["data_sha256"]


def test_the_guides_leaderboard_ranks_and_keeps_failures(split):
    X_train, y_train, X_test, y_test = split
    board = TabularLeaderboard(X_train, X_test, y_train, y_test)
    board.add_model("tabicl", "inference", name="tiny", model_params=TINY_MODEL)
    board.add_model("nosuchmodel", "inference", name="broken")
    board.contenders["LR"] = "logistic_regression"
    results = board.run(rank_by="roc_auc")
    assert list(results["contender"]) == ["LR", "tiny", "broken"] and list(results.index) == [1, 2, 3]
    # each score is the contender's own, as a fit of its own gives it
    alone = fit_pipeline("inference", X_train, y_train).evaluate(X_test, y_test)
    scores = results.set_index("contender")
    assert scores.loc["tiny", "roc_auc"] == pytest.approx(alone["roc_auc"], abs=1e-6)
    assert scores.loc["tiny", "log_loss"] == pytest.approx(alone["log_loss"], abs=1e-6)
    assert scores.loc["LR", "roc_auc"] > scores.loc["tiny", "roc_auc"]  # the ranking follows the scores
    ranking = board.get_ranking()
    broken = ranking.set_index("contender").loc["broken"]
    assert "unknown model 'nosuchmodel'" in broken["error"] and np.isnan(broken["accuracy"])
    assert board.get_ranking("log_loss")["contender"].iloc[-1] == "broken"
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        board.get_ranking("speed")


def test_settings_that_would_be_dropped_are_warned_and_adapters_record_their_own(split, tmp_path, caplog):
    """lora.* beside model.adapters under peft, model.size with a checkpoint, model.allow_download beside
    model.checkpoint: each warned of by name. A run that starts from adapters records the LoRA settings those
    adapters were trained with (pipeline.json, the model card), not the ignored ones."""
    X_train, y_train, _, _ = split
    source = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT,
                          peft_config={"r": 2, "lora_alpha": 4}).save(tmp_path / "first")
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        more = fit_pipeline("peft", X_train, y_train, tuning_params=PEFT, peft_config={"r": "auto", "lora_alpha": 64},
                            model_params={**TINY_MODEL, "adapters": str(source)})
    assert "lora.lora_alpha and lora.r are ignored: model.adapters=" in caplog.text
    assert (more.lora_settings_.r, more.lora_settings_.lora_alpha) == (2, 4)
    saved = json.loads((more.save(tmp_path / "more") / "pipeline.json").read_text())
    assert (saved["peft_config"]["r"], saved["peft_config"]["lora_alpha"]) == (2, 4)
    assert json.loads((tmp_path / "more" / "adapter_config.json").read_text())["r"] == 2
    caplog.clear()
    from tabtune_cli.config import LoraSettings, ModelConfig, StrategyConfig
    from tabtune_cli.strategies import check_combination

    warned = check_combination(ModelConfig(checkpoint="x.ckpt", size="small", allow_download=False),
                               StrategyConfig(name="inference"), LoraSettings(),
                               {"model.size", "model.allow_download", "model.checkpoint"})
    assert warned == ["model.size is ignored with model.pretrained=true: a checkpoint has its own architecture "
                      "(sizes are for random weights)",
                      "model.allow_download is ignored beside model.checkpoint: the local file is used"]
    assert check_combination(ModelConfig(pretrained=False, size="small"), StrategyConfig(name="inference"),
                             LoraSettings(), {"model.size", "model.pretrained"}) == []
