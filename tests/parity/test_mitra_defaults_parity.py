"""Parity at defaults: with no setting, tabtune's zero-shot Mitra answers as AutoGluon's wrapper does.

``tests/parity/ref_mitra_defaults.py`` (AutoGluon's environment) wrote a random-weight checkpoint per task and
the answers of ``MitraClassifier(fine_tune=False, device="cpu", hf_model=<folder>)`` / ``MitraRegressor(...)``
(zero-shot, every other setting the wrapper's own) on a raw numeric table of 3,000 training rows. Here the same
table goes through ``TabularPipeline`` given only the checkpoint.

Three of the wrapper's default choices are not imitated, each measured here on its own (wrapper against
wrapper): its bfloat16 autocast, which on CPU runs the whole forward in bfloat16 (tabtune computes in float32);
its preprocessing statistics (the gap means; for regression the target's min and max) taken from an 80% split of
the training rows while every row is support (tabtune takes them from the support); and its one member's random
feature signs and (regression) random target mirror, drawn from NumPy's global state, so that two fits can
disagree (tabtune's member 0 takes the table as given). With those undone in the wrapper, tabtune's default
answers are the wrapper's within 1e-4; given the wrapper's drawn signs (and target mirror), tabtune's answers are
the wrapper's float32 ones on all rows' statistics within 1e-4 too. Regression values are compared in units of
the training target's range (the scale the model predicts on): float32 and the wrapper's random order of the
support rows alone move values of a few hundred by about 1e-3.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from tabtune_cli import TabularPipeline

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("mitra-defaults-*/io.safetensors"))
TOLERANCE = 1e-4

pytestmark = pytest.mark.parity


def tabtune_answers(folder: Path, task: str, X_train, y_train, X_test) -> np.ndarray:
    columns = [f"x{i}" for i in range(X_train.shape[1])]
    pipe = TabularPipeline(model_name="mitra", tuning_strategy="inference", task_type=task, device="cpu",
                           tuning_params={"show_progress": False}, model_params={"checkpoint": str(folder)})
    pipe.fit(pd.DataFrame(X_train, columns=columns), pd.Series(y_train, name="label"))
    assert len(pipe.context_y_) == len(y_train)  # every training row is support, as in the wrapper's predict
    test = pd.DataFrame(X_test, columns=columns)
    return pipe.predict_proba(test) if task == "classification" else pipe.predict(test)


def biggest(a, b, scale: float = 1.0) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale


@pytest.mark.skipif(not CASES, reason=f"no reference answers under {ROOT} (run tests/parity/ref_mitra_defaults.py)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_no_setting_gives_the_zero_shot_wrappers_answers(io):
    torch.set_num_threads(1)
    with safe_open(io, "np") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
        task = f.metadata()["task"]
    X_train, y_train, X_test = ref["X_train"], ref["y_train"], ref["X_test"]
    regression = task == "regression"
    scale = float(np.ptp(y_train)) if regression else 1.0
    unit = " (in target ranges)" if regression else ""
    ours = tabtune_answers(io.parent, task, X_train, y_train, X_test)
    spread = np.ptp(ref["answer"], axis=0).max()
    print(f"\n{io.parent.name}: {len(y_train):,} support rows, answers spread over {spread:.3g}"
          + (f", target range {scale:.1f}" if regression else ""))
    print(f"  max |tabtune default - wrapper default|{unit} = {biggest(ours, ref['answer'], scale):.2e}")
    print("  the wrapper's own choices, each alone (wrapper against wrapper):")
    print(f"    bfloat16 autocast on CPU vs float32 = {biggest(ref['answer'], ref['answer_fp32'], scale):.2e}")
    split = biggest(ref["answer_fp32"], ref["answer_fp32_allrows"], scale)
    if regression:
        print(f"    statistics of the 80% split (gap means, target [{float(ref['y_min']):.2f}, "
              f"{float(ref['y_max']):.2f}]) vs all rows' ([{y_train.min():.2f}, {y_train.max():.2f}]) = {split:.2e}")
    else:
        print(f"    statistics of the 80% split (gap means) vs all rows' = {split:.2e}")
    mirrors = biggest(ref["answer_fp32_allrows"], ref["answer_fp32_allrows_unmirrored"], scale)
    print(f"    random signs {ref['mirror'].astype(int).tolist()}"
          + (f", target mirror {bool(ref['regression_mirror'])}" if regression else "") + f" vs none = {mirrors:.2e}")
    diff = biggest(ours, ref["answer_fp32_allrows_unmirrored"], scale)
    print(f"  max |tabtune default - wrapper with those undone|{unit} = {diff:.2e}")
    # given the wrapper's signs (a mirrored target is the negated target, its answers negated back), tabtune gives
    # the wrapper's float32 answers on all rows' statistics
    flip = -1.0 if regression and bool(ref["regression_mirror"]) else 1.0
    signed = flip * tabtune_answers(io.parent, task, X_train * ref["mirror"], flip * y_train, X_test * ref["mirror"])
    signed_diff = biggest(signed, ref["answer_fp32_allrows"], scale)
    print(f"  max |tabtune given the wrapper's signs - wrapper float32, all rows' statistics|{unit} = "
          f"{signed_diff:.2e}")
    assert diff <= TOLERANCE and signed_diff <= TOLERANCE
