"""tabtune pretrain: reproducible from its config, resumable, and its weights are the model's official checkpoint
(nano's safetensors, TabICL's container that tabicl's own estimators load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tabtune_cli.models.nano import read_checkpoint
from tabtune_cli.tuning import checkpoint

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "prior.tables_per_step=4",
        "prior.tables_per_group=2", "prior.min_rows=null", "prior.max_rows=48", "prior.max_features=6",
        "checkpoint_every=1", "eval_every=1000", "show_progress=false", "threads=1", "prior_workers=0", "prior.type=mlp_scm"]


def run_pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``tabtune pretrain ARGS`` in a fresh process, no tracking tables."""
    return subprocess.run([sys.executable, "-m", "tabtune_cli", "pretrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TABTUNE_EVAL_TABLES": str(cwd / "none")})


def pretrain(out: Path, steps: int, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_pretrain(cwd, *TINY, f"steps={steps}", f"out_dir={out}", *extra)
    assert result.returncode == 0, result.stderr
    return result


def history(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "history.jsonl").read_text().splitlines()]


def test_pretraining_is_reproducible_and_resumes_where_it_stopped(tmp_path):
    short_schedule = ["warmup_steps=1", "scheduler=linear"]  # the learning rate moves every step
    pretrain(tmp_path / "a", 4, tmp_path, *short_schedule)
    stopped = pretrain(tmp_path / "b", 4, tmp_path, *short_schedule, "stop_at=2")  # the same run, stopped ...
    assert "pretrained to step 2" in stopped.stdout
    resumed = pretrain(tmp_path / "b", 4, tmp_path, *short_schedule)  # ... and started again
    assert "resumed from" in resumed.stdout + resumed.stderr
    # the schedule follows `steps`, not where a part stopped
    assert history(tmp_path / "a", "lr") == pytest.approx(history(tmp_path / "b", "lr")) == [0.0005 * f for f in
                                                                                              (1, 2 / 3, 1 / 3, 0)]
    first, second = history(tmp_path / "a", "loss"), history(tmp_path / "b", "loss")
    assert len(first) == len(second) == 4
    assert first[:2] == second[:2]  # same seed, same first losses
    assert first[2:] == pytest.approx(second[2:], rel=1e-5)  # the resumed run continues the same run
    assert len(set(first)) == 4  # the losses move: a test that compares constants would prove nothing
    saved = checkpoint.latest(tmp_path / "b" / "checkpoints")  # fine-tuning's checkpoint, one only
    assert saved.name == "step-00000004" and [p.name for p in saved.parent.iterdir()] == [saved.name]
    assert json.loads((saved / "state.json").read_text())["step"] == 4
    architecture, weights = read_checkpoint(tmp_path / "b" / "weights" / "nano.safetensors")
    assert architecture["d_model"] == 16 and weights  # loadable by the nano adapter as it is


def test_a_misspelled_pretrain_key_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tabtune_cli", "pretrain", "stepz=3"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == \
        "tabtune: error: config key 'stepz': Key 'stepz' not in 'PretrainConfig'"


def test_prior_min_rows_lets_each_step_draw_its_table_length(tmp_path):
    from dataclasses import asdict

    from tabtune_cli.config import PretrainConfig
    from tabtune_cli.tuning.pretrain import PriorStream

    cfg = asdict(PretrainConfig())
    cfg["prior"].update(type="mlp_scm", tables_per_step=2, tables_per_group=2, max_features=4)
    fixed = {**cfg, "prior": {**cfg["prior"], "max_rows": 64}}
    # tabicl's sampler leaves out its upper end: unset, every table has max_rows - 1 rows
    assert {batch[0].shape[1] for batch in PriorStream(fixed, 0, 4)} == {63}
    varied = {**cfg, "prior": {**cfg["prior"], "min_rows": 32, "max_rows": 96}}
    lengths = [batch[0].shape[1] for batch in PriorStream(varied, 0, 6)]
    assert all(32 <= n < 96 for n in lengths) and len(set(lengths)) > 2, lengths
    assert [batch[0].shape[1] for batch in PriorStream(varied, 3, 6)] == lengths[3:]  # a resumed run draws the same


def test_prior_min_rows_above_max_rows_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tabtune_cli", "pretrain", "prior.max_rows=256", "prior.min_rows=300",
                             f"out_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "TABTUNE_EVAL_TABLES": str(tmp_path / "none")})
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "tabtune: error: prior.min_rows: must be at least 2 and below prior.max_rows (256), got 300")
    assert not (tmp_path / "run" / "checkpoints").exists()


TINY_TABICL = ["model=tabicl", "model.embed_dim=8", "model.col_num_blocks=1", "model.col_nhead=2",
               "model.col_num_inds=4", "model.row_num_blocks=1", "model.row_nhead=2", "model.row_num_cls=2",
               "model.icl_num_blocks=1", "model.icl_nhead=2", *TINY[4:]]


def test_pretraining_tabicl_writes_a_checkpoint_that_tabicls_own_estimators_load(tmp_path):
    import numpy as np
    import torch
    from sklearn.datasets import make_classification
    from tabicl import FinetunedTabICLClassifier, TabICLClassifier

    from tabtune_cli import TabularPipeline
    from tabtune_cli.models.tabicl import TabICLAdapter

    out = tmp_path / "tabicl"
    result = run_pretrain(tmp_path, *TINY_TABICL, "steps=3", "warmup_steps=1", f"out_dir={out}")
    assert result.returncode == 0, result.stderr
    path = out / "weights" / "tabicl-classifier-v2-20260212.ckpt"
    assert f"weights: {path}" in result.stdout
    assert len(set(history(out, "loss"))) == 3  # it trained
    saved = torch.load(path, weights_only=True)  # TabICL's container: {config, state_dict}, tensors only
    assert saved["config"]["embed_dim"] == 8 and saved["config"]["max_classes"] == 10
    state = json.loads((checkpoint.latest(out / "checkpoints") / "state.json").read_text())
    assert state["model"] == "tabicl" and state["architecture"] == saved["config"]
    torch.manual_seed(0)  # the run's seed: its random start, which three steps must have moved
    start = TabICLAdapter().from_architecture(saved["config"]).state_dict()
    assert any(not torch.equal(saved["state_dict"][k], start[k]) for k in start)

    X, y = make_classification(240, 5, n_informative=3, random_state=0)
    package = TabICLClassifier(model_path=str(path), device="cpu", allow_auto_download=False).fit(X[:160], y[:160])
    ours = TabularPipeline(model_name="tabicl", model_params={"checkpoint": str(path)}, device="cpu",
                           tuning_params={"show_progress": False}).fit(X[:160], y[:160])
    np.testing.assert_allclose(ours.predict_proba(X[160:]), package.predict_proba(X[160:]), atol=1e-5)
    tuned = FinetunedTabICLClassifier(model_path=str(path), allow_auto_download=False, device="cpu", epochs=1,
                                      amp=False, n_estimators_inference=2).fit(X[:160], y[:160])
    assert np.allclose(tuned.predict_proba(X[160:]).sum(1), 1.0)


def test_a_run_folder_of_another_architecture_or_model_is_refused(tmp_path):
    pretrain(tmp_path / "run", 1, tmp_path)  # nano, d_model 16
    for args, message in (([*TINY, "model.d_model=32"], "holds a run of another architecture (model.d_model: 16 there, 32 "
                                                  "asked); match it or choose another out_dir"),
                          (TINY_TABICL, "holds a pretraining run of nano, not tabicl; choose another out_dir")):
        result = run_pretrain(tmp_path, *args, "steps=2", f"out_dir={tmp_path / 'run'}")
        assert result.returncode == 2
        assert result.stderr.strip().endswith(f"tabtune: error: {tmp_path / 'run'} {message}")
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step-00000001"  # the run is untouched


@pytest.mark.parametrize("override,message", [
    ("model=tabpfn", "unknown model 'tabpfn' (available: nano, tabicl)"),
    ("model.embed_dimm=3", "config key 'model.embed_dimm': Key 'embed_dimm' is not in struct"),
])
def test_a_model_tabtune_cannot_pretrain_or_a_misspelled_architecture_key_is_one_line(tmp_path, override,
                                                                                        message):
    result = subprocess.run([sys.executable, "-m", "tabtune_cli", "pretrain", "model=tabicl", override],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == f"tabtune: error: {message}"


def test_the_training_forward_on_prior_tables_is_the_adapters_and_a_model_without_one_is_refused():
    import torch

    from tabtune_cli.errors import TabTuneError
    from tabtune_cli.models.base import Task
    from tabtune_cli.models.registry import get_adapter

    torch.manual_seed(0)
    X, y = torch.randn(2, 20, 4), torch.randint(0, 3, (2, 20)).float()
    nano = get_adapter("nano")
    module = nano.from_architecture({"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32})
    out = nano.pretrain_logits(module, X, y[:, :12], torch.tensor([4, 3]))
    # nano's forward on the same split: context rows 0-11, query rows 12-19, each table's real columns
    expected = module(X[:, :12], y[:, :12], X[:, 12:], n_features=torch.tensor([4, 3]))
    assert torch.equal(out, expected) and out.shape == (2, 8, 10)
    loss = nano.episode_loss(out, y[:, 12:].long(), Task("classification", 10))
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.reshape(-1, 10),
                                                                          y[:, 12:].long().reshape(-1)).item())
    with pytest.raises(TabTuneError, match=r"^tabtune cannot pretrain TabPFN \(no training forward on prior tables\)$"):
        get_adapter("tabpfn").pretrain_logits(None, X, y[:, :12], torch.tensor([4, 3]))
