"""Interrupted fine-tuning resumes to the uninterrupted result; divergence keeps the best weights so far.

The engine tests interrupt a fit from inside (an ``on_record`` that raises mid-epoch, as Ctrl-C
would) and resume it on the same checkpoint folder; the CLI test kills a real ``tabtune train``
process (SIGKILL: no chance to mark anything) and one with SIGTERM, then resumes with
``tabtune train resume=<run dir>``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tabtune_cli import TabTuneError, rundir
from tabtune_cli.tuning import checkpoint

from conftest import TUNE_PARAMS, fit_pipeline

# 4 epochs of 3 steps; LoRA dropout on, so the resumed run must also restore torch's RNG to match
PARAMS = {"base-ft": {**TUNE_PARAMS["base-ft"], "epochs": 4, "steps_per_epoch": 3, "early_stopping_patience": None},
          "peft": {**TUNE_PARAMS["peft"], "epochs": 4, "steps_per_epoch": 3, "early_stopping_patience": None}}
PEFT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.2}


class Stop(KeyboardInterrupt):
    pass


def stop_in_epoch(epoch: int, records: list):
    """An on_record that keeps the records and interrupts at the first step of ``epoch``."""
    def on_record(entry):
        records.append(entry)
        if entry["epoch"] == epoch and "loss" in entry:
            raise Stop
    return on_record


def tiny_pipeline(strategy: str, params: dict):
    from tabtune_cli import TabularPipeline

    return TabularPipeline(model_name="tabicl", tuning_strategy=strategy, tuning_params=params,
                           peft_config=PEFT if strategy == "peft" else None, device="cpu", seed=0,
                           model_params={"pretrained": False, "size": "tiny", "n_estimators": 1})


@pytest.mark.parametrize("strategy", ["base-ft", "peft"])
def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(strategy, split, tmp_path):
    X_train, y_train, X_test, _ = split
    whole = fit_pipeline(strategy, X_train, y_train, tuning_params=PARAMS[strategy],
                         peft_config=PEFT if strategy == "peft" else None)
    before = []
    with pytest.raises(Stop):
        tiny_pipeline(strategy, PARAMS[strategy]).fit(X_train, y_train, on_record=stop_in_epoch(3, before),
                                                      checkpoint_dir=tmp_path)
    saved = checkpoint.latest(tmp_path)
    assert saved.name == "epoch-0002" and [p.name for p in tmp_path.iterdir()] == ["epoch-0002"]
    torch.manual_seed(12345)  # whatever the global RNG did in between, the checkpoint restores it
    again = []
    resumed = tiny_pipeline(strategy, PARAMS[strategy]).fit(X_train, y_train, on_record=again.append,
                                                            checkpoint_dir=tmp_path)
    r = resumed.train_result_
    assert r.resumed_after == 2 and r.steps == 12 and r.epochs_run == 4
    assert again == whole.train_result_.history  # the checkpoint's history replayed, then the same epochs 3 and 4
    assert [h["loss"] for h in before if "loss" in h][:6] == [h["loss"] for h in again if "loss" in h][:6]
    losses = [h["loss"] for h in again if "loss" in h]
    assert len(set(losses)) == len(losses)  # the loss moves: equal histories are not equal constants
    for (name, a), (_, b) in zip(whole.module_.state_dict().items(), resumed.module_.state_dict().items()):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(whole.predict_proba(X_test), resumed.predict_proba(X_test))


def test_a_checkpoint_resumes_only_the_training_that_made_it(split, tmp_path):
    X_train, y_train, _, _ = split
    with pytest.raises(Stop):
        tiny_pipeline("base-ft", PARAMS["base-ft"]).fit(X_train, y_train, on_record=stop_in_epoch(2, []),
                                                        checkpoint_dir=tmp_path)
    other = {**PARAMS["base-ft"], "learning_rate": 5e-4}
    with pytest.raises(TabTuneError, match=r"made by another training \(strategy.learning_rate: 0.001 there, "
                                           r"0.0005 now\)"):
        tiny_pipeline("base-ft", other).fit(X_train, y_train, checkpoint_dir=tmp_path)


def test_checkpoints_are_whole_or_absent(tmp_path):
    weights = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(weights.parameters(), lr=0.1)
    weights(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, "epoch-0001", tensors={"trainable": dict(weights.named_parameters())},
                    optimizer=optimizer, state={"epoch": 1})
    (tmp_path / ".epoch-0002.abc.partial").mkdir()  # a save killed midway: never taken for a checkpoint
    (tmp_path / ".epoch-0002.abc.partial" / "trainable.safetensors").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "epoch-0001"
    path = checkpoint.save(tmp_path, "epoch-0002", tensors={"trainable": dict(weights.named_parameters())},
                           optimizer=optimizer, state={"epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0002"]  # the older one and the stale partial gone
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    tensors, state = checkpoint.load(path, optimizer=fresh)
    assert state["epoch"] == 2 and torch.equal(tensors["trainable"]["weight"], weights.weight)
    moments = fresh.state_dict()["state"][0]
    assert torch.equal(moments["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert all(not p.name.endswith((".pt", ".pkl", ".bin")) for p in path.iterdir())  # safetensors and JSON


def test_divergence_stops_training_and_keeps_the_best_weights_so_far(split, monkeypatch):
    from tabtune_cli import pipeline as pipeline_module

    X_train, y_train, X_test, _ = split
    trained = {}

    def spy(adapter, module, *args, **kwargs):
        trained["module"] = module
        return train(adapter, module, *args, **kwargs)

    def poison(entry):  # after epoch 2's first step a weight turns non-finite: the next loss is NaN
        if entry["epoch"] == 2 and entry.get("step") == 4 and "loss" in entry:
            with torch.no_grad():
                next(p for p in trained["module"].parameters() if p.requires_grad).fill_(float("nan"))

    train = pipeline_module.train
    monkeypatch.setattr(pipeline_module, "train", spy)
    pipe = tiny_pipeline("base-ft", PARAMS["base-ft"]).fit(X_train, y_train, on_record=poison)
    r = pipe.train_result_
    assert r.stopped.startswith("training diverged at epoch 2, step 5 (loss nan): stopped there, keeping the "
                                f"best weights so far (epoch {r.best_epoch})")
    assert r.best_epoch in (0, 1) and r.epochs_run == 2 and r.steps == 4
    assert all(torch.isfinite(p).all() for p in pipe.module_.parameters())
    proba = pipe.predict_proba(X_test)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1.0)
    assert pipe.summary()["training"]["stopped"] == r.stopped


# ---- the command line ------------------------------------------------------------------------

TRAIN = [sys.executable, "-m", "tabtune_cli", "train", "debug=smoke", "model=tabicl", "strategy=base-ft",
         "strategy.epochs=4", "strategy.steps_per_epoch=3", "strategy.early_stopping_patience=null",
         "dataset=breast_cancer"]


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN[:4], *(args or [*TRAIN[4:], f"hydra.run.dir={tmp_path / name}"])], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, epoch: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        saved = checkpoint.latest(run_dir / "checkpoints")
        if saved is not None and int(saved.name.split("-")[1]) >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} appeared: {process.communicate()[1][-2000:]}")


def test_killed_and_interrupted_runs_resume_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    whole = start(tmp_path, "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    run = tmp_path / "run"

    # killed outright (SIGKILL: nothing can be marked): the run still says running, never complete
    killed = start(tmp_path, "run")
    wait_for_checkpoint(run, killed, 1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "metrics.json").exists() and not rundir.is_complete(run)

    # resumed, then stopped by SIGTERM (a scheduler's stop): marked interrupted, its checkpoint whole
    resumed = start(tmp_path, "run", f"resume={run}")
    wait_for_checkpoint(run, resumed, 2)
    resumed.send_signal(signal.SIGTERM)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, err
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "interrupted" and f"tabtune train resume={run}" in manifest["error"]
    assert f"tabtune train resume={run}" in err and "Traceback" not in err
    saved = checkpoint.latest(run / "checkpoints")
    assert json.loads((saved / "state.json").read_text())["epoch"] in (2, 3) and not (run / "metrics.json").exists()
    assert {p.name for p in saved.iterdir()} == {"trainable.safetensors", "best.safetensors", "optimizer.safetensors",
                                                 "rng.safetensors", "state.json"}
    extra = subprocess.run([*TRAIN[:4], f"resume={run}", "strategy.epochs=9"], cwd=tmp_path, capture_output=True,
                           text=True)  # a run resumes with its own config: nothing else on the command line
    assert extra.returncode == 2 and "takes no other arguments" in extra.stderr

    # resumed again, to the end: the same metrics, predictions and history as the uninterrupted run
    final = subprocess.run([*TRAIN[:4], f"resume={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert rundir.is_complete(run) and len(json.loads((run / "run.json").read_text())["resumed"]) == 2
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", run))
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["training"] == b["training"]
    assert a["training"]["steps"] == 12
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / "predictions.parquet"),
                                  pd.read_parquet(run / "predictions.parquet"))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history == [json.loads(line) for line in (tmp_path / "whole" / "history.jsonl").read_text().splitlines()]
    assert len({h["loss"] for h in history if "loss" in h}) == 12  # a moving loss: equal histories mean something
    assert not (run / "checkpoints").exists()  # only for resuming: gone once complete

    again = subprocess.run([*TRAIN[:4], f"resume={run}"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip() == f"tabtune: error: resume: {run} is complete; there is nothing to resume"
