"""TabularLeaderboard: several pipelines and scikit-learn baselines on several tables, side by side.

Every contender sees the same splits (seeded, stratified), the same subsampled
training rows and the same test rows; the result is one row per
(dataset, split, contender) and a summary of means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.split import split_frame, subsample
from .metrics import compute_metrics

BASELINES = ("logistic_regression", "hist_gradient_boosting")


def baseline(name: str, X: pd.DataFrame):
    """A scikit-learn baseline with the usual preprocessing (scaled numerics, one-hot categoricals)."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    categorical = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c])]
    numeric = [c for c in X.columns if c not in categorical]
    if name == "logistic_regression":
        prep = make_column_transformer(
            (make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
             categorical))
        return make_pipeline(prep, LogisticRegression(max_iter=2000))
    if name == "hist_gradient_boosting":
        # native categorical splits take at most 255 levels; wider ones (free text) go in as codes
        narrow = [c for c in categorical if X[c].nunique() <= 250]
        prep = make_column_transformer(
            (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1, encoded_missing_value=-1),
             narrow + [c for c in categorical if c not in narrow]), remainder="passthrough")
        return make_pipeline(prep, HistGradientBoostingClassifier(
            categorical_features=list(range(len(narrow))) or None, random_state=0))
    raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")


@dataclass
class TabularLeaderboard:
    """``datasets``: name -> (X, y). ``contenders``: label -> TabularPipeline kwargs, or a baseline name."""

    datasets: dict
    contenders: dict = field(default_factory=dict)
    splits: int = 3
    test_size: float = 0.3
    max_train_rows: int = 1024
    max_test_rows: int = 2000
    seed: int = 0

    def run(self, on_result=None) -> pd.DataFrame:
        from ..pipeline import TabularPipeline

        rows = []
        for dataset, (X, y) in self.datasets.items():
            frame = X.assign(__target__=np.asarray(y))
            labels = sorted(pd.unique(frame["__target__"]), key=str)
            for split in range(self.splits):
                seed = self.seed + split
                train, test = split_frame(frame, "__target__", fraction=self.test_size, stratify=True, seed=seed)
                train = subsample(train, "__target__", self.max_train_rows, stratify=True, seed=seed)
                test = subsample(test, "__target__", self.max_test_rows, stratify=True, seed=seed)
                X_train, y_train = train.drop(columns="__target__"), train["__target__"]
                X_test, y_test = test.drop(columns="__target__"), test["__target__"]
                codes = np.searchsorted(np.asarray(labels, dtype=object).astype(str),
                                        y_test.astype(str).to_numpy())
                for label, spec in self.contenders.items():
                    started = time.perf_counter()
                    if isinstance(spec, str):
                        model = baseline(spec, X_train).fit(X_train, y_train.astype(str))
                        classes = list(model.classes_)
                        proba_seen = model.predict_proba(X_test)
                    else:
                        model = TabularPipeline(**{**spec, "seed": seed}).fit(X_train, y_train)
                        classes = [str(c) for c in model.classes_]
                        proba_seen = model.predict_proba(X_test)
                    proba = np.zeros((len(X_test), len(labels)))
                    order = [str(c) for c in labels]
                    for k, c in enumerate(classes):
                        proba[:, order.index(str(c))] = proba_seen[:, k]
                    metrics = compute_metrics("classification", codes, proba)
                    row = {"dataset": dataset, "split": split, "contender": label,
                           "roc_auc": metrics["roc_auc"], "accuracy": metrics["accuracy"],
                           "log_loss": metrics["log_loss"], "seconds": time.perf_counter() - started,
                           "train_rows": len(X_train), "test_rows": len(X_test)}
                    rows.append(row)
                    if on_result is not None:
                        on_result(row)
        return pd.DataFrame(rows)

    @staticmethod
    def summary(results: pd.DataFrame) -> pd.DataFrame:
        """Mean of each metric per (dataset, contender), plus an ``all`` row per contender."""
        metrics = ["roc_auc", "accuracy", "log_loss", "seconds"]
        per_dataset = results.groupby(["dataset", "contender"], sort=False)[metrics].mean().reset_index()
        overall = per_dataset.groupby("contender", sort=False)[metrics].mean().reset_index()
        overall.insert(0, "dataset", "all")
        return pd.concat([per_dataset, overall], ignore_index=True)
