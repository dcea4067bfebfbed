"""Data-parallel fine-tuning: two gloo processes under torchrun train exactly as one process with the same batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli import TabTuneError
from tabtune_cli.tuning.distributed import micro_batch_seed, shard

from conftest import TINY_MODEL, TUNE_PARAMS, fit_pipeline, make_table

# SGD: Adam's per-element normalisation would turn float-rounding differences of near-zero gradients
# (one batched forward of 2 episodes vs two forwards of 1) into visible ones; the sums are the same
PARAMS = {**TUNE_PARAMS["base-ft"], "epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "optimizer": "sgd",
          "learning_rate": 0.05, "early_stopping_patience": None}

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from conftest import make_table
from tabtune_cli import TabularPipeline
torch.set_num_threads(1)
X, y = make_table()
for name, strategy, peft in (("base-ft", "base-ft", None), ("peft", "peft", {peft!r})):
    records = []
    pipe = TabularPipeline(model_name="tabicl", tuning_strategy=strategy, tuning_params={params!r},
                           model_params={model!r}, peft_config=peft, device="cpu",
                           seed=0).fit(X.iloc[:240], y.iloc[:240], on_record=records.append)
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == 2
    assert (len(records) > 0) == (rank == 0), records  # only rank 0 records
    assert str(pipe.device_) == "cpu"
    if rank == 0:
        save_file({{k: v.contiguous() for k, v in pipe.module_.state_dict().items()}}, {out!r} + name)
"""
# LoRA dropout on in the peft run: each rank must draw its own masks, and the same ones one process draws
# for the same episodes
PEFT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3}


def test_two_gloo_processes_train_as_one_process_with_the_same_batch_dropout_included(tmp_path):
    out = tmp_path / "rank0-"
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), params=PARAMS, model=TINY_MODEL,
                                    peft=PEFT, out=str(out)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    X, y = make_table()
    start = fit_pipeline("inference", X.iloc[:240], y.iloc[:240])

    # no dropout: two ranks of one episode each = one process's batch of two, up to float rounding
    two = load_file(f"{out}base-ft")
    one = fit_pipeline("base-ft", X.iloc[:240], y.iloc[:240], tuning_params=dict(PARAMS))
    assert one.train_result_.best_epoch > 0  # the weights moved: equality below is not of two copies of the start
    diffs = {k: (v - two[k]).abs().max().item() for k, v in one.module_.state_dict().items()}
    assert max(diffs.values()) < 1e-5, max(diffs.items(), key=lambda kv: kv[1])
    moved = max((v - start.module_.state_dict()[k]).abs().max().item() for k, v in two.items())
    assert moved > 1e-3
    half = fit_pipeline("base-ft", X.iloc[:240], y.iloc[:240], tuning_params={**PARAMS, "batch_size": 1})
    # ... and not what one process sees with one rank's share only: the ranks did combine their gradients
    assert max((v - two[k]).abs().max().item() for k, v in half.module_.state_dict().items()) > 1e-4

    # LoRA dropout: rank r's forward draws the masks of micro-batch r, so two ranks = one process feeding the
    # same episodes one at a time with two accumulation steps, masks and all
    two = load_file(f"{out}peft")
    accumulated = {**PARAMS, "batch_size": 1, "gradient_accumulation_steps": 2}
    one = fit_pipeline("peft", X.iloc[:240], y.iloc[:240], tuning_params=accumulated, peft_config=PEFT)
    lora_weights = [k for k in two if "lora_" in k]
    assert lora_weights and one.train_result_.best_epoch > 0
    state = one.module_.state_dict()
    assert max((state[k] - two[k]).abs().max().item() for k in two) < 1e-5
    # the masks mattered (without dropout the adapters end elsewhere), so the equality above is the masks'
    plain = fit_pipeline("peft", X.iloc[:240], y.iloc[:240], tuning_params=accumulated,
                         peft_config={**PEFT, "lora_dropout": 0.0})
    assert max((plain.module_.state_dict()[k] - two[k]).abs().max().item() for k in lora_weights) > 1e-4


def test_each_rank_shares_a_contiguous_slice_and_draws_its_own_masks():
    assert shard([0, 1, 2, 3], 1, 2) == [2, 3]
    with pytest.raises(TabTuneError, match=r"strategy.batch_size=3 must be a multiple of the 2 processes"):
        shard([0, 1, 2], 0, 2)
    # rank r of R at batch b is micro-batch b * R + r: distinct seeds for distinct episodes, the same for the same
    seeds = {micro_batch_seed(0, epoch, b * 2 + r) for epoch in (1, 2) for b in range(3) for r in range(2)}
    assert len(seeds) == 12
    assert micro_batch_seed(0, 1, 3) == micro_batch_seed(0, 1, 3) != micro_batch_seed(1, 1, 3)


def test_each_rank_runs_on_its_own_gpu_and_collectives_use_the_group_device(monkeypatch):
    """What can be checked without a GPU: LOCAL_RANK picks the CUDA device (made current), NCCL's collectives
    get tensors on it, gloo's on the CPU, and a rank beyond the machine's GPUs is refused in one line."""
    import torch.distributed as dist

    from tabtune_cli.tuning import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1].index)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for name in ("auto", "cuda"):
        assert distributed.device(name) == torch.device("cuda", 1) == chosen[-1]
    assert distributed.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TabTuneError, match="LOCAL_RANK=2: this machine has 2 CUDA device"):
        distributed.device("auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.device("auto") == torch.device("cuda")  # one process: the current GPU, as before


def test_collectives_run_in_a_gloo_group(tmp_path):
    """any_rank and average_gradients on a one-process gloo group: the tensors they make are the group's."""
    import torch.distributed as dist

    from tabtune_cli.tuning import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.any_rank(True) and not distributed.any_rank(False)
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        a.grad = torch.full((3,), 4.0)
        distributed.average_gradients([a, b], 2)
        assert torch.equal(a.grad, torch.full((3,), 2.0)) and b.grad is None
    finally:
        dist.destroy_process_group()


def test_resume_under_torchrun_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from conftest import cli

    from tabtune_cli import rundir

    run_dir = rundir.create(tmp_path / "runs" / "r")  # an interrupted run: its manifest and config
    (run_dir / "config.yaml").write_text("seed: 0\n")
    rundir.finish(run_dir, "interrupted", error="interrupted")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(capsys, "train", f"resume={run_dir}")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("tabtune: error: resume= under torchrun (2 processes)") and str(run_dir) in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
