"""Official TabICL checkpoints in, saved pipelines out: loading, refusing bad files, save/load round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tabicl._model.tabicl import TabICL

from tabtune_cli import TabTuneError
from tabtune_cli.models.tabicl import TabICLAdapter

from conftest import SEED
from tabicl_engine import CPU, TabularPipeline, changed_keys, initial_module


# ---- 3a. official checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": 10, "zero_init": False}
    torch.manual_seed(123)
    model = TabICL(**architecture)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tabicl-tiny.ckpt"
    torch.save({"config": architecture, "state_dict": model.state_dict()}, path)
    return path, architecture, {k: v.clone() for k, v in model.state_dict().items()}


def test_official_checkpoint_loads_and_predicts_like_the_official_model(official_checkpoint, split):
    path, architecture, state = official_checkpoint
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    assert pipe.architecture_ == architecture
    assert changed_keys(pipe.module_.state_dict(), state) == []

    # TabICL's own estimator on the same file and the same numbers (its members' recipe, its softmax)
    from tabicl import TabICLClassifier

    official = TabICLClassifier(n_estimators=1, softmax_temperature=pipe.model_config_.softmax_temperature,
                                model_path=str(path), allow_auto_download=False, device="cpu")
    expected = official.fit(pipe.context_X_, pipe.context_y_).predict_proba(pipe.preprocessor_.transform(X_test))
    got = pipe.predict_proba(X_test)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got[:, 1]) > 1e-3  # not a constant output: the comparison has teeth


def test_checkpoint_pipeline_save_load_reads_the_checkpoint_again(official_checkpoint, split, tmp_path):
    path, _, _ = official_checkpoint
    X_train, y_train, X_test, _ = split
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "pretrained": True, "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    pipe.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "pipeline.json").read_text())
    assert meta["base_weights"] == "checkpoint" and not (tmp_path / "saved" / "model.safetensors").exists()
    np.testing.assert_array_equal(TabularPipeline.load(tmp_path / "saved").predict_proba(X_test),
                                  pipe.predict_proba(X_test))


def test_saving_over_an_earlier_save_does_not_mix_weights(official_checkpoint, fitted, split, tmp_path):
    path, _, _ = official_checkpoint
    X_train, y_train, X_test, _ = split
    folder = tmp_path / "model"
    fitted["base-ft"].save(folder)
    pipe = TabularPipeline(model_params={"checkpoint": str(path), "n_estimators": 1},
                           tuning_params={"show_progress": False}, device="cpu", seed=SEED).fit(X_train, y_train)
    pipe.save(folder)
    np.testing.assert_array_equal(TabularPipeline.load(folder).predict_proba(X_test), pipe.predict_proba(X_test))


def test_checkpoint_without_config_is_refused_naming_the_file(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "weights-only.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(TabTuneError, match="config") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_checkpoint_that_is_not_a_torch_file_is_refused_naming_the_file(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(TabTuneError, match="not a TabICL checkpoint") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_missing_checkpoint_file_is_named(tmp_path, split):
    X_train, y_train, _, _ = split
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(TabTuneError, match="no such file") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_regression_checkpoint_for_a_classification_task_is_refused(tmp_path, split):
    X_train, y_train, _, _ = split
    architecture = {**TabICLAdapter.sizes["tiny"], "max_classes": 0}
    path = tmp_path / "regressor.ckpt"
    torch.save({"config": architecture, "state_dict": TabICL(**architecture).state_dict()}, path)
    with pytest.raises(TabTuneError, match="regression checkpoint") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused(tmp_path, split):
    X_train, y_train, _, _ = split
    tiny = {**TabICLAdapter.sizes["tiny"], "max_classes": 10}
    path = tmp_path / "mismatch.ckpt"
    torch.save({"config": {**tiny, "embed_dim": 32}, "state_dict": TabICL(**tiny).state_dict()}, path)
    with pytest.raises(TabTuneError, match="do not match") as err:
        TabularPipeline(model_params={"checkpoint": str(path)}, device="cpu").fit(X_train, y_train)
    assert str(path) in str(err.value)


# ---- 3b/3c. save and load ------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["inference", "base-ft", "peft"])
def test_save_load_round_trip_gives_identical_probabilities(fitted, split, tmp_path, strategy):
    _, _, X_test, y_test = split
    pipe = fitted[strategy]
    folder = pipe.save(tmp_path / strategy)
    loaded = TabularPipeline.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), pipe.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.predict(X_test), pipe.predict(X_test))
    assert list(loaded.classes_) == list(pipe.classes_)
    assert loaded.evaluate(X_test, y_test)["log_loss"] == pipe.evaluate(X_test, y_test)["log_loss"]
    assert loaded.tuning_strategy == strategy




@pytest.mark.parametrize("strategy", ["inference", "base-ft",
                                      "peft"])
def test_a_loaded_pipeline_saves_and_loads_again_unchanged(fitted, split, tmp_path, strategy):
    _, _, X_test, _ = split
    pipe = fitted[strategy]
    once = TabularPipeline.load(pipe.save(tmp_path / "once"))
    twice = TabularPipeline.load(once.save(tmp_path / "twice"))
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == \
        sorted(p.name for p in (tmp_path / "once").iterdir())
    np.testing.assert_array_equal(twice.predict_proba(X_test), pipe.predict_proba(X_test))


@pytest.mark.parametrize("strategy", ["inference", "base-ft", "peft"])
def test_saved_folder_holds_no_pickle(fitted, tmp_path, strategy):
    folder = fitted[strategy].save(tmp_path / strategy)
    files = sorted(p.name for p in Path(folder).rglob("*") if p.is_file())
    allowed = [f for f in files if f.endswith((".json", ".safetensors")) or (strategy == "peft" and f == "README.md")]
    assert files == allowed, f"unexpected files: {sorted(set(files) - set(allowed))}"
    assert "pipeline.json" in files and "preprocessor.json" in files and "context.safetensors" in files
    if strategy == "peft":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    for name in files:
        data = (Path(folder) / name).read_bytes()
        assert not data.startswith(b"PK"), f"{name} is a zip (torch.save format)"
        if name.endswith(".safetensors"):
            # safetensors: 8-byte little-endian header length, then a JSON header; nothing executable
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            assert header and all("dtype" in v for k, v in header.items() if k != "__metadata__")
            assert load_file(Path(folder) / name)
    for name in (f for f in files if f.endswith(".json")):
        json.loads((Path(folder) / name).read_text())  # plain JSON, nothing else


def test_load_of_a_folder_without_pipeline_json_names_it(tmp_path):
    with pytest.raises(TabTuneError, match="pipeline.json") as err:
        TabularPipeline.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_peft_adapters_load_with_peft_own_loader(fitted, split, tmp_path):
    _, _, X_test, _ = split
    pipe = fitted["peft"]
    folder = pipe.save(tmp_path / "peft")
    meta = json.loads((folder / "pipeline.json").read_text())
    adapter = TabICLAdapter()
    base = adapter.from_architecture(meta["architecture"])
    base.load_state_dict(load_file(folder / "model.safetensors"))
    Xq = pipe.preprocessor_.transform(X_test)
    args = (pipe.context_X_, pipe.context_y_, Xq, pipe.task_, pipe.model_config_, CPU)
    without_adapters = adapter.predict(base, *args)

    restored = PeftModel.from_pretrained(base, str(folder))
    got = adapter.predict(restored, *args)
    np.testing.assert_allclose(got, adapter.predict(pipe.module_, *args), atol=1e-6)
    np.testing.assert_allclose(got, pipe.predict_proba(X_test), atol=1e-6)
    # the adapters matter: without them the outputs are those of the untrained start
    assert np.abs(got - without_adapters).max() > 1e-3
    np.testing.assert_allclose(without_adapters, adapter.predict(initial_module(pipe), *args), atol=1e-6)
