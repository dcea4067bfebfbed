"""TabularLeaderboard: every contender on the same splits, metrics computed the same way."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tabtune_cli.commands.leaderboard import load_tables, to_markdown
from tabtune_cli.evaluation.leaderboard import TabularLeaderboard, baseline


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
    summary = TabularLeaderboard.summary(results)
    overall = summary[summary.dataset == "all"].set_index("contender")
    assert overall.loc["LR", "roc_auc"] == pytest.approx(lr.groupby("dataset")["roc_auc"].mean().mean())
    markdown = to_markdown(summary)
    assert markdown.count("\n") == len(summary) + 2 and "| all | LR |" in markdown


def test_missing_tables_are_skipped_and_none_is_an_error(tmp_path, capsys):
    assert list(load_tables(["wine", "nope"], tmp_path)) == ["wine"]
    assert "skipped nope" in capsys.readouterr().err
    with pytest.raises(Exception, match="no tables to run"):
        load_tables(["nope"], tmp_path)


def test_baselines_handle_categoricals_and_gaps():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=200), "c": rng.choice(["x", "y", None], size=200),
                      "text": [f"review {i}" for i in range(200)]})  # more levels than native categoricals take
    y = np.where(X["a"] > 0, "p", "n")
    for name in ("logistic_regression", "hist_gradient_boosting"):
        model = baseline(name, X).fit(X, y)
        assert (model.predict(X) == y).mean() > 0.9
