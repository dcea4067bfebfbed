"""Parity at defaults: with no setting, tabtune's zero-shot ContextTab answers as the reference wrapper does.

``tests/parity/ref_contexttab_defaults.py`` (the parity environment) wrote a random-weight checkpoint in the
official format and ``ConTextTabClassifier()``'s probabilities at its defaults on a raw table: numbers on
scales from 1 to 1e4 with gaps, outliers and an infinity, a short categorical text column, a yes/no column
and dates (3,000 training rows, all of them context), and a narrow table of 9,000 training rows, past the
8,192-row context both sample. Here the same tables go through ``TabularPipeline`` given only the checkpoint.
Two defaults of the wrapper are tabtune's too: the context's classes under the wrapper's ids (by count, then
shuffled with seed 42; with sorted ids these random weights answer up to 5.0e-1 and 3.4e-1 apart) and, past
8,192 training rows, its draw ``sample(8192, random_state=42)`` (a stratified draw instead: 4.8e-4 apart).

A column of date strings (``"2021-03-04"``, as a CSV gives dates) is text to both: the wrapper's tokenizer takes
dates from date dtypes only and embeds every other string (the ``date-strings`` case: the ``mixed`` table plus
such a column; while tabtune read such a column as dates, the two differed by 1.1e-1 on these weights).
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from tabtune_cli import TabularPipeline

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("contexttab-defaults-*/io.safetensors"))
TOLERANCE = 1e-4

pytestmark = pytest.mark.parity


def tables(io: Path):
    """(X_train, y_train, X_test, reference probabilities, classes, checkpoint) of a case folder."""
    with safe_open(io, "np") as f:
        numbers, proba = f.get_tensor("numbers"), f.get_tensor("proba")
        meta = f.metadata()
    n_train = int(meta["n_train"])
    numeric, integer = json.loads(meta["numeric"]), set(json.loads(meta["integer"]))
    columns = {c: numbers[:, i].astype("int64" if c in integer else "float64") for i, c in enumerate(numeric)}
    for name, spec in json.loads(meta["other"]).items():
        values = spec["values"]  # None where the reference's cell was missing (NaN, NaT)
        if spec["kind"] == "date":
            columns[name] = pd.to_datetime(pd.Series(values, dtype=object)).astype("datetime64[ns]").to_numpy()
        elif spec["kind"] == "bool":
            columns[name] = np.array(values, dtype=bool)
        else:
            columns[name] = np.array([np.nan if v is None else v for v in values], dtype=object)
    X = pd.DataFrame({c: columns[c] for c in json.loads(meta["columns"])})
    y = pd.Series(json.loads(meta["labels"]), name=meta["target"])
    return (X.iloc[:n_train].reset_index(drop=True), y.iloc[:n_train].reset_index(drop=True),
            X.iloc[n_train:].reset_index(drop=True), proba, json.loads(meta["classes"]), io.parent / meta["checkpoint"])


@pytest.mark.skipif(not CASES, reason=f"no reference answers under {ROOT} (run tests/parity/ref_contexttab_defaults.py)")
@pytest.mark.parametrize("io", [pytest.param(p, id=p.parent.name) for p in CASES])
def test_no_setting_gives_the_reference_wrappers_answers(io):
    torch.set_num_threads(1)
    X_train, y_train, X_test, reference, classes, checkpoint = tables(io)
    pipe = TabularPipeline(model_name="contexttab", tuning_strategy="inference", device="cpu",
                           tuning_params={"show_progress": False}, model_params={"checkpoint": str(checkpoint)})
    pipe.fit(X_train, y_train)
    assert list(pipe.classes_) == classes
    ours = pipe.predict_proba(X_test)
    diff = float(np.abs(ours - reference).max())
    n_context = min(len(y_train), pipe.model_config_.max_context_rows)
    print(f"{io.parent.name}: {len(y_train):,} training rows ({n_context:,} as context), {len(X_test):,} queries, "
          f"{X_train.shape[1]} columns, max |tabtune - reference wrapper| = {diff:.2e} "
          f"(answers spread over {np.ptp(reference, axis=0).max():.3f})")
    assert diff <= TOLERANCE
