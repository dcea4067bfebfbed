"""``tabtune predict`` and ``tabtune evaluate``: every model and task trained by the CLI predicts, in a fresh
process, what its run wrote at the end of training and evaluates to its own test metrics; each schema mismatch
gets its documented behaviour (``tabtune_cli/data/schema.py``), on the command line and in the library alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tabtune_cli import TabularPipeline
from tabtune_cli.errors import TabTuneError
from tabtune_cli.models.registry import ADAPTERS

from conftest import cli

TABTUNE = [sys.executable, "-m", "tabtune_cli"]
# one torch thread per process: the two training sweeps run side by side on a small machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STRATEGY = {"classification": "peft", "regression": "base-ft"}  # adapters on top of base weights; full weights
TARGET = {"classification": "label", "regression": "value"}
CASES = [(model, task) for task in ("classification", "regression") for model in sorted(ADAPTERS)
         if task in ADAPTERS[model].tasks]
BATCH = """
import json, sys
from tabtune_cli.cli import main
codes = []
for args in json.loads(sys.argv[1]):
    try:
        codes.append(main(args))
    except SystemExit as exc:
        codes.append(exc.code)
print("CODES=" + json.dumps(codes))
"""


def make_table(n: int = 150, seed: int = 0) -> pd.DataFrame:
    """An id (dropped from training), a constant, numbers with gaps, a category, dates; a label and a value."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"id": [f"c{i:04d}" for i in range(n)], "source": "web", "age": rng.normal(40, 10, n).round(),
                          "income": rng.lognormal(10, 1, n), "city": rng.choice(["paris", "lyon", "nice"], n),
                          "score": rng.normal(size=n),
                          "joined": pd.date_range("2020-01-01", periods=n, freq="3D").strftime("%Y-%m-%d")})
    frame.loc[rng.choice(n, 10, replace=False), "income"] = np.nan
    frame["label"] = np.where(frame["score"] + (frame["city"] == "lyon") > 0.3, "yes", "no")
    frame["value"] = frame["score"] * 3 + frame["age"] / 10 + rng.normal(size=n)
    return frame


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """``(model, task) -> run dir``, trained by two CLI sweeps side by side, plus the tables under ``"root"``."""
    root = tmp_path_factory.mktemp("predict")
    frame = make_table()
    sweeps = {}
    for task in ("classification", "regression"):
        (root / task).mkdir()
        frame.drop(columns=TARGET["regression" if task == "classification" else "classification"]).to_csv(
            root / task / "table.csv", index=False)
        models = ",".join(m for m, t in CASES if t == task)
        sweeps[task] = subprocess.Popen(
            [*TABTUNE, "train", "-m", "debug=smoke", f"model={models}", f"strategy={STRATEGY[task]}",
             "dataset.path=table.csv", f"dataset.target={TARGET[task]}", "dataset.drop_columns=[id]"],
            cwd=root / task, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = {"root": root}
    for task, process in sweeps.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        for run_json in (root / task / "runs").rglob("run.json"):
            found[(run_json.parent.name.split("_")[1], task)] = run_json.parent
    assert set(CASES) <= set(found)
    return found


def rows_file(runs, model: str, task: str) -> Path:
    """The run's own test rows, target included, as a Parquet file (written once)."""
    path = runs["root"] / "rows" / f"{model}_{task}.parquet"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        saved = pd.read_parquet(runs[(model, task)] / "predictions.parquet")
        table = pd.read_csv(runs["root"] / task / "table.csv")
        table.loc[saved["row"].astype(int)].to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def replayed(runs) -> dict:
    """Every run's ``predict`` and ``evaluate`` on its test rows, in one fresh process (not the training one)."""
    out = runs["root"] / "out"
    out.mkdir()
    batch = []
    for model, task in CASES:
        rows, run_dir = rows_file(runs, model, task), runs[(model, task)]
        batch.append(["predict", f"run={run_dir}", f"data={rows}", f"output={out / f'{model}_{task}.parquet'}"])
        batch.append(["evaluate", f"run={run_dir}", f"data={rows}", f"output={out / f'{model}_{task}.json'}"])
    # the installed entry point too, in its own process: CSV output, an id column, default arguments otherwise
    nano = rows_file(runs, "nano", "classification")
    console = subprocess.Popen([*TABTUNE, "predict", f"run={runs[('nano', 'classification')]}", f"data={nano}",
                                f"output={out / 'nano.csv'}", "id=id"], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    result = subprocess.run([sys.executable, "-c", BATCH, json.dumps(batch)], env=ENV, capture_output=True,
                            text=True, timeout=600)
    console_out, console_err = console.communicate(timeout=600)
    codes = json.loads(result.stdout.rsplit("CODES=", 1)[1]) if "CODES=" in result.stdout else None
    assert codes == [0] * len(batch), result.stderr[-3000:]
    assert console.returncode == 0, console_err
    return {"out": out, "stdout": result.stdout, "stderr": result.stderr,
            "console": (console_out, console_err)}


@pytest.mark.parametrize("model,task", CASES)
def test_predict_in_a_fresh_process_matches_what_training_wrote(model, task, runs, replayed):
    saved = pd.read_parquet(runs[(model, task)] / "predictions.parquet")
    new = pd.read_parquet(replayed["out"] / f"{model}_{task}.parquet")
    assert list(new.columns) == [c for c in saved.columns if c not in ("row", "target")]
    assert len(new) == len(saved)
    if task == "classification":
        assert list(new["prediction"]) == list(saved["prediction"])
        proba = [c for c in new.columns if c.startswith("proba_")]
        assert len(proba) == 2
        np.testing.assert_allclose(new[proba].to_numpy(), saved[proba].to_numpy(), rtol=0, atol=1e-6)
    else:
        np.testing.assert_allclose(new["prediction"].to_numpy(), saved["prediction"].to_numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,task", CASES)
def test_evaluate_in_a_fresh_process_matches_the_run_test_metrics(model, task, runs, replayed):
    written = json.loads((replayed["out"] / f"{model}_{task}.json").read_text())
    expected = json.loads((runs[(model, task)] / "metrics.json").read_text())["test"]
    assert written["target"] == TARGET[task] and written["task"] == task
    assert written["rows"] == len(pd.read_parquet(runs[(model, task)] / "predictions.parquet"))
    assert set(written["metrics"]) == set(expected)
    for name, value in expected.items():
        assert written["metrics"][name] == (None if value is None else pytest.approx(value, rel=1e-6, abs=1e-6)), name


def test_the_target_column_in_the_table_is_ignored_quietly(replayed):
    # every replayed table held its target column: dropped without a warning
    assert "tabtune: warning" not in replayed["stderr"]
    assert "accuracy" in replayed["stdout"] and "rmse" in replayed["stdout"]


def test_the_console_command_writes_csv_with_the_id_column(runs, replayed):
    out, err = replayed["console"]
    saved = pd.read_parquet(runs[("nano", "classification")] / "predictions.parquet")
    rows = pd.read_parquet(rows_file(runs, "nano", "classification"))
    new = pd.read_csv(replayed["out"] / "nano.csv")
    assert list(new.columns) == ["id", "prediction", "proba_no", "proba_yes"]
    assert list(new["id"]) == list(rows["id"])  # left out of training (drop_columns), kept here
    assert list(new["prediction"]) == list(saved["prediction"])
    np.testing.assert_allclose(new[["proba_no", "proba_yes"]], saved[["proba_no", "proba_yes"]], rtol=0, atol=1e-6)
    assert f"{len(rows)} rows" in out and "nano.csv" in out and "predicted" in out
    assert "tabtune: warning" not in err


# ---- the schema check ---------------------------------------------------------------------------

def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tabtune: error: "), err
    return lines[0]


def predict_frame(capsys, runs, model, frame, tmp_path, *extra) -> tuple[int, str, pd.DataFrame | None]:
    """Predict ``frame`` (written as CSV, as the training table was) with the classification run of ``model``."""
    data = tmp_path / f"{model}_{len(list(tmp_path.iterdir()))}.csv"
    frame.to_csv(data, index=False)
    out = data.with_suffix(".out.parquet")
    code, _, err = cli(capsys, "predict", f"run={runs[(model, 'classification')]}", f"data={data}",
                       f"output={out}", *extra)
    return code, err, pd.read_parquet(out) if code == 0 else None


def saved_predictions(runs, model) -> pd.DataFrame:
    saved = pd.read_parquet(runs[(model, "classification")] / "predictions.parquet")
    return saved.drop(columns=["row", "target"])


def rows_of(runs, model) -> pd.DataFrame:
    return pd.read_parquet(rows_file(runs, model, "classification"))


@pytest.mark.parametrize("model", ["tabicl", "contexttab"])  # the shared preprocessor; ContextTab's own
def test_reordered_columns_are_realigned_by_name(model, runs, capsys, tmp_path):
    rows = rows_of(runs, model)
    code, err, new = predict_frame(capsys, runs, model, rows[list(reversed(rows.columns))], tmp_path)
    assert code == 0, err
    pd.testing.assert_frame_equal(new, saved_predictions(runs, model), atol=1e-6, rtol=0)
    assert "tabtune: warning" not in err


def test_extra_columns_are_ignored_with_a_warning_naming_them(runs, capsys, tmp_path):
    rows = rows_of(runs, "tabicl").assign(weather="rain", notes=1.0)
    code, err, new = predict_frame(capsys, runs, "tabicl", rows, tmp_path)
    assert code == 0, err
    assert "tabtune: warning: ignoring 2 column(s) the model was not trained with: 'weather', 'notes'" in err
    pd.testing.assert_frame_equal(new, saved_predictions(runs, "tabicl"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model", ["tabicl", "contexttab"])
def test_missing_columns_are_an_error_naming_them(model, runs, capsys, tmp_path):
    code, err, _ = predict_frame(capsys, runs, model, rows_of(runs, model).drop(columns=["age", "city"]), tmp_path)
    assert "the table lacks 2 column(s) the model was trained with: 'age', 'city'" in one_line_error(code, err)


@pytest.mark.parametrize("model", ["tabicl", "contexttab"])
def test_a_column_the_preprocessor_dropped_may_be_missing(model, runs, capsys, tmp_path):
    # 'source' was constant in training: both preprocessors dropped it, so a table without it loses nothing
    code, err, new = predict_frame(capsys, runs, model, rows_of(runs, model).drop(columns="source"), tmp_path)
    assert code == 0, err
    pd.testing.assert_frame_equal(new, saved_predictions(runs, model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model,column,value,message", [
    (model, "age", "forty", "column 'age' was numeric in training but 1 of its values are not numbers (e.g. 'forty')")
    for model in ("tabicl", "contexttab")] + [
    # ContextTab reads a column of date strings as text, as its estimator does: any string is a value of it
    ("tabicl", "joined", "someday", "column 'joined' held dates in training but 1 of its values are not dates "
                                    "(e.g. 'someday')"),
    ("tabicl", "joined", "17", "column 'joined' held dates in training but 1 of its values are not dates (e.g. '17')"),
])
def test_a_changed_column_type_is_an_error_naming_column_and_value(model, column, value, message, runs, capsys,
                                                                   tmp_path):
    rows = rows_of(runs, model).astype({column: object})
    rows.loc[rows.index[3], column] = value
    code, err, _ = predict_frame(capsys, runs, model, rows, tmp_path)
    assert message in one_line_error(code, err)


def test_contexttab_reads_date_strings_as_text_so_another_string_is_a_value(runs, capsys, tmp_path):
    rows = rows_of(runs, "contexttab").astype({"joined": object})
    rows.loc[rows.index[3], "joined"] = "someday"
    code, err, new = predict_frame(capsys, runs, "contexttab", rows, tmp_path)
    assert code == 0, err
    saved = saved_predictions(runs, "contexttab")
    others = new.index != new.index[3]  # ContextTab's queries never see each other: the other rows keep their answers
    pd.testing.assert_frame_equal(new[others], saved[others], atol=1e-6, rtol=0)


def test_numbers_as_text_and_missing_values_are_accepted(runs, capsys, tmp_path):
    rows = rows_of(runs, "tabicl")
    as_text = rows.astype({"age": str, "income": object})
    as_text.loc[as_text.index[0], "income"] = None
    expected = rows.copy()
    expected.loc[expected.index[0], "income"] = np.nan
    pipeline = TabularPipeline.load(runs[("tabicl", "classification")])
    np.testing.assert_allclose(pipeline.predict_proba(as_text), pipeline.predict_proba(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", ["tabicl", "nano"])  # category codes; one-hot levels
def test_unseen_categories_read_as_unknown_like_a_missing_value_with_a_warning(model, runs, capsys, tmp_path):
    rows = rows_of(runs, model)
    unseen = rows.assign(city=["berlin", "rome"] * (len(rows) // 2) + ["berlin"] * (len(rows) % 2))
    code, err, new = predict_frame(capsys, runs, model, unseen, tmp_path)
    assert code == 0, err
    assert (f"tabtune: warning: column 'city': {len(rows)} value(s) not seen in training (e.g. 'berlin') "
            f"are read as unknown, like a missing value") in err
    code, err, missing = predict_frame(capsys, runs, model, rows.assign(city=None), tmp_path)
    assert code == 0 and "tabtune: warning" not in err
    pd.testing.assert_frame_equal(new, missing)
    assert not new.equals(saved_predictions(runs, model))  # the column matters: the check is not vacuous


def test_contexttab_reads_unseen_strings_as_text(runs, capsys, tmp_path):
    rows = rows_of(runs, "contexttab").assign(city="berlin")
    code, err, new = predict_frame(capsys, runs, "contexttab", rows, tmp_path)
    assert code == 0 and "tabtune: warning" not in err and len(new) == len(rows)


def test_the_library_path_makes_the_same_checks(runs, caplog):
    pipeline = TabularPipeline.load(runs[("tabicl", "classification")])
    rows = rows_of(runs, "tabicl").drop(columns=["label", "id"])
    with pytest.raises(TabTuneError, match=r"the table lacks 1 column\(s\) the model was trained with: 'score'"):
        pipeline.predict(rows.drop(columns="score"))
    with pytest.raises(TabTuneError, match="column 'age' was numeric in training .* \\(e.g. 'n/a!'\\)"):
        pipeline.predict(rows.astype({"age": object}).assign(age="n/a!"))
    with pytest.raises(TabTuneError, match="more than one column named 'age'"):
        pipeline.predict(pd.concat([rows, rows[["age"]]], axis=1))
    with pytest.raises(TabTuneError, match="an array of shape \\(30, 3\\) has no column names"):
        pipeline.predict(np.zeros((30, 3)))
    expected = pipeline.predict_proba(rows)
    with caplog.at_level("WARNING", logger="tabtune"):
        shuffled = rows[list(reversed(rows.columns))].assign(extra=1)
        np.testing.assert_allclose(pipeline.predict_proba(shuffled), expected, rtol=0, atol=1e-6)
    assert "ignoring 1 column(s) the model was not trained with: 'extra'" in caplog.text
    # without names, an array is read in the training column order
    np.testing.assert_allclose(pipeline.predict_proba(rows.to_numpy()), expected, rtol=0, atol=1e-6)


# ---- arguments, run directories, outputs -------------------------------------------------------------

def test_bad_arguments_are_one_line_errors(runs, capsys):
    run = f"run={runs[('nano', 'classification')]}"
    data = f"data={rows_file(runs, 'nano', 'classification')}"
    cases = [
        (["predict", run, data, "colour=red"],
         "tabtune predict: unknown key 'colour' (known keys: run, data, output, id, overwrite, device)"),
        (["evaluate", run, data, "id=x"],
         "tabtune evaluate: unknown key 'id' (known keys: run, data, target, output, overwrite, device)"),
        (["predict", data], "tabtune predict: run= is required"),
        (["predict", run, data, "overwrite=maybe"], "overwrite must be true or false, got 'maybe'"),
        (["predict", run, data, "output=out/x.xlsx"], "unsupported file type '.xlsx' (use .parquet or .pq or .csv)"),
        (["predict", run, data, "id=customer"], "id column 'customer' not found"),
        (["predict", run, "data=nope.csv"], "nope.csv: no such file"),
        (["evaluate", run, data, "target=nope"], "target column 'nope' not found"),
    ]
    for args, message in cases:
        assert message in one_line_error(*cli(capsys, *args)[::2]), args


def test_an_unfinished_or_foreign_folder_is_refused(runs, capsys, tmp_path):
    data = f"data={rows_file(runs, 'nano', 'classification')}"
    failed = shutil.copytree(runs[("nano", "classification")], tmp_path / "failed")
    (failed / "run.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    bare = tmp_path / "bare"
    bare.mkdir()
    cases = [(failed, f"{failed}: the run is not complete (run.json says 'failed')"),
             (bare, f"{bare}: not a run directory or saved pipeline (pipeline.json is missing)"),
             (tmp_path / "absent", f"run={tmp_path / 'absent'}: no such run directory")]
    for command in ("predict", "evaluate"):
        for run_dir, message in cases:
            assert message in one_line_error(*cli(capsys, command, f"run={run_dir}", data)[::2])


def test_outputs_default_beside_the_data_and_are_never_overwritten_silently(runs, capsys, tmp_path):
    rows = tmp_path / "new rows.csv"
    rows_of(runs, "nano").to_csv(rows, index=False)
    run = f"run={runs[('nano', 'classification')]}"
    for command, default in (("predict", "new rows.predictions.parquet"), ("evaluate", "new rows.metrics.json")):
        code, _, err = cli(capsys, command, run, f"data={rows}")
        assert code == 0 and (tmp_path / default).is_file(), err
        assert "already exists (pass overwrite=true" in one_line_error(*cli(capsys, command, run, f"data={rows}")[::2])
        (tmp_path / default).write_text("stale")
        assert cli(capsys, command, run, f"data={rows}", "overwrite=true")[0] == 0
        assert (tmp_path / default).read_bytes() != b"stale"
    assert not list(tmp_path.glob(".*partial"))
    metrics = json.loads((tmp_path / "new rows.metrics.json").read_text())
    assert metrics["rows"] == len(rows_of(runs, "nano")) and "roc_auc" in metrics["metrics"]


def test_evaluate_takes_another_target_name_and_refuses_unseen_labels(runs, capsys, tmp_path):
    run_dir = runs[("tabicl", "classification")]
    rows = rows_of(runs, "tabicl").rename(columns={"label": "truth"})
    data = tmp_path / "renamed.parquet"
    rows.to_parquet(data, index=False)
    code, _, err = cli(capsys, "evaluate", f"run={run_dir}", f"data={data}", "target=truth")
    assert code == 0, err
    written = json.loads((tmp_path / "renamed.metrics.json").read_text())["metrics"]
    assert written["accuracy"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"])
    rows.loc[rows.index[0], "truth"] = "maybe"
    rows.to_parquet(data, index=False)
    code, _, err = cli(capsys, "evaluate", f"run={run_dir}", f"data={data}", "target=truth",
                         f"output={tmp_path / 'x.json'}")
    assert "label 'maybe' was not seen in training" in one_line_error(code, err)
