"""scikit-learn compatibility: ``TabularClassifier`` / ``TabularRegressor`` pass scikit-learn's own estimator
checks, and work on numpy arrays and DataFrames inside ``clone``, ``Pipeline``, ``cross_val_score`` and
``GridSearchCV``.

Models (all offline, CPU, one ensemble member):

- classifier: nano with its shipped weights (no calibration), so the checks' accuracy bar (0.83 on blobs) is met
  by a real model, not waived;
- regressor: TabICL's random-weight tiny size (no regression checkpoint ships with tabtune). Random weights set
  the ``regressor_tags.poor_score`` tag, so ``check_regressors_train`` skips its R^2 > 0.5 assertion (a model
  with no prior has nothing to regress with) and runs the rest;
- peft: random-weight tiny nano trained for one epoch of two steps, on the checks that training can affect
  (``PEFT_CHECKS``); the others go through the same estimator code as the inference classifier. Random weights
  set ``classifier_tags.poor_score`` here too.

Every check sklearn generates for these estimators is run; ``EXPECTED_FAILED`` lists those expected to fail
(none), ``SKIPPED`` those sklearn skips itself, ``NOT_GENERATED`` those it does not generate for these
estimators' tags, each with why; ``test_not_generated`` keeps that list true.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs, make_regression
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (check_dataframe_column_names_consistency, estimator_checks_generator,
                                            parametrize_with_checks)

from conftest import make_table
from tabtune_cli import TabTuneError, TabularClassifier, TabularPipeline, TabularRegressor

NANO = {"n_estimators": 1, "calibrate": False}
RANDOM_NANO = {"pretrained": False, "size": "tiny", "n_estimators": 1, "calibrate": False}
RANDOM_TABICL = {"pretrained": False, "size": "tiny", "n_estimators": 1}
# one epoch of two steps on small episodes, one validation pass each side of it, at a rate that moves the adapters
PEFT_PARAMS = {"epochs": 1, "steps_per_epoch": 2, "context_size": 32, "query_size": 16, "batch_size": 1,
               "learning_rate": 1e-2, "warmup_steps": 0, "val_max_rows": 32, "val_n_estimators": 1,
               "show_progress": False}

CLASSIFIER = TabularClassifier(model_params=NANO, device="cpu")
REGRESSOR = TabularRegressor("tabicl", model_params=RANDOM_TABICL, device="cpu")
PEFT = TabularClassifier(tuning_strategy="peft", tuning_params=PEFT_PARAMS, model_params=RANDOM_NANO, device="cpu")

EXPECTED_FAILED: dict[str, str] = {}  # none: every generated check passes on both estimators

SKIPPED = {
    "check_array_api_input": "sklearn skips it unless SCIPY_ARRAY_API=1; tabtune computes in torch and takes numpy "
                             "and pandas input only (array_api_support is False, so only the numpy variant is "
                             "generated)",
}

NOT_GENERATED = {
    "check_estimators_nan_inf": "allow_nan is True: NaN is a missing value the preprocessor fills (median plus a "
                                "missing indicator); infinities are still refused (test_infinity_is_refused)",
    "check_sample_weights_pandas_series": "fit takes no sample_weight: the training rows are the model's context, "
                                          "and an in-context prediction has no per-row loss to weight",
    "check_sample_weight_equivalence_on_dense_data": "no sample_weight (as above)",
    "check_class_weight_classifiers": "no class_weight parameter (class balance is read from the context)",
    "check_classifier_multioutput": "one target column per model (multi_output tag False)",
    "check_regressor_multioutput": "one target column per model (multi_output tag False); a 2-D y with several "
                                   "columns is a ValueError",
    "check_classifiers_multilabel_representation_invariance": "no multi-label targets (multi_label tag False)",
    "check_dataframe_column_names_consistency": "sklearn does not generate it for third-party estimators; run "
                                                "here by test_dataframe_column_names_consistency",
}

# what training can change: fitted state and parameters left as given, pickling of the peft-wrapped model,
# seeded refits, row-by-row predictions in eval mode, a usable classifier afterwards
PEFT_CHECKS = {"check_estimators_overwrite_params", "check_dont_overwrite_parameters", "check_estimators_pickle",
               "check_fit_idempotent", "check_methods_subset_invariance", "check_dict_unchanged",
               "check_fit_check_is_fitted", "check_classifiers_train"}


def _check_name(check) -> str:
    while hasattr(check, "func"):
        check = check.func
    return check.__name__


def _expected_failed(estimator) -> dict[str, str]:
    return EXPECTED_FAILED


@parametrize_with_checks([CLASSIFIER, REGRESSOR], expected_failed_checks=_expected_failed)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _peft_checks():
    for estimator, check in estimator_checks_generator(PEFT, mark=None):
        # the plain variant of each (the read-only-memmap and float32 variants test input handling, shared)
        if _check_name(check) in PEFT_CHECKS and not getattr(check, "keywords", None) and \
                not getattr(getattr(check, "func", None), "keywords", None):
            yield pytest.param(estimator, check, id=_check_name(check))


@pytest.mark.parametrize("estimator, check", list(_peft_checks()))
def test_sklearn_estimator_checks_peft(estimator, check):
    check(estimator)


def test_peft_checks_selected():
    assert {p.id for p in _peft_checks()} == PEFT_CHECKS


def test_not_generated():
    """The checks listed as not generated are indeed not, for either estimator (a new sklearn could add them)."""
    for estimator in (CLASSIFIER, REGRESSOR):
        names = {_check_name(check) for _, check in estimator_checks_generator(estimator, mark=None)}
        assert not names & set(NOT_GENERATED), names & set(NOT_GENERATED)
        assert set(SKIPPED) <= names


@pytest.mark.parametrize("estimator", [CLASSIFIER, REGRESSOR], ids=["classifier", "regressor"])
def test_dataframe_column_names_consistency(estimator):
    check_dataframe_column_names_consistency(type(estimator).__name__, estimator)


# ---- the estimators in use -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def churn():
    """conftest's table: six numeric columns, a string categorical, string labels (about 20% "yes")."""
    return make_table(300)


def test_dataframe_and_array(churn):
    X, y = churn
    X = X.copy()
    X.loc[::7, "f1"] = np.nan
    model = clone(CLASSIFIER).fit(X, y)
    assert list(model.classes_) == ["no", "yes"]
    assert model.n_features_in_ == 7
    assert list(model.feature_names_in_) == list(X.columns)
    proba = model.predict_proba(X)
    assert proba.shape == (300, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert set(model.predict(X)) <= {"no", "yes"}

    numeric = X.drop(columns="color")
    from_frame = clone(CLASSIFIER).fit(numeric, y)
    from_array = clone(CLASSIFIER).fit(numeric.to_numpy(), y.to_numpy())
    assert not hasattr(from_array, "feature_names_in_") and from_array.n_features_in_ == 6
    np.testing.assert_allclose(from_array.predict_proba(numeric.to_numpy()), from_frame.predict_proba(numeric),
                               atol=1e-6)
    # the fitted pipeline is the library's own: it saves and reloads as any other
    assert isinstance(model.pipeline_, TabularPipeline)


def test_saved_pipeline_predicts_the_same(churn, tmp_path):
    X, y = churn
    model = clone(CLASSIFIER).fit(X, y)
    again = TabularPipeline.load(model.pipeline_.save(tmp_path / "pipeline"))
    np.testing.assert_allclose(again.predict_proba(X), model.predict_proba(X), atol=1e-6)


def test_clone_gives_an_unfitted_equal_estimator(churn):
    X, y = churn
    fitted = clone(CLASSIFIER).fit(X, y)
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert copy.model_params is not fitted.model_params  # a deep copy: changing one leaves the other
    assert not hasattr(copy, "pipeline_") and not hasattr(copy, "classes_")
    with pytest.raises(NotFittedError):
        copy.predict(X)
    np.testing.assert_allclose(copy.fit(X, y).predict_proba(X), fitted.predict_proba(X))
    # set_params reaches the pipeline's settings
    copy.set_params(model_params=RANDOM_NANO, seed=3)
    assert copy.get_params()["model_params"] == RANDOM_NANO and copy.get_params()["seed"] == 3


def test_cross_val_score_on_an_easy_table(churn):
    X, y = churn
    scores = cross_val_score(CLASSIFIER, X, y, cv=3)
    assert scores.shape == (3,)
    assert scores.min() > 0.85, scores  # the majority class alone scores about 0.8
    # numpy input, no categorical column
    scores = cross_val_score(CLASSIFIER, X.drop(columns="color").to_numpy(), y.to_numpy(), cv=3)
    assert scores.min() > 0.85, scores


def test_inside_a_pipeline():
    X, y = make_blobs(n_samples=150, centers=3, random_state=0)
    pipe = make_pipeline(StandardScaler(), CLASSIFIER).fit(X[:100], y[:100])
    assert pipe.score(X[100:], y[100:]) > 0.9
    assert pipe.predict_proba(X[100:]).shape == (50, 3)

    X, y = make_regression(n_samples=80, n_features=4, noise=1.0, random_state=0)
    pipe = make_pipeline(StandardScaler(), REGRESSOR).fit(X[:60], y[:60])
    predicted = pipe.predict(X[60:])
    assert predicted.shape == (20,) and predicted.dtype == np.float64 and np.isfinite(predicted).all()
    # in the target's own units (random weights predict about the mean, not about 0)
    assert abs(predicted.mean() - y[:60].mean()) < y[:60].std()


def test_grid_search_picks_the_pretrained_weights(churn):
    X, y = churn
    search = GridSearchCV(clone(CLASSIFIER), {"model_params": [RANDOM_NANO, NANO]}, cv=3, scoring="neg_log_loss")
    search.fit(X, y)
    assert search.best_params_ == {"model_params": NANO}
    assert search.best_estimator_.pipeline_.model_config_.pretrained
    assert search.score(X, y) > -0.3


def test_grid_search_over_strategies():
    X, y = make_blobs(n_samples=90, centers=2, random_state=0)
    grid = [{"tuning_strategy": ["inference"]}, {"tuning_strategy": ["peft"], "peft_config": [{"r": 2}, {"r": 4}]}]
    search = GridSearchCV(clone(PEFT), grid, cv=2).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all() and len(search.cv_results_["params"]) == 3
    assert search.best_params_ in search.cv_results_["params"]
    best = search.best_estimator_.pipeline_
    assert best.strategy_.name == search.best_params_["tuning_strategy"]
    if best.is_peft:
        assert best.lora_settings_.r == search.best_params_["peft_config"]["r"]


def test_errors_are_value_errors(churn):
    X, y = churn
    with pytest.raises(ValueError, match="nope") as raised:
        TabularClassifier("nope").fit(X, y)
    assert isinstance(raised.value, TabTuneError)  # the CLI's one-line error, and sklearn's ValueError
    with pytest.raises(ValueError, match="regression"):
        TabularClassifier(model_params={"n_estimators": 1}).fit(X, np.linspace(0, 1, len(X)))  # continuous y

    model = clone(CLASSIFIER).fit(X, y)
    # sklearn's rule: the columns of fit, in the same order (TabularPipeline itself matches by name)
    with pytest.raises(ValueError, match="same order"):
        model.predict(X[X.columns[::-1]])
    with pytest.raises(ValueError, match="X has 3 features"), pytest.warns(UserWarning, match="feature names"):
        model.predict(X.iloc[:, :3].to_numpy())


def test_infinity_is_refused():
    X, y = make_blobs(n_samples=40, centers=2, random_state=0)
    X[3, 1] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        clone(CLASSIFIER).fit(X, y)
    X[3, 1] = np.nan  # a missing value is fine
    assert clone(CLASSIFIER).fit(X, y).predict(X).shape == (40,)
