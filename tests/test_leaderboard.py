"""``tabtune leaderboard`` and TabularLeaderboard: every entry on the same folds, metrics computed the same way,
mean ± standard deviation that the folds add up to, and entries checked before anything is fitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tabtune_cli.commands.leaderboard import check_board, load_tables
from tabtune_cli.data.builtin import load_builtin
from tabtune_cli.errors import TabTuneError
from tabtune_cli.leaderboard import TabularLeaderboard, baseline
from tabtune_cli.evaluation.metrics import compute_metrics
from tabtune_cli.commands.hydra_conf import compose_train

from conftest import assert_picture

# tiny random-weight TabICL, one ensemble member; fine-tuning of two steps
TINY = ["entry_defaults.model=tabicl", "+entry_defaults.overrides.model={pretrained:false,size:tiny,n_estimators:1}",
        "+entry_defaults.overrides.strategy={epochs:1,steps_per_epoch:2,context_size:32,query_size:16,batch_size:1}"]
BOARD = ["cv=kfold", "splits=2", "datasets=[{path:table.csv,target:target}]", "max_train_rows=null",
         "max_test_rows=null", "~entries", "+entries.zero-shot.strategy=inference",
         "+entries.lora-r2={strategy:peft,overrides:{lora:{r:2,lora_alpha:4}}}",
         "+entries.LR.baseline=logistic_regression", "out_dir=board"]


def test_the_board_is_the_mean_and_std_of_its_folds(tabtune, tmp_path):
    table = load_builtin("breast_cancer").sample(n=200, random_state=0)
    table.to_csv(tmp_path / "table.csv", index=False)
    code, out, err = tabtune("leaderboard", "--config-name", "leaderboard_lora_ranks", *TINY, *BOARD)
    assert code == 0, err
    board_dir = tmp_path / "board"
    folds = pd.read_csv(board_dir / "folds.csv")
    board = pd.read_csv(board_dir / "leaderboard.csv")
    assert list(board["entry"]) == ["zero-shot", "lora-r2", "LR"] and (board["folds"] == 2).all()
    assert folds["error"].isna().all() and (folds["train_rows"] + folds["test_rows"] == 200).all()

    # every mean and standard deviation is the folds' (n - 1 in the denominator)
    for _, row in board.iterrows():
        mine = folds[folds["contender"] == row["entry"]]
        for metric in ("roc_auc", "accuracy", "log_loss", "f1_macro", "brier", "fit_seconds", "peak_memory_mb"):
            values = mine[metric].to_numpy(dtype=float)
            if np.isnan(values).all():  # the baseline's memory
                assert np.isnan(row[f"{metric}_mean"])
                continue
            assert row[f"{metric}_mean"] == pytest.approx(values.mean(), rel=1e-9)
            assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1), rel=1e-9)
    # the folds are what they say: the logistic regression's, recomputed here from scratch
    from sklearn.model_selection import StratifiedKFold

    X, y = table.drop(columns="target"), table["target"]
    order = sorted(y.unique())
    expected = []
    for train, test in StratifiedKFold(2, shuffle=True, random_state=0).split(X, y):
        model = baseline("logistic_regression", X.iloc[train]).fit(X.iloc[train], y.iloc[train])
        proba = model.predict_proba(X.iloc[test])[:, [list(model.classes_).index(c) for c in order]]
        expected.append(compute_metrics("classification", np.asarray([order.index(v) for v in y.iloc[test]]),
                                        proba)["roc_auc"])
    assert folds[folds["contender"] == "LR"]["roc_auc"].tolist() == pytest.approx(expected)

    lora = board.set_index("entry").loc["lora-r2"]
    zero = board.set_index("entry").loc["zero-shot"]
    assert 0 < lora["trainable_params"] < lora["total_params"] and zero["trainable_params"] == 0
    assert lora["peak_memory_mb_mean"] > 0 and lora["rank"] >= 1
    markdown = (board_dir / "leaderboard.md").read_text()
    assert "| lora-r2 |" in markdown and "±" in markdown and "![leaderboard](leaderboard.png)" in markdown
    for name in ("leaderboard.png", "leaderboard_fit_time.png"):
        assert_picture(board_dir / name)
    assert "lora-r2" in out and "leaderboard.csv" in out


@pytest.mark.parametrize("override,expected", [
    ("+entries.broken.model=tabixl", "entry 'broken': unknown model 'tabixl'"),
    ("+entries.broken.overrides.lora.rank=4", "entry 'broken': unknown lora key 'rank'"),
    ("+entries.broken.overrides.strategy.learning_rate=fast", "entry 'broken': strategy.learning_rate: expected float"),
    ("+entries.broken.overrides.lora.r=0", "entry 'broken': config key 'lora.r': expected a whole number"),
    ("+entries.broken.baseline=svm", "entry 'broken': unknown baseline 'svm'"),
])
def test_a_broken_entry_stops_the_board_before_anything_runs(tabtune, tmp_path, override, expected):
    code, out, err = tabtune("leaderboard", "--config-name", "leaderboard_strategies", override)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"tabtune: error: {expected}"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["leaderboard", "leaderboard_strategies", "leaderboard_lora_ranks"])
def test_every_shipped_board_composes_and_its_entries_check(name):
    values, entries = check_board(compose_train([], name))
    assert len(entries) >= 4 and values["datasets"]
    if name == "leaderboard_lora_ranks":  # the guide's rank exploration: alpha = 2 x rank
        ranks = {e["peft_config"]["r"]: e["peft_config"]["lora_alpha"] for e in entries.values() if e["peft_config"]}
        assert ranks == {2: 4, 4: 8, 8: 16, 16: 32}


def test_contenders_share_splits_and_are_scored_alike(tmp_path):
    tables = load_tables(["iris", "breast_cancer"], tmp_path)  # built-ins need no shared folder
    tiny = {"model_name": "nano", "model_params": {"pretrained": False, "size": "tiny", "n_estimators": 1}}
    board = TabularLeaderboard(tables, {"nano": tiny, "LR": "logistic_regression",
                                        "HGB": "hist_gradient_boosting"}, splits=2, max_train_rows=100)
    results = board.run()
    assert len(results) == 2 * 2 * 3
    # the same rows for everyone in a split, fewer training rows than the table where capped
    per_split = results.groupby(["dataset", "split"])[["train_rows", "test_rows"]].nunique()
    assert (per_split == 1).all().all()
    assert (results["train_rows"] == 100).all()
    lr = results[results.contender == "LR"]
    assert (lr["roc_auc"] > 0.95).all() and (lr["accuracy"] > 0.85).all()
    nano = results[results.contender == "nano"]
    assert (nano["total_params"] > 0).all() and nano["peak_memory_mb"].notna().all()
    summary = TabularLeaderboard.summary(results)
    overall = summary[summary.dataset == "all"].set_index("contender")
    assert overall.loc["LR", "roc_auc"] == pytest.approx(lr.groupby("dataset")["roc_auc"].mean().mean())
    aggregated = TabularLeaderboard.aggregate(results).set_index(["dataset", "contender"])
    assert aggregated.loc[("all", "LR"), "roc_auc_mean"] == pytest.approx(overall.loc["LR", "roc_auc"])
    assert aggregated.loc[("iris", "LR"), "roc_auc_std"] == pytest.approx(
        lr[lr.dataset == "iris"]["roc_auc"].std(ddof=1))


def test_regression_tables_and_kfold_cover_every_row_once():
    X, y = load_tables(["diabetes"], Path("."))["diabetes"]
    board = TabularLeaderboard({"diabetes": (X, y)}, {"ridge": "ridge", "HGB": "hist_gradient_boosting",
                                                      "LR": "logistic_regression"},
                               cv="kfold", splits=3, max_train_rows=None, max_test_rows=None)
    results = board.run()
    assert set(results["task"]) == {"regression"}
    ridge = results[results.contender == "ridge"]
    assert ridge["test_rows"].sum() == len(X) and (ridge["r2"] > 0.3).all()
    assert results[results.contender == "LR"]["error"].str.contains("not regression").all()
    aggregated = TabularLeaderboard.aggregate(results).set_index("contender")
    assert aggregated.loc["ridge", "rank"] in (1, 2) and aggregated.loc["LR", "rank"] == 0
    with pytest.raises(ValueError, match="at least 2 folds"):
        TabularLeaderboard({"diabetes": (X, y)}, {"ridge": "ridge"}, cv="kfold", splits=1)


def test_missing_tables_are_skipped_and_none_is_an_error(tmp_path, capsys):
    assert list(load_tables(["wine", "nope"], tmp_path)) == ["wine"]
    assert "skipped nope" in capsys.readouterr().err
    with pytest.raises(TabTuneError, match="no tables to run"):
        load_tables(["nope"], tmp_path)


def test_baselines_handle_categoricals_and_gaps():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=200), "c": rng.choice(["x", "y", None], size=200),
                      "text": [f"review {i}" for i in range(200)]})  # more levels than native categoricals take
    y = np.where(X["a"] > 0, "p", "n")
    for name in ("logistic_regression", "hist_gradient_boosting"):
        model = baseline(name, X).fit(X, y)
        assert (model.predict(X) == y).mean() > 0.9

