"""Untrusted files let nothing in: no pickle runs, no path escapes a saved pipeline's folder, nothing
is fetched unless downloads are allowed."""

from __future__ import annotations

import json
import pickle
import socket

import pytest
from safetensors.torch import save_file

from tabtune_cli import TabTuneError, TabularPipeline
from tabtune_cli.models.base import Task
from tabtune_cli.models.registry import ADAPTERS

from conftest import Bomb, TINY_MODEL, make_table


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_crafted_pickle_as_model_checkpoint_is_refused_unrun(name, suffix, tmp_path):
    adapter = ADAPTERS[name]()
    marker = tmp_path / "executed"
    path = tmp_path / f"evil{suffix}"
    checkpoint = path
    if name == "mitra":  # a checkpoint folder: a real config.json beside the crafted weights
        module, architecture = adapter.build(adapter.config_class(**TINY_MODEL), Task("classification", 2))
        checkpoint = adapter.write_checkpoint(module, architecture, Task("classification", 2), tmp_path / "evil")
        path = checkpoint.parent / "model.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": Bomb(marker), "config": Bomb(marker)}))
    config = adapter.config_class(name=name, checkpoint=str(checkpoint), pretrained=True)
    with pytest.raises(TabTuneError) as info:
        adapter.build(config, Task("classification", 2))
    assert path.name in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["tensor", "file"])
def test_a_packed_pipeline_cannot_write_outside_its_folder(tmp_path, entry):
    import torch

    path = tmp_path / "evil.joblib"
    tensors = {"context.safetensors/X": torch.zeros(1)}
    metadata = {"format": "tabtune-pipeline", "version": "1"}
    if entry == "tensor":
        tensors["../escaped.safetensors/x"] = torch.zeros(1)
    else:
        metadata["file:../escaped.json"] = "{}"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(TabTuneError, match="names a file '\.\."):
        TabularPipeline.load(path)
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("escaped*"))


def test_a_swapped_base_checkpoint_is_refused(tmp_path):
    """A pipeline over an official checkpoint keeps its SHA-256: another file at that path is not used."""
    X, y = make_table(120)
    adapter = ADAPTERS["tabicl"]()
    module, architecture = adapter.build(adapter.config_class(**TINY_MODEL), Task("classification", 2))
    first = adapter.write_checkpoint(module, architecture, Task("classification", 2), tmp_path / "a")
    pipe = TabularPipeline("tabicl", model_params={"checkpoint": str(first), "n_estimators": 1}, device="cpu")
    saved = pipe.fit(X, y).save(tmp_path / "saved")
    assert json.loads((saved / "pipeline.json").read_text())["base_weights"] == "checkpoint"
    TabularPipeline.load(saved)  # the same file: fine
    other, _ = adapter.build(adapter.config_class(**{**TINY_MODEL}), Task("classification", 2))
    for p in other.parameters():
        p.data.add_(0.5)
    adapter.write_checkpoint(other, architecture, Task("classification", 2), tmp_path / "b")
    (tmp_path / "b" / first.name).replace(first)
    with pytest.raises(TabTuneError, match="is not the file it was trained on"):
        TabularPipeline.load(saved)


def test_nothing_reaches_the_network_when_downloads_are_off(monkeypatch):
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    X, y = make_table(120)
    X["note"] = [f"a free text note about row {i % 17} with several words" for i in range(len(X))]
    for name in ("nano", "contexttab"):  # the shipped nano weights; ContextTab's sentence encoder
        params = {"n_estimators": 1} if name == "nano" else TINY_MODEL
        TabularPipeline(name, model_params=params, device="cpu").fit(X, y).predict(X.iloc[:5])
    with pytest.raises(TabTuneError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
        TabularPipeline("tabicl", device="cpu").fit(X, y)  # the suite runs with HF_HUB_OFFLINE=1 (conftest)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(TabTuneError, match="model.allow_download=false keeps to the cache"):
        TabularPipeline("tabicl", model_params={"allow_download": False}, device="cpu").fit(X, y)
    assert attempts == []
