"""Messy tables: each case is a one-line error naming the file, column, key or value, or an automatic
treatment that is logged and recorded in the run's manifest; the command line (``load_dataset``) and the
library (``TabularPipeline.fit``) say the same thing through the same checks (``data.checks``).

Then property-based tests (hypothesis): random small tables of random dtypes, gaps and sizes either fit and
predict with a tiny random-weight nano, or fail with a TabTuneError: never another exception.
"""

from __future__ import annotations

from collections import Counter

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sklearn.model_selection import train_test_split

from tabtune_cli import TabularPipeline
from tabtune_cli.commands.train import plain_configs, preflight
from tabtune_cli.config import DatasetConfig
from tabtune_cli.data import checks
from tabtune_cli.data.checks import check_table
from tabtune_cli.data.dataset import load_dataset
from tabtune_cli.data.io import read_table
from tabtune_cli.data.preprocess import Preprocessor
from tabtune_cli.errors import TabTuneError
from tabtune_cli.commands.hydra_conf import compose_train

torch.set_num_threads(1)

TINY_NANO = {"pretrained": False, "size": "tiny", "n_estimators": 1}
QUICK_FT = {"epochs": 1, "context_size": 16, "query_size": 8, "batch_size": 1, "show_progress": False}


def nano(strategy: str = "inference", **kwargs) -> TabularPipeline:
    params = dict(QUICK_FT) if strategy != "inference" else {"show_progress": False}
    return TabularPipeline("nano", tuning_strategy=strategy, tuning_params=params, model_params=dict(TINY_NANO),
                           device="cpu", **kwargs)


def base_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 5, n),
                         "label": np.where(np.arange(n) % 2, "x", "y")})


def load(path, **cfg):
    return load_dataset(DatasetConfig(path=str(path), target="label", **cfg), 0)


def recorded(data, case: str) -> list[str]:
    return [t["message"] for t in data.source["treatments"] if t["case"] == case]


def library_error(frame: pd.DataFrame) -> str:
    with pytest.raises(TabTuneError) as err:
        nano().fit(frame.drop(columns="label"), frame["label"])
    return str(err.value)


# ---- one check, two paths: errors -------------------------------------------------------------

def test_a_repeated_column_name_is_refused_as_the_header_has_it(tmp_path):
    # pandas' CSV reader alone renames the second 'a' to 'a.1' and carries on
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a,label\n" + "".join(f"{i},{i % 3},{-i},{'xy'[i % 2]}\n" for i in range(30)))
    with pytest.raises(TabTuneError) as cli:
        load(path)
    assert str(cli.value) == (f"{path}: the column name 'a' appears 2 times (columns 1, 3); "
                              f"rename or drop the extra ones")
    table = pa.table({"a": list(range(30)), "b": [i % 3 for i in range(30)], "label": ["x", "y"] * 15})
    pq.write_table(table.rename_columns(["a", "a", "label"]), tmp_path / "dup.parquet")
    with pytest.raises(TabTuneError, match=r"dup.parquet: the column name 'a' appears 2 times \(columns 1, 2\)"):
        load(tmp_path / "dup.parquet")
    frame = pd.read_csv(path).set_axis(["a", "b", "a", "label"], axis=1)  # what the file really says
    assert library_error(frame) == str(cli.value).replace(str(path), "X")


def test_nested_parquet_columns_are_refused_by_name_and_can_be_dropped(tmp_path):
    n = 30
    pq.write_table(pa.table({"a": [float(i) for i in range(n)], "tags": [[i, i + 1] for i in range(n)],
                             "meta": [{"k": i} for i in range(n)], "label": ["x", "y"] * (n // 2)}),
                   tmp_path / "nested.parquet")
    with pytest.raises(TabTuneError) as cli:  # before: a TypeError traceback from deep inside pandas
        load(tmp_path / "nested.parquet")
    assert str(cli.value).startswith(f"{tmp_path / 'nested.parquet'}: column(s) 'tags', 'meta' hold lists")
    data = load(tmp_path / "nested.parquet", drop_columns=["tags", "meta"])
    assert list(data.train.columns) == ["a", "label"]
    frame = pd.read_parquet(tmp_path / "nested.parquet")
    assert library_error(frame) == str(cli.value).replace(str(tmp_path / "nested.parquet"), "X")


def test_an_infinite_target_is_refused(tmp_path):
    frame = base_frame().assign(label=np.linspace(0, 1, 60))
    frame.loc[4, "label"] = np.inf
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(TabTuneError) as cli:
        load(tmp_path / "t.csv")
    assert str(cli.value) == (f"{tmp_path / 't.csv'}: target column 'label' has 1 infinite value(s); "
                              f"drop those rows first")
    assert library_error(frame) == str(cli.value).replace(str(tmp_path / "t.csv"), "X")


# ---- one check, two paths: automatic treatments ----------------------------------------------

def _words(i: int) -> str:
    return f"item {i} arrived {'late' if i % 3 else 'early'} and {'well packed' if i % 2 else 'damaged'}"


TREATED = [  # (case, the column to add, what the message says)
    ("infinities", lambda n: np.where(np.arange(n) % 20 == 3, np.inf, np.arange(n, dtype=float)),
     "column 'c' has 3 infinite value(s): read as missing"),
    ("empty column", lambda n: np.full(n, np.nan), "column 'c' has no values: dropped"),
    ("mixed types", lambda n: [str(i) if i % 4 else "?" for i in range(n)],
     "column 'c' mixes 45 number(s) and 15 other value(s) (e.g. '1' and '?'): read as categories, not numbers"),
    ("text", lambda n: [_words(i) for i in range(n)],
     "column 'c' is free text (detected): read through its sentence embeddings (text_features=0 drops it)"),
]


@pytest.mark.parametrize("case,make,message", TREATED, ids=[c for c, _, _ in TREATED])
def test_treatments_are_logged_recorded_and_the_same_in_the_library(case, make, message, tmp_path, caplog):
    path = tmp_path / "t.csv"
    base_frame().assign(c=make(60)).to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        data = load(path)
    assert recorded(data, case) == [f"{path}: {message}"]
    assert f"{path}: {message}" in caplog.messages
    caplog.clear()
    frame = pd.read_csv(path)
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        pipe = nano(text_features=0).fit(frame.drop(columns="label"), frame["label"])
    assert f"X: {message}" in caplog.messages
    assert pipe.predict(frame.drop(columns="label")).shape == (60,)


def test_infinities_read_as_missing_give_the_same_features_as_gaps():
    frame = base_frame()
    holed = frame.assign(a=frame["a"].where(np.arange(60) % 7 != 0))
    infinite = frame.assign(a=frame["a"].where(np.arange(60) % 7 != 0, np.inf))
    X_holed, X_inf = (Preprocessor().fit_transform(f.drop(columns="label")) for f in (holed, infinite))
    np.testing.assert_array_equal(X_holed, X_inf)


def test_a_categorical_column_with_tens_of_thousands_of_levels_is_kept_with_a_warning(caplog):
    n = 24_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"shop": [f"s{v}" for v in rng.integers(0, 20_000, n)], "x": rng.normal(size=n)})
    levels = frame["shop"].nunique()
    assert levels > checks.MANY_LEVELS
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        notes = check_table(frame, "X")
    assert [t["case"] for t in notes] == ["many levels"]
    assert caplog.messages == [f"X: column 'shop' has {levels:,} distinct values: kept as codes by training frequency, "
                               f"which carry little signal (drop it, or declare it a text column)"]
    spec = next(s for s in Preprocessor().fit(frame).state["columns"] if s["name"] == "shop")
    assert spec["kind"] == "categorical" and len(spec["categories"]) == levels
    # every value distinct and no gaps: ID-like, which the preprocessor drops without a warning from here
    assert check_table(pd.DataFrame({"id": [f"r{i}" for i in range(n)]}), "X") == []


# ---- classes too small for the split ---------------------------------------------------------

def test_a_single_row_class_always_stays_in_training(tmp_path, caplog):
    frame = base_frame()
    frame.loc[0, "label"] = "z"
    frame.to_csv(tmp_path / "rare.csv", index=False)
    for seed in range(8):
        data = load_dataset(DatasetConfig(path=str(tmp_path / "rare.csv"), target="label"), seed)
        assert "z" in set(data.train["label"]) and "z" not in set(data.test["label"]) | set(data.val["label"])
    assert recorded(data, "rare class") == ["class 'z' has a single row: kept in training, none held out for testing",
                                            "class 'z' has a single row: kept in training, none held out for "
                                            "validation"]
    # the library's own validation split (fine-tuning without X_val): seeds where an unstratified split,
    # as before, held the single row out, making fit fail
    X, y = frame.drop(columns="label"), frame["label"]
    unlucky = [s for s in range(60) if "z" in set(train_test_split(y, test_size=0.1, random_state=s)[1])][:2]
    assert unlucky
    for seed in unlucky:
        with caplog.at_level(logging.WARNING, logger="tabtune"):
            pipe = nano("base-ft", seed=seed).fit(X, y)
        assert "z" in list(pipe.classes_) and pipe.predict(X).shape == (60,)
        assert "class 'z' has a single row: kept in training, none held out" in caplog.messages


def test_classes_a_split_would_squeeze_out_of_training_are_kept_there(tmp_path):
    # 12 classes of 2 rows: too few held-out rows to stratify, so a plain split may take a class whole
    frame = pd.DataFrame({"a": np.arange(24.0), "label": [f"k{i // 2}" for i in range(24)]})
    frame.to_csv(tmp_path / "many.csv", index=False)
    for seed in range(6):
        data = load_dataset(DatasetConfig(path=str(tmp_path / "many.csv"), target="label"), seed)
        trained = set(data.train["label"])
        assert set(data.test["label"]) <= trained and set(data.val["label"]) <= trained
        assert len(data.train) + len(data.val) + len(data.test) == 24


# ---- model limits ------------------------------------------------------------------------------

def test_more_classes_and_features_than_nanos_head_still_work():
    # 30 classes: nano's head has 10, tabtune's class hierarchy does the rest; 120 columns: it picks the best 30
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(240, 120)), columns=[f"f{i}" for i in range(120)])
    y = pd.Series([f"k{i % 30}" for i in range(240)], name="label")
    proba = nano().fit(X, y).predict_proba(X)
    assert proba.shape == (240, 30) and np.allclose(proba.sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("model,width,limit", [("contexttab", 520, "ContextTab reads at most 499 feature columns"),
                                               ("tabdpt", 40, "TabDPT reads at most 32 features")])
def test_more_features_than_a_model_reads_name_its_limit(model, width, limit):
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(40, width)), columns=[f"f{i}" for i in range(width)])
    with pytest.raises(TabTuneError, match=limit):  # ContextTab's in fit, TabDPT's at the first prediction
        TabularPipeline(model, model_params=dict(TINY_NANO), device="cpu").fit(X, np.arange(40) % 2).predict(X)


# ---- test tables, files ------------------------------------------------------------------------

def test_a_test_table_must_have_the_training_columns(tmp_path, caplog):
    base_frame().to_csv(tmp_path / "train.csv", index=False)
    base_frame(20, seed=1).rename(columns={"b": "bb"}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(TabTuneError) as err:
        load(tmp_path / "train.csv", test_path=str(tmp_path / "test.csv"))
    assert str(err.value) == (f"{tmp_path / 'test.csv'}: its columns differ from the training table's "
                              f"({tmp_path / 'train.csv'}): it lacks 'b'")
    base_frame(20, seed=1).assign(note="n").to_csv(tmp_path / "test.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="tabtune"):
        data = load(tmp_path / "train.csv", test_path=str(tmp_path / "test.csv"))
    assert list(data.test.columns) == ["a", "b", "label"]
    assert recorded(data, "test columns") == [f"{tmp_path / 'test.csv'}: column(s) 'note' are not in the training "
                                              f"table ({tmp_path / 'train.csv'}): ignored"]
    base_frame(20, seed=1).assign(label="w").to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(TabTuneError, match="target 'label' has value\\(s\\) the training table lacks: 'w'"):
        load(tmp_path / "train.csv", test_path=str(tmp_path / "test.csv"))


def test_a_folder_or_an_unreadable_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(TabTuneError, match="folder.csv: is a folder, not a table file"):
        load(tmp_path / "folder.csv")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(TabTuneError, match="junk.parquet: cannot read it \\(Parquet magic bytes"):
        load(tmp_path / "junk.parquet")
    base_frame().to_parquet(tmp_path / "locked.parquet")

    def denied(*args, **kwargs):  # what chmod 000 gives a user who is not root
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(pd, "read_parquet", denied)
    with pytest.raises(TabTuneError, match="locked.parquet: cannot read it \\(Permission denied\\)"):
        load(tmp_path / "locked.parquet")


def test_a_csv_that_is_not_utf8_is_read_as_latin1_with_a_note(tmp_path):
    lines = ["a,city,label"] + [f"{i},{'Zürich' if i % 2 else 'Genève'},{'xy'[i % 2]}" for i in range(40)]
    path = tmp_path / "latin.csv"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    data = load(path)
    assert set(data.train["city"]) == {"Zürich", "Genève"}
    # "a,city,label\n0,Gen" is 18 bytes: the è is byte 18
    assert recorded(data, "encoding") == [f"{path}: not UTF-8 (byte 0xe8 at offset 18 is the first that is not): "
                                          f"read as latin-1; re-save the file as UTF-8 if its text looks wrong"]
    (tmp_path / "utf16.csv").write_text("\n".join(lines), encoding="utf-16")
    assert read_table(tmp_path / "utf16.csv")["city"].iloc[0] == "Genève"


# ---- config values, before any data -----------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("strategy.epochs=0", "strategy.epochs must be at least 1, got 0"),
    ("strategy.learning_rate=-0.001", "strategy.learning_rate must be positive, got -0.001"),
    ("lora.r=0", "config key 'lora.r': expected a whole number >= 1 or 'auto', got 0"),
    ("strategy.batch_size=0", "strategy.batch_size must be at least 1, got 0"),
    ("lora.bias=some", "config key 'lora.bias': 'some' is not one of: none, all, lora_only"),
])
def test_config_values_out_of_range_fail_at_composition(override, message):
    # a table that does not exist: the value is refused before any data is looked at
    cfg = compose_train(["dataset.path=no-such-table.csv", "dataset.target=label", override])
    with pytest.raises(TabTuneError) as err:
        plain_configs(cfg)
    assert str(err.value) == message


# ---- the command line: one line, exit 2, no run directory; treatments in run.json --------------

def tabtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TABTUNE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "tabtune_cli", "train", "debug=smoke", "model=nano", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def assert_refused(result: subprocess.CompletedProcess, culprit: str, cwd: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("tabtune: error:") and culprit in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not [p for p in (cwd / "runs").rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def messy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    (root / "dup.csv").write_text("a,a,label\n" + "".join(f"{i},{i},{'xy'[i % 2]}\n" for i in range(30)))
    pq.write_table(pa.table({"a": list(range(30)), "tags": [[i] for i in range(30)], "label": ["x", "y"] * 15}),
                   root / "nested.parquet")
    base_frame().to_csv(root / "train.csv", index=False)
    base_frame(20, seed=1).drop(columns="b").to_csv(root / "test.csv", index=False)
    return root


@pytest.mark.parametrize("args,culprit", [
    (["dataset.path={root}/dup.csv"], "dup.csv: the column name 'a' appears 2 times"),
    (["dataset.path={root}/train.csv", "dataset.test_path={root}/test.csv"], "test.csv: its columns differ from"),
], ids=["duplicate-names", "test-columns"])
def test_data_errors_come_from_preflight_before_the_run_directory(args, culprit, messy_files):
    # preflight is what `tabtune train` runs before it creates a run directory (commands/train.py)
    cfg = compose_train(["debug=smoke", "model=nano", "dataset.target=label",
                         *[a.format(root=messy_files) for a in args]])
    with pytest.raises(TabTuneError, match=culprit):
        preflight(cfg)


@pytest.mark.parametrize("args,culprit", [
    (["dataset.path={root}/nested.parquet"], "nested.parquet: column(s) 'tags' hold lists"),  # was a traceback
    (["dataset.path=no-such.csv", "strategy=base-ft", "strategy.epochs=0"], "strategy.epochs must be at least 1"),
], ids=["nested", "config-before-data"])
def test_the_command_line_refuses_in_one_line_before_any_run_directory(args, culprit, messy_files, tmp_path):
    result = tabtune(*[a.format(root=messy_files) for a in args], "dataset.target=label", cwd=tmp_path)
    assert_refused(result, culprit, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    result = tabtune("device=cuda", "dataset=iris", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0] == "tabtune: error: device=cuda but no CUDA device is available (use device=cpu or device=auto)"
    # refused in the preflight (commands/train.plain_configs), before a run directory exists
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("run.json"))


def test_a_messy_table_trains_and_its_treatments_are_in_the_manifest(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    lines = ["x,gap,city,label"]
    for i in range(n):
        x = "inf" if i == 5 else f"{rng.normal():.4f}"
        label = "rare" if i == 0 else "xy"[i % 2]
        lines.append(f"{x},,{'Zürich' if i % 3 else 'Genève'},{label}")
    (tmp_path / "messy.csv").write_bytes("\n".join(lines).encode("latin-1"))
    result = tabtune(f"dataset.path={tmp_path / 'messy.csv'}", "dataset.target=label", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (manifest,) = tmp_path.rglob("run.json")
    treatments = json.loads(manifest.read_text())["provenance"]["dataset"]["treatments"]
    assert [t["case"] for t in treatments] == ["encoding", "infinities", "empty column", "rare class", "rare class"]
    log = (manifest.parent / "train.log").read_text()
    assert all(t["message"] in log for t in treatments)


# ---- property-based: random tables fit and predict, or fail with a TabTuneError ---------------

NAMES = ["c0", "1", "label"]  # a repeated name, a number-like one, the target's
PROPERTY = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


KINDS = ["float", "int", "empty", "string", "category", "bool", "date", "date-text", "mixed", "sentence",
         "constant", "string", "float"]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 1e308, -1e308, 5e-324, -0.0]
WORDS = ["good", "bad", "late", "box", "very", "not", "ok"]


def column(kind: str, n: int, gaps: float, rng: np.random.Generator):
    """``n`` values of ``kind``, about ``gaps`` of them missing; hypothesis picks kind, size, gaps and seed."""
    hole = rng.random(n) < gaps
    if kind == "int":
        values = rng.integers(-10**6, 10**6, n)
        if not hole.any():
            return values
        values = pd.array(values, dtype="Int64")
        values[hole] = pd.NA
        return values
    if kind == "float":
        values = rng.normal(0, 10.0 ** rng.integers(-3, 6), n)
        special = rng.random(n) < gaps / 3
        values[special] = rng.choice(SPECIAL_FLOATS, int(special.sum()))
        return values
    if kind in ("string", "category", "bool", "mixed", "sentence"):
        if kind == "string":
            values = list(rng.choice(["red", "green", "blue", "", " ", "Zürich"], n))
        elif kind == "category":
            values = list(rng.choice(["lo", "mid", "hi"], n))
        elif kind == "bool":
            values = [bool(v) for v in rng.integers(0, 2, n)]
        elif kind == "mixed":
            pool = [1, -2, 0.5, "x", "?", "1e3", True]
            values = [pool[i] for i in rng.integers(0, len(pool), n)]
        else:
            values = [" ".join(rng.choice(WORDS, rng.integers(1, 6))) for _ in range(n)]
        values = [None if h else v for v, h in zip(values, hole)]
        return pd.Categorical(values) if kind == "category" else values
    if kind in ("date", "date-text"):
        days = rng.integers(-100_000, 80_000, n)  # 1696 .. 2189
        dates = pd.Series(pd.to_datetime(days, unit="D")).where(~hole)
        return dates.dt.strftime("%Y-%m-%d") if kind == "date-text" else dates
    return [None] * n if kind == "empty" else [7] * n


@st.composite
def tables(draw, max_rows: int = 24):
    """A random table (1-4 columns of random kinds, 1..max_rows rows) and random class labels."""
    # hypothesis starts from, shrinks to and favours the ends of each list: plain choices there, messier inside
    n = draw(st.sampled_from([max_rows, 13, 8, 5, 3, 2, 1, max_rows // 2, max_rows]))
    width = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = [f"c{i}" for i in range(width)]
    if draw(st.integers(0, 5)) == 0:  # now and then a repeated or number-like name
        names[-1] = draw(st.sampled_from(NAMES))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=width, max_size=width))
    gaps = draw(st.sampled_from([0.0, 0.1, 0.5]))
    frame = pd.DataFrame({f"col{i}": column(kind, n, gaps, rng) for i, kind in enumerate(kinds)})
    frame.columns = names
    n_classes = draw(st.sampled_from([2, 3, 4, 2]))  # one class only: when few rows draw the same label
    labels = pd.Series(rng.choice(["yes", "no", "maybe", "rare"][:n_classes], n), name="label")
    return frame, labels


def fit_and_predict(X: pd.DataFrame, y: pd.Series, strategy: str) -> str:
    """``"fitted"`` (its probabilities checked) or ``"refused"`` (in one line)."""
    try:
        pipe = nano(strategy, text_features=0).fit(X, y)
        out = pipe.predict_proba(X)
    except TabTuneError as exc:
        assert "\n" not in str(exc)
        event(f"refused: {_gist(exc)}")
        return "refused"
    event("fitted and predicted")
    assert out.shape == (len(X), y.nunique())
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()
    return "fitted"


def _gist(exc: TabTuneError) -> str:
    """The kind of refusal, for hypothesis' statistics (``--hypothesis-show-statistics``)."""
    text = str(exc).split(": ", 1)[-1]
    return text[:90]


def test_random_tables_fit_and_predict_or_fail_with_a_tabtune_error():
    outcomes = Counter()

    @PROPERTY
    @given(table=tables(), strategy=st.sampled_from(["inference", "inference", "base-ft"]))
    def check(table, strategy):
        outcomes[fit_and_predict(*table, strategy)] += 1

    check()
    # a property that every table passed by being refused would prove nothing: most tables are fit
    assert outcomes["fitted"] >= outcomes["refused"], outcomes


def test_random_files_load_split_fit_and_predict_or_fail_with_a_tabtune_error(tmp_path_factory):
    outcomes = Counter()

    @settings(PROPERTY, max_examples=25)
    @given(table=tables(max_rows=30), as_parquet=st.booleans())
    def check(table, as_parquet):
        outcomes[load_split_fit(table, as_parquet, tmp_path_factory)] += 1

    check()
    assert outcomes["fitted"] >= 5, outcomes


def load_split_fit(table, as_parquet, tmp_path_factory) -> str:
    X, y = table
    folder = tmp_path_factory.mktemp("random")
    path = folder / ("table.parquet" if as_parquet else "table.csv")
    frame = pd.concat([X, y], axis=1)
    try:
        frame.to_parquet(path) if as_parquet else frame.to_csv(path, index=False)
    except (ValueError, TypeError, pa.ArrowException):  # what pyarrow cannot write is no Parquet file to test
        event("not writable as Parquet")
        return "not written"
    try:
        data = load_dataset(DatasetConfig(path=str(path), target="label"), 0)
    except TabTuneError as exc:
        assert "\n" not in str(exc)
        event(f"refused loading: {_gist(exc)}")
        return "refused"
    trained = set(data.train["label"])
    assert set(data.val["label"]) <= trained and set(data.test["label"]) <= trained
    try:
        pipe = nano().fit(data.train.drop(columns="label"), data.train["label"])
        out = pipe.predict(data.test.drop(columns="label"))
    except TabTuneError as exc:
        assert "\n" not in str(exc)
        event(f"refused fitting: {_gist(exc)}")
        return "refused"
    event("loaded, fitted and predicted")
    assert len(out) == len(data.test) and set(out) <= set(data.train["label"])
    return "fitted"
