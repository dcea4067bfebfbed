"""The one metrics function: every metric tabtune reports, by snake_case name."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Metrics of class probabilities ``proba`` (n, C) against integer labels ``y_true`` in 0..C-1."""
    n_classes = proba.shape[1]
    labels = np.arange(n_classes)
    proba = np.clip(proba, 0.0, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    pred = proba.argmax(axis=1)
    onehot = np.eye(n_classes)[y_true]
    present = np.unique(y_true)
    if len(present) < 2:
        roc_auc = None  # undefined on a single class
    elif n_classes == 2:
        roc_auc = skm.roc_auc_score(y_true, proba[:, 1])
    else:
        # one-vs-rest, macro over the classes present in y_true
        roc_auc = float(np.mean([skm.roc_auc_score(y_true == k, proba[:, k]) for k in present]))
    occurring = np.union1d(y_true, pred)  # a class absent from both labels and predictions is no evidence
    return {
        "accuracy": skm.accuracy_score(y_true, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, pred),
        "f1_macro": skm.f1_score(y_true, pred, average="macro", labels=occurring, zero_division=0),
        "f1_weighted": skm.f1_score(y_true, pred, average="weighted", labels=occurring, zero_division=0),
        "roc_auc": roc_auc,
        "log_loss": skm.log_loss(y_true, proba, labels=labels),
        # multiclass Brier: mean over rows of the squared distance to the one-hot label
        "brier": float(((proba - onehot) ** 2).sum(axis=1).mean()),
        "ece": expected_calibration_error(y_true, proba),
    }


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": math.sqrt(skm.mean_squared_error(y_true, pred)),
        "mae": skm.mean_absolute_error(y_true, pred),
        "r2": skm.r2_score(y_true, pred),
    }


def compute_metrics(kind: str, y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float | None]:
    """Classification metrics from probabilities, or regression metrics from point predictions."""
    values = classification_metrics(y_true, prediction) if kind == "classification" else regression_metrics(y_true, prediction)
    return {k: (None if v is None else float(v)) for k, v in values.items()}


# the metric a validation pass watches, and whether lower is better
VALIDATION_METRIC = {"classification": ("log_loss", True), "regression": ("rmse", True)}

# every metric by task, and those where higher is better (the rest: lower is better)
METRICS = {"classification": ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "log_loss",
                              "brier", "ece"),
           "regression": ("rmse", "mae", "r2")}
HIGHER_IS_BETTER = {"accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "r2"}


def direction(name: str) -> str:
    """``maximize`` or ``minimize`` for metric ``name`` (``auto``: the validation metric, log loss or RMSE),
    in Optuna's words; an unknown name is an error naming the known ones."""
    name = getattr(name, "value", name)  # config.Objective, as the config holds it
    known = {"auto", *METRICS["classification"], *METRICS["regression"]}
    if name not in known:
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(sorted(known))})")
    return "maximize" if name in HIGHER_IS_BETTER else "minimize"


def objective_metric(objective, task: str) -> str:
    """The metric a config's ``objective`` (``config.Objective`` or its name) names for ``task``: itself, or
    for ``auto`` the validation metric training watches."""
    objective = getattr(objective, "value", objective)
    return VALIDATION_METRIC[task][0] if objective == "auto" else objective
