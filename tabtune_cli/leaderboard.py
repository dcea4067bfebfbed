"""TabularLeaderboard: pipelines and scikit-learn baselines on several tables, scored on the same folds.

Every contender sees the same folds (seeded; stratified for classification), the same subsampled
training rows and the same test rows. ``run`` gives one row per (dataset, fold, contender): every metric,
fit and predict seconds, the fit's peak memory and the parameter counts; ``aggregate`` gives their mean
and standard deviation over the folds per (dataset, contender).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from .data.dataset import infer_task
from .data.split import split_frame, subsample
from .evaluation.metrics import HIGHER_IS_BETTER, METRICS as TASK_METRICS, compute_metrics

# baseline name -> the tasks it does
BASELINES = {"logistic_regression": ("classification",), "ridge": ("regression",),
             "hist_gradient_boosting": ("classification", "regression")}
METRICS = ("accuracy", "roc_auc", "f1_macro", "log_loss")  # get_ranking's (classification); log_loss lower is better
# what the folds of an entry cost; the parameter counts are the fitted module's (None for a baseline)
RESOURCES = ("fit_seconds", "predict_seconds", "peak_memory_mb", "trainable_params", "total_params")
# the metric a board ranks and plots by default
HEADLINE = {"classification": "roc_auc", "regression": "rmse"}
CV_KINDS = ("split", "kfold")


def headline(task: str, metric: str | None = None) -> str:
    """The metric to rank ``task``'s tables by: ``metric``, or (None / ``auto``) ROC AUC or RMSE."""
    return HEADLINE[task] if metric in (None, "auto") else metric


def baseline(name: str, X: pd.DataFrame, task: str = "classification"):
    """A scikit-learn baseline with the usual preprocessing (scaled numerics, one-hot categoricals)."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    if task not in BASELINES[name]:
        raise ValueError(f"baseline {name!r} does {' and '.join(BASELINES[name])}, not {task}")
    categorical = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c])]
    numeric = [c for c in X.columns if c not in categorical]
    if name in ("logistic_regression", "ridge"):
        prep = make_column_transformer(
            (make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
             categorical))
        return make_pipeline(prep, LogisticRegression(max_iter=2000) if name == "logistic_regression" else Ridge())
    # native categorical splits take at most 255 levels; wider ones (free text) go in as codes
    narrow = [c for c in categorical if X[c].nunique() <= 250]
    prep = make_column_transformer(
        (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1, encoded_missing_value=-1),
         narrow + [c for c in categorical if c not in narrow]), remainder="passthrough")
    model = HistGradientBoostingClassifier if task == "classification" else HistGradientBoostingRegressor
    return make_pipeline(prep, model(categorical_features=list(range(len(narrow))) or None, random_state=0))


class TabularLeaderboard:
    """Contenders side by side, scored alike. Two forms, one engine:

    - the guides': ``TabularLeaderboard(X_train, X_test, y_train, y_test)``, then ``add_model(...)`` per
      contender, ``run(rank_by='accuracy')`` (a DataFrame, best first) and ``get_ranking()``;
    - several tables: ``TabularLeaderboard(datasets={name: (X, y)}, contenders={label: TabularPipeline
      kwargs or a baseline name}, splits=3, cv="split" | "kfold", ...)``: ``splits`` seeded train/test
      splits (``test_size`` held out), or ``splits``-fold cross-validation; ``aggregate(results)`` for
      mean and standard deviation over the folds.

    A contender that fails keeps its row, with its error, and the board goes on.
    """

    def __init__(self, *data, datasets: dict | None = None, contenders: dict | None = None, splits: int = 3,
                 test_size: float = 0.3, max_train_rows: int | None = 1024, max_test_rows: int | None = 2000,
                 seed: int = 0, cv: str = "split"):
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
        if cv not in CV_KINDS:
            raise ValueError(f"cv: {cv!r} is not one of: {', '.join(CV_KINDS)}")
        if splits < (2 if cv == "kfold" else 1):
            raise ValueError(f"splits: {'k-fold cross-validation needs at least 2 folds' if cv == 'kfold' else 'at least 1'}"
                             f", got {splits}")
        if cv == "split" and not 0 < test_size < 1:
            raise ValueError(f"test_size must be between 0 and 1, got {test_size}")
        self.datasets = dict(datasets or {})
        self.contenders = dict(contenders or {})
        self.splits, self.test_size, self.seed, self.cv = splits, test_size, seed, cv
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

    @property
    def n_folds(self) -> int:
        """Folds per table: one for the guides' form."""
        return 1 if self.fixed is not None else self.splits

    def _folds(self, frame: pd.DataFrame, stratify: bool):
        """``(train, test)`` frames of every fold of one table (target in ``__target__``)."""
        if self.cv == "split":
            for fold in range(self.splits):
                yield split_frame(frame, "__target__", fraction=self.test_size, stratify=stratify,
                                  seed=self.seed + fold)
            return
        from sklearn.model_selection import KFold, StratifiedKFold

        labels = frame["__target__"]
        if stratify and labels.value_counts().min() >= self.splits:
            folds = StratifiedKFold(self.splits, shuffle=True, random_state=self.seed).split(frame, labels)
        else:
            folds = KFold(self.splits, shuffle=True, random_state=self.seed).split(frame)
        for train, test in folds:
            yield frame.iloc[train], frame.iloc[test]

    def _splits(self):
        """``(dataset, task, fold, X_train, y_train, X_test, y_test)`` for every table and fold."""
        if self.fixed is not None:
            X_train, y_train, X_test, y_test = self.fixed
            yield "data", infer_task(y_train), 0, X_train, y_train, X_test, y_test
            return
        for dataset, (X, y) in self.datasets.items():
            frame = pd.DataFrame(X).assign(__target__=np.asarray(y))
            task = infer_task(frame["__target__"])
            stratify = task == "classification"
            for fold, (train, test) in enumerate(self._folds(frame, stratify)):
                seed = self.seed + fold
                train = subsample(train, "__target__", self.max_train_rows, stratify=stratify, seed=seed)
                test = subsample(test, "__target__", self.max_test_rows, stratify=stratify, seed=seed)
                yield (dataset, task, fold, train.drop(columns="__target__"), train["__target__"],
                       test.drop(columns="__target__"), test["__target__"])

    def run(self, on_result=None, rank_by: str | None = None, on_start=None) -> pd.DataFrame:
        """One row per (dataset, fold, contender) (the fold in ``split``); with ``rank_by``, the ranking
        (``get_ranking``) instead. ``on_start(dataset, fold, contender)`` is called before each fit and
        ``on_result(row)`` after it."""
        if not self.contenders:
            raise ValueError("no contenders on the board: add_model(...) first")
        rows = []
        for dataset, task, fold, X_train, y_train, X_test, y_test in self._splits():
            for label, spec in self.contenders.items():
                if on_start is not None:
                    on_start(dataset, fold, label)
                row = {"dataset": dataset, "task": task, "split": fold, "contender": label,
                       **self._score(spec, task, X_train, y_train, X_test, y_test, self.seed + fold),
                       "train_rows": len(X_train), "test_rows": len(X_test)}
                rows.append(row)
                if on_result is not None:
                    on_result(row)
        results = pd.DataFrame(rows)
        metrics = [m for task in dict.fromkeys(results["task"]) for m in TASK_METRICS[task]]
        numeric = list(dict.fromkeys([*METRICS, *metrics, *RESOURCES, "seconds"]))
        for column in (*numeric, "error"):  # present even when every contender failed
            if column not in results:
                results[column] = None
        results[numeric] = results[numeric].astype(float)
        self.results_, self.rank_by_ = results, rank_by
        return self.get_ranking() if rank_by else results

    @staticmethod
    def _score(spec, task: str, X_train, y_train, X_test, y_test, seed: int) -> dict:
        """Metrics and costs of one contender on one fold (the error, in one line, if it fails)."""
        from .pipeline import TabularPipeline

        started = time.perf_counter()
        classification = task == "classification"
        costs = dict.fromkeys(RESOURCES)
        try:
            if isinstance(spec, str):
                model = baseline(spec, X_train, task)
                model.fit(X_train, y_train.astype(str) if classification else y_train.astype(float))
                costs["fit_seconds"] = time.perf_counter() - started
                classes = [str(c) for c in model.classes_] if classification else None
            else:
                model = TabularPipeline(**{"seed": seed, "task_type": task, **spec}).fit(X_train, y_train)
                summary = model.summary()
                costs.update({k: summary[k] for k in ("fit_seconds", "peak_memory_mb", "trainable_params",
                                                      "total_params")})
                classes = [str(c) for c in model.classes_] if classification else None
            predicting = time.perf_counter()
            prediction = model.predict_proba(X_test) if classification else model.predict(X_test)
            costs["predict_seconds"] = time.perf_counter() - predicting
        except Exception as exc:  # noqa: BLE001 - one contender's failure is its row's, not the board's
            return {"seconds": time.perf_counter() - started, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        if classification:  # columns in one order for every contender, a class absent from training at 0
            labels = sorted(pd.unique(pd.concat([pd.Series(np.asarray(y_train)), pd.Series(np.asarray(y_test))])),
                            key=str)
            order = [str(c) for c in labels]
            proba = np.zeros((len(X_test), len(labels)))
            for k, c in enumerate(classes):
                proba[:, order.index(c)] = prediction[:, k]
            metrics = compute_metrics(task, np.asarray([order.index(str(v)) for v in np.asarray(y_test)]), proba)
        else:
            metrics = compute_metrics(task, np.asarray(y_test, dtype=float), np.asarray(prediction, dtype=float))
        return {**metrics, **costs, "seconds": time.perf_counter() - started, "error": None}

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
        metrics = [m for m in ("roc_auc", "accuracy", "log_loss", "rmse", "r2", "seconds") if m in results]
        per_dataset = results.groupby(["dataset", "contender"], sort=False)[metrics].mean().reset_index()
        overall = per_dataset.groupby("contender", sort=False)[metrics].mean().reset_index()
        overall.insert(0, "dataset", "all")
        return pd.concat([per_dataset, overall], ignore_index=True)

    @staticmethod
    def aggregate(results: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
        """One row per (dataset, contender), in the board's order: ``folds`` scored and ``failed``, the
        first ``error``, ``<m>_mean`` and ``<m>_std`` (standard deviation over the folds, n - 1 in the
        denominator; empty for one fold) of every metric of the table's task and of fit seconds, predict
        seconds and peak memory (MiB), the parameter counts, and ``rank`` within the table by ``metric``
        (None / ``auto``: ROC AUC, or RMSE). With several tables of one task, ``all`` rows follow: the mean
        of the tables' means."""
        rows = []
        for (dataset, contender), group in results.groupby(["dataset", "contender"], sort=False):
            task = group["task"].iloc[0]
            ok = group[group["error"].isna()]
            row = {"dataset": dataset, "task": task, "contender": contender, "folds": len(ok),
                   "failed": len(group) - len(ok), "error": next((e for e in group["error"] if e), None)}
            for column in (*TASK_METRICS[task], "fit_seconds", "predict_seconds", "peak_memory_mb"):
                values = ok[column].astype(float).dropna()
                row[f"{column}_mean"] = values.mean() if len(values) else math.nan
                row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            for column in ("trainable_params", "total_params"):
                row[column] = ok[column].max() if len(ok) else math.nan
            rows.append(row)
        board = pd.DataFrame(rows)
        if board["dataset"].nunique() > 1 and board["task"].nunique() == 1:
            means = [c for c in board if c.endswith("_mean") or c in ("trainable_params", "total_params")]
            overall = board.groupby("contender", sort=False).agg(
                {**{c: "mean" for c in means}, "folds": "sum", "failed": "sum",
                 "error": lambda e: next((x for x in e if x), None)}).reset_index()
            overall.insert(0, "dataset", "all")
            overall.insert(1, "task", board["task"].iloc[0])
            board = pd.concat([board, overall], ignore_index=True)
        board["rank"] = math.nan
        for dataset, group in board.groupby("dataset", sort=False):
            column = f"{headline(group['task'].iloc[0], metric)}_mean"
            if column in group:
                ascending = column.removesuffix("_mean") not in HIGHER_IS_BETTER
                board.loc[group.index, "rank"] = group[column].rank(ascending=ascending, method="min")
        board["rank"] = board["rank"].fillna(0).astype(int)  # 0: no score (every fold failed)
        return board
