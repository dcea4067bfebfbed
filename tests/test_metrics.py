"""compute_metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tabtune_cli.evaluation.metrics import VALIDATION_METRIC, compute_metrics, expected_calibration_error

pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

CLASSIFICATION_KEYS = {"accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "log_loss", "brier", "ece"}


def test_perfect_predictions():
    y = np.array([0, 1, 2, 1, 0, 2])
    m = compute_metrics("classification", y, np.eye(3)[y])
    assert set(m) == CLASSIFICATION_KEYS
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc"):
        assert m[key] == pytest.approx(1.0), key
    assert m["log_loss"] == pytest.approx(0.0, abs=1e-9)
    assert m["brier"] == pytest.approx(0.0, abs=1e-12)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


def test_all_wrong_confident_predictions():
    y = np.array([0, 1, 0, 1])
    proba = np.eye(2)[1 - y] * 0.98 + 0.01  # 0.99 on the wrong class
    m = compute_metrics("classification", y, proba)
    assert m["accuracy"] == 0.0 and m["roc_auc"] == 0.0
    assert m["log_loss"] == pytest.approx(-math.log(0.01))
    assert m["brier"] == pytest.approx(0.99 ** 2 + 0.99 ** 2)
    assert m["ece"] == pytest.approx(0.99)  # confidence 0.99, accuracy 0


def test_known_ece():
    # four rows at confidence 0.9 (3 right) and two at 0.7 (1 right), in different 1/15-wide bins
    y = np.array([1, 1, 1, 0, 0, 1])
    proba = np.array([[0.1, 0.9]] * 4 + [[0.7, 0.3]] * 2)
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.5 - 0.7)
    assert expected_calibration_error(y, proba) == pytest.approx(expected)
    assert compute_metrics("classification", y, proba)["ece"] == pytest.approx(expected)
    # one bin for everything: |mean accuracy - mean confidence|
    assert expected_calibration_error(y, proba, n_bins=1) == pytest.approx(abs(4 / 6 - (4 * 0.9 + 2 * 0.7) / 6))


def test_ece_counts_confidence_one_in_the_top_bin():
    y = np.array([0, 1])
    proba = np.array([[1.0, 0.0], [1.0, 0.0]])  # confidence exactly 1.0: one right, one wrong
    assert expected_calibration_error(y, proba) == pytest.approx(0.5)


def test_multiclass_brier_log_loss_and_accuracy():
    y = np.array([0, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    m = compute_metrics("classification", y, proba)
    # row 1: .3^2 + .2^2 + .1^2 = .14; row 2: .1^2 + .7^2 + .6^2 = .86
    assert m["brier"] == pytest.approx((0.14 + 0.86) / 2)
    assert m["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert m["accuracy"] == pytest.approx(0.5)  # second row predicts class 2


def test_binary_roc_auc_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics("classification", y, np.column_stack([1 - p1, p1]))
    # positive/negative pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)  # 0.35 is called class 0


def test_multiclass_roc_auc_is_the_macro_one_vs_rest():
    y = np.array([0, 1, 2, 2])
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    # class 0: 1.0; class 1: 1.0; class 2: positives (.7, .3) vs negatives (.1, .3) -> 3.5 / 4
    assert compute_metrics("classification", y, proba)["roc_auc"] == pytest.approx((1 + 1 + 0.875) / 3)


def test_roc_auc_is_none_for_a_single_class_but_the_rest_is_computed():
    y = np.array([1, 1, 1])
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics("classification", y, proba)
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(0.9)) / 3)
    json.dumps(m)  # None serialises as null


def test_roc_auc_macro_over_the_classes_present():
    # three columns, but class 2 never occurs in y_true: it is left out of the macro average
    y = np.array([0, 1, 1, 0])
    proba = np.array([[0.5, 0.2, 0.3], [0.2, 0.6, 0.2], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8]])
    # class 0: positives (.5, .1) vs negatives (.2, .4) -> 2 / 4; class 1: (.6, .3) vs (.2, .1) -> 4 / 4
    assert compute_metrics("classification", y, proba)["roc_auc"] == pytest.approx((0.5 + 1.0) / 2)


def test_perfect_predictions_score_full_f1_when_a_class_is_absent_from_the_test_rows():
    y = np.array([0, 1, 1, 0])
    m = compute_metrics("classification", y, np.eye(3)[y])  # the model knows 3 classes; the test rows hold 2
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["roc_auc"] == 1.0
    assert m["f1_macro"] == pytest.approx(1.0)


def test_f1_macro_and_weighted_by_hand():
    y = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 1, 1])
    m = compute_metrics("classification", y, np.eye(2)[pred] * 0.8 + 0.1)
    f1_0 = 2 * 1.0 * (2 / 3) / (1.0 + 2 / 3)  # precision 1, recall 2/3
    f1_1 = 2 * 0.5 * 1.0 / (0.5 + 1.0)        # precision 1/2, recall 1
    assert m["f1_macro"] == pytest.approx((f1_0 + f1_1) / 2)
    assert m["f1_weighted"] == pytest.approx((3 * f1_0 + f1_1) / 4)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_probabilities_that_do_not_quite_sum_to_one_are_renormalised():
    # low-precision model outputs (TabICL's bf16 softmax) need not sum to exactly one
    y = np.array([0, 1, 1])
    raw = np.array([[0.70, 0.31], [0.40, 0.59], [0.20, 0.79]])
    exact = raw / raw.sum(axis=1, keepdims=True)
    a, b = compute_metrics("classification", y, raw), compute_metrics("classification", y, exact)
    for key in CLASSIFICATION_KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a["log_loss"] == pytest.approx(-(math.log(exact[0, 0]) + math.log(exact[1, 1]) + math.log(exact[2, 1])) / 3)


def test_regression_metrics_by_hand():
    m = compute_metrics("regression", np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    assert set(m) == {"rmse", "mae", "r2"}
    assert m["rmse"] == pytest.approx(0.5)   # sqrt(1 / 4)
    assert m["mae"] == pytest.approx(0.25)
    assert m["r2"] == pytest.approx(0.8)     # 1 - 1 / 5


def test_regression_constant_prediction_at_the_mean_has_r2_zero():
    y = np.array([2.0, 4.0, 6.0, 8.0])
    m = compute_metrics("regression", y, np.full(4, 5.0))
    assert m["r2"] == pytest.approx(0.0)
    assert m["rmse"] == pytest.approx(math.sqrt((9 + 1 + 1 + 9) / 4))
    assert m["mae"] == pytest.approx(2.0)


def test_values_are_plain_floats_ready_for_json():
    m = compute_metrics("classification", np.array([0, 1, 1]), np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]))
    assert all(type(v) is float for v in m.values())
    assert json.loads(json.dumps(m)) == m
    r = compute_metrics("regression", np.array([1.0, 2.0]), np.array([1.5, 2.5]))
    assert all(type(v) is float for v in r.values())


def test_validation_metric_is_lower_is_better_and_reported():
    for kind, (name, lower_is_better) in VALIDATION_METRIC.items():
        assert lower_is_better is True
        y = np.array([0, 1]) if kind == "classification" else np.array([0.0, 1.0])
        pred = np.array([[0.8, 0.2], [0.3, 0.7]]) if kind == "classification" else np.array([0.1, 0.9])
        assert name in compute_metrics(kind, y, pred)
