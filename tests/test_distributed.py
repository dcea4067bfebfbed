"""Data-parallel fine-tuning: two gloo processes under torchrun train exactly as one process with the same batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tabtune_cli import TabTuneError
from tabtune_cli.tuning.distributed import shard

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
records = []
pipe = TabularPipeline(model_name="tabicl", tuning_strategy="base-ft", tuning_params={params!r},
                       model_params={model!r}, device="cpu", seed=0).fit(X.iloc[:240], y.iloc[:240],
                                                                         on_record=records.append)
rank = torch.distributed.get_rank()
assert torch.distributed.get_world_size() == 2
assert (len(records) > 0) == (rank == 0), records  # only rank 0 records
if rank == 0:
    save_file({{k: v.contiguous() for k, v in pipe.module_.state_dict().items()}}, {out!r})
"""


def test_two_gloo_processes_train_as_one_process_with_the_same_batch(tmp_path):
    out = tmp_path / "rank0.safetensors"
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), params=PARAMS, model=TINY_MODEL, out=str(out)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = load_file(out)

    X, y = make_table()
    one = fit_pipeline("base-ft", X.iloc[:240], y.iloc[:240], tuning_params=dict(PARAMS))
    start = fit_pipeline("inference", X.iloc[:240], y.iloc[:240])
    assert one.train_result_.best_epoch > 0  # the weights moved: equality below is not of two copies of the start
    diffs = {k: (v - two[k]).abs().max().item() for k, v in one.module_.state_dict().items()}
    assert max(diffs.values()) < 1e-5, max(diffs.items(), key=lambda kv: kv[1])
    moved = max((v - start.module_.state_dict()[k]).abs().max().item() for k, v in two.items())
    assert moved > 1e-3

    half = fit_pipeline("base-ft", X.iloc[:240], y.iloc[:240], tuning_params={**PARAMS, "batch_size": 1})
    # ... and not what one process sees with one rank's share only: the ranks did combine their gradients
    assert max((v - two[k]).abs().max().item() for k, v in half.module_.state_dict().items()) > 1e-4


def test_a_batch_the_ranks_cannot_share_evenly_is_refused():
    assert shard([0, 1, 2, 3], 1, 2) == [1, 3]
    with pytest.raises(TabTuneError, match=r"strategy.batch_size=3 must be a multiple of the 2 processes"):
        shard([0, 1, 2], 0, 2)
    assert torch.distributed.is_available()
