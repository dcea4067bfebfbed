"""TabularLeaderboard: several pipelines and scikit-learn baselines on several tables, side by side.

Every contender sees the same splits (seeded, stratified), the same subsampled
training rows and the same test rows; the result is one row per
(dataset, split, contender) and a summary of means.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..data.split import split_frame, subsample
from .metrics import compute_metrics

BASELINES = ("logistic_regression", "hist_gradient_boosting")
METRICS = ("accuracy", "roc_auc", "f1_macro", "log_loss")  # per row; log_loss lower is better


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


class TabularLeaderboard:
    """Contenders side by side, scored alike. Two forms, one engine:

    - the guides': ``TabularLeaderboard(X_train, X_test, y_train, y_test)``, then ``add_model(...)`` per
      contender, ``run(rank_by='accuracy')`` (a DataFrame, best first) and ``get_ranking()``;
    - several tables: ``TabularLeaderboard(datasets={name: (X, y)}, contenders={label: TabularPipeline
      kwargs or a baseline name}, splits=3, ...)``, resampled into seeded, stratified splits.

    A contender that fails keeps its row, with its error, and the board goes on.
    """

    def __init__(self, *data, datasets: dict | None = None, contenders: dict | None = None, splits: int = 3,
                 test_size: float = 0.3, max_train_rows: int = 1024, max_test_rows: int = 2000, seed: int = 0):
        self.fixed = None
        if len(data) == 4:  # X_train, X_test, y_train, y_test: one split, as given
            X_train, X_test, y_train, y_test = data
            self.fixed = (pd.DataFrame(X_train), pd.Series(np.asarray(y_train)),
                          pd.DataFrame(X_test), pd.Series(np.asarray(y_test)))
        elif 1 <= len(data) <= 2 and isinstance(data[0], dict):
            datasets, contenders = data[0], data[1] if len(data) == 2 else contenders
        elif data:
            raise TypeError("TabularLeaderboard(X_train, X_test, y_train, y_test) or "
                            "TabularLeaderboard(datasets={name: (X, y)}, contenders={...})")
        self.datasets = dict(datasets or {})
        self.contenders = dict(contenders or {})
        self.splits, self.test_size, self.seed = splits, test_size, seed
        self.max_train_rows, self.max_test_rows = max_train_rows, max_test_rows
        self.results_: pd.DataFrame | None = None
        self.rank_by_: str | None = None

    def add_model(self, model_name: str, tuning_strategy: str = "inference", name: str | None = None,
                  tuning_params: dict | None = None, model_params: dict | None = None, **pipeline_kwargs):
        """Add a contender: a TabularPipeline with these settings (``name``: its label in the ranking)."""
        label = name or f"{model_name}-{tuning_strategy}"
        if label in self.contenders:
            raise ValueError(f"a contender named {label!r} is on the board already (give name=...)")
        self.contenders[label] = {"model_name": model_name, "tuning_strategy": tuning_strategy,
                                  "tuning_params": tuning_params, "model_params": model_params, **pipeline_kwargs}
        return self

    def _splits(self):
        """``(dataset, split, X_train, y_train, X_test, y_test)`` for every table and split."""
        if self.fixed is not None:
            X_train, y_train, X_test, y_test = self.fixed
            yield "data", 0, X_train, y_train, X_test, y_test
            return
        for dataset, (X, y) in self.datasets.items():
            frame = X.assign(__target__=np.asarray(y))
            for split in range(self.splits):
                seed = self.seed + split
                train, test = split_frame(frame, "__target__", fraction=self.test_size, stratify=True, seed=seed)
                train = subsample(train, "__target__", self.max_train_rows, stratify=True, seed=seed)
                test = subsample(test, "__target__", self.max_test_rows, stratify=True, seed=seed)
                yield (dataset, split, train.drop(columns="__target__"), train["__target__"],
                       test.drop(columns="__target__"), test["__target__"])

    def run(self, on_result=None, rank_by: str | None = None) -> pd.DataFrame:
        """One row per (dataset, split, contender); with ``rank_by``, sorted best first by that metric."""
        if not self.contenders:
            raise ValueError("no contenders on the board: add_model(...) first")
        rows = []
        for dataset, split, X_train, y_train, X_test, y_test in self._splits():
            for label, spec in self.contenders.items():
                row = {"dataset": dataset, "split": split, "contender": label,
                       **self._score(spec, X_train, y_train, X_test, y_test, self.seed + split),
                       "train_rows": len(X_train), "test_rows": len(X_test)}
                rows.append(row)
                if on_result is not None:
                    on_result(row)
        results = pd.DataFrame(rows)
        for column in (*METRICS, "error"):  # present even when every contender failed
            if column not in results:
                results[column] = None
        results[list(METRICS)] = results[list(METRICS)].astype(float)
        self.results_, self.rank_by_ = results, rank_by
        return self.get_ranking() if rank_by else results

    @staticmethod
    def _score(spec, X_train, y_train, X_test, y_test, seed: int) -> dict:
        """Metrics of one contender on one split (the error, in one line, if it fails)."""
        from ..pipeline import TabularPipeline

        started = time.perf_counter()
        labels = sorted(pd.unique(pd.concat([pd.Series(np.asarray(y_train)), pd.Series(np.asarray(y_test))])),
                        key=str)
        order = [str(c) for c in labels]
        try:
            if isinstance(spec, str):
                model = baseline(spec, X_train).fit(X_train, y_train.astype(str))
                classes = list(model.classes_)
            else:
                model = TabularPipeline(**{"seed": seed, **spec}).fit(X_train, y_train)
                classes = [str(c) for c in model.classes_]
            proba_seen = model.predict_proba(X_test)
        except Exception as exc:  # noqa: BLE001 - one contender's failure is its row's, not the board's
            return {"seconds": time.perf_counter() - started, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        proba = np.zeros((len(X_test), len(labels)))
        for k, c in enumerate(classes):
            proba[:, order.index(str(c))] = proba_seen[:, k]
        codes = np.asarray([order.index(str(v)) for v in np.asarray(y_test)])
        metrics = compute_metrics("classification", codes, proba)
        return {"roc_auc": metrics["roc_auc"], "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
                "log_loss": metrics["log_loss"], "seconds": time.perf_counter() - started, "error": None}

    def get_ranking(self, rank_by: str | None = None) -> pd.DataFrame:
        """Contenders best first by ``rank_by`` (default: the metric ``run`` ranked by, else accuracy),
        averaged over datasets and splits; failed contenders last, with their error."""
        if self.results_ is None:
            raise ValueError("run() the board first")
        metric = rank_by or self.rank_by_ or "accuracy"
        if metric not in (*METRICS, "seconds"):
            raise ValueError(f"rank_by: unknown metric {metric!r} (known: {', '.join((*METRICS, 'seconds'))})")
        table = self.results_.groupby("contender", sort=False)[[*METRICS, "seconds"]].mean()
        errors = self.results_.groupby("contender", sort=False)["error"].agg(
            lambda e: next((x for x in e if x), None))
        table = table.assign(error=errors).reset_index()
        lower_is_better = metric in ("log_loss", "seconds")
        table = table.sort_values(metric, ascending=lower_is_better, na_position="last", kind="stable")
        table.index = pd.RangeIndex(1, len(table) + 1, name="rank")
        return table

    @staticmethod
    def summary(results: pd.DataFrame) -> pd.DataFrame:
        """Mean of each metric per (dataset, contender), plus an ``all`` row per contender."""
        metrics = ["roc_auc", "accuracy", "log_loss", "seconds"]
        per_dataset = results.groupby(["dataset", "contender"], sort=False)[metrics].mean().reset_index()
        overall = per_dataset.groupby("contender", sort=False)[metrics].mean().reset_index()
        overall.insert(0, "dataset", "all")
        return pd.concat([per_dataset, overall], ignore_index=True)
