"""Parity at defaults: with no setting, tabtune's OrionMSP and OrionBix answer as their reference wrappers do.

``tests/parity/ref_orion_defaults.py`` (the parity environment) wrote a random-weight checkpoint per model and
``OrionMSPClassifier()`` / ``OrionBixClassifier()``'s probabilities on a raw numeric table of 3,000 training
rows. Here the same table goes through ``TabularPipeline`` given only the checkpoint: every training row as
context, the wrappers' 32 members on the numbers as given (``models/orion_members.py``).
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from tabtune_cli import TabularPipeline

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
CASES = sorted(ROOT.glob("orion-defaults-*/io.safetensors"))
TOLERANCE = 1e-4

pytestmark = pytest.mark.parity


@pytest.mark.skipif(not CASES, reason=f"no reference answers under {ROOT} (run tests/parity/ref_orion_defaults.py)")
@pytest.mark.parametrize("io", CASES, ids=[p.parent.name for p in CASES])
def test_no_setting_gives_the_reference_wrappers_answers(io):
    with safe_open(io, "np") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
        checkpoint = io.parent / f.metadata()["checkpoint"]
    model = io.parent.name.removeprefix("orion-defaults-")
    columns = [f"x{i}" for i in range(data["X_train"].shape[1])]
    pipe = TabularPipeline(model_name=model, tuning_strategy="inference", device="cpu",
                           tuning_params={"show_progress": False}, model_params={"checkpoint": str(checkpoint)})
    pipe.fit(pd.DataFrame(data["X_train"], columns=columns), pd.Series(data["y_train"], name="label"))
    assert len(pipe.context_y_) == len(data["y_train"])  # every training row is context
    ours = pipe.predict_proba(pd.DataFrame(data["X_test"], columns=columns))
    diff = float(np.abs(ours - data["proba"]).max())
    print(f"{model}: {len(data['y_train']):,} context rows, 32 members, max |tabtune - reference wrapper| = "
          f"{diff:.2e} (answers spread over {np.ptp(data['proba'][:, 0]):.3f})")
    if "proba_batch_size_1" in data:
        print(f"  the wrapper itself at batch_size=1 instead of its default 8: max |difference| = "
              f"{np.abs(data['proba_batch_size_1'] - data['proba']).max():.2e}")
    assert diff <= TOLERANCE
