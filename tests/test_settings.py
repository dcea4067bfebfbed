"""Random settings, as a new user would type them: each run completes, or stops with one line naming the key and
exit 2, before any run directory exists. Never a traceback, never Hydra's error screen.

Tables are property-tested in test_messy_tables.py; this file draws the settings (seeds, sizes, ranks, column
lists, splits, paths, threads) on a small valid table, through the command line in this process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import cli

COLUMNS = ["a", "b", "c", "label"]
SMALL = ["debug=smoke", "model=nano", "strategy.show_progress=false"]


def write_table(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 80
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 4, n), "c": rng.choice(["x", "y"], n),
                          "label": np.where(np.arange(n) % 3 == 0, "yes", "no")})
    path = folder / "table.csv"
    frame.to_csv(path, index=False)
    return path


# each key with values a user might type: mostly good ones, then edge and wrong ones, so that runs complete too
def values(good: list, bad: list):
    return st.sampled_from(good * 3 + bad)


SETTINGS = {
    "seed": values([0, 1, 7, 2**32 - 1], [-1, 2**32, -(2**40)]),
    "threads": values([None, 1, 2], [0, -1]),
    "dataset.max_rows": values([None, 40, 10**6], [-1, 0, 1]),
    "dataset.test_size": values([None, 0.2, 0.5], [-0.1, 0.0, 1.0, 2.0, 0.01]),
    "dataset.val_size": values([0.0, 0.1, 0.3], [-0.5, 1.0, 0.99]),
    "dataset.drop_columns": values([[], ["a"], ["b", "c"]], [["label"], ["nope"], ["a", "b", "c"]]),
    "dataset.text_columns": values([None, [], ["c"]], [["label"], ["nope"]]),
    "dataset.path": values(["table.csv"], ["missing.csv", ".", "table.txt"]),
    "strategy": values(["inference", "base-ft", "peft", "context"], []),
    "strategy.batch_size": values([1, 2, 3], [0, -1]),
    "strategy.context_size": values([2, 16, 10**5], [0, -1]),
    "strategy.query_size": values([1, 8, 10**5], [0, -1]),
    "strategy.steps_per_epoch": values(["null", 1, 2], [0]),
    "lora.r": values([1, 4, "auto"], [0, -1, 2.5, "many"]),
    "model.n_estimators": values([1, 2], [0, -1]),
    "model.max_context_rows": values([1, 3, 50, 10**6], [0, -5]),
    "model.softmax_temperature": values([0.5, 1.0], [0.0, -1.0]),
}
# each draw sets a few keys, as a person does
DRAWS = st.lists(st.sampled_from(sorted(SETTINGS)), min_size=1, max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: SETTINGS[k] for k in keys}))


def as_override(key: str, value) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, list):
        return f"{key}=[{','.join(value)}]"
    return f"{key}={value}"


def test_random_settings_complete_or_stop_in_one_line_naming_the_key(capsys, monkeypatch, tmp_path):
    outcomes: list[str] = []

    # no shrinking: a failing draw is short already, and shrinking one run at a time takes minutes
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(drawn=DRAWS)
    def run(drawn):
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        write_table(folder)
        (folder / "table.txt").write_text("a,b\n1,2\n")
        monkeypatch.chdir(folder)
        overrides = [as_override(k, v) for k, v in drawn.items()]
        if "dataset.path" not in drawn:
            overrides.append("dataset.path=table.csv")
        code, out, err = cli(capsys, "train", *SMALL, "dataset.target=label", *overrides)
        assert "Traceback" not in out + err and "Error executing job" not in out + err, (overrides, err[-2000:])
        if code == 0:
            (run_json,) = (folder / "runs").rglob("run.json")
            assert '"status": "complete"' in run_json.read_text()
            outcomes.append("completed")
            return
        assert code == 2, (overrides, code, err[-2000:])
        # one line says what is wrong; lines before it may warn of keys this combination ignores
        *warnings, line = err.strip().splitlines()
        assert line.startswith("tabtune: error: "), (overrides, err)
        assert all(w.startswith("tabtune: warning: ") for w in warnings), (overrides, err)
        assert not list(folder.rglob("run.json")), (overrides, line)  # refused before a run directory
        outcomes.append(line.split(":")[2].split("=")[0].strip()[:30])

    threads = torch.get_num_threads()
    try:
        run()
    finally:  # a drawn threads=N sets torch's threads for this process: the tests after this one keep theirs
        torch.set_num_threads(threads)
    # the property held over both kinds of draw: runs that completed and many distinct refusals
    assert outcomes.count("completed") >= 8, outcomes
    assert len(set(outcomes) - {"completed"}) >= 6, outcomes


@pytest.mark.parametrize("override,culprit", [
    ("seed=-1", "seed=-1: a seed is a whole number from 0 to 4294967295"),
    ("seed=4294967296", "seed=4294967296"),
    ("dataset.drop_columns=[label]", "dataset.drop_columns names the target 'label'"),
    ("threads=0", "threads=0: at least 1"),
    ("model.n_estimators=0", "model.n_estimators must be at least 1"),
    ("model.max_context_rows=0", "model.max_context_rows must be at least 1"),
    ("model.softmax_temperature=0", "model.softmax_temperature must be positive"),
])
def test_the_inputs_a_user_reported_fail_in_one_line_naming_the_key(override, culprit, tmp_path, capsys,
                                                                     monkeypatch):
    write_table(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", *SMALL, "dataset.path=table.csv", "dataset.target=label", override)
    assert code == 2 and "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("tabtune: error: ") and culprit in line, line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("run.json"))


def test_torchrun_settings_that_cannot_shard_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    write_table(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    common = ["train", *SMALL, "dataset.path=table.csv", "dataset.target=label", "strategy=peft"]
    code, _, err = cli(capsys, *common, "strategy.batch_size=3", "strategy.steps_per_epoch=2")
    assert code == 2 and "strategy.batch_size=3 must be a multiple of the 2 processes" in err
    code, _, err = cli(capsys, *common, "strategy.batch_size=2", "strategy.steps_per_epoch=null")
    assert code == 2 and "strategy.steps_per_epoch=null" in err and "torchrun" in err
    assert not (tmp_path / "runs").exists()
