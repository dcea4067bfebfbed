"""scikit-learn estimators over :class:`TabularPipeline`: ``TabularClassifier`` and ``TabularRegressor``.

They take the pipeline's settings (minus ``task_type``, which the class fixes) and follow scikit-learn's
conventions where the pipeline follows tabtune's, so that ``clone``, ``Pipeline``, ``cross_val_score`` and
``GridSearchCV`` treat them like any estimator:

- **inputs**: a DataFrame goes to the pipeline as it is (categorical, text and date columns, missing values);
  any other array-like is validated as a numeric 2-D array (NaN allowed: the preprocessor fills it; inf, complex,
  sparse, 1-D, empty are ValueError/TypeError as scikit-learn words them). ``n_features_in_`` and
  ``feature_names_in_`` are set by ``fit``; later tables must have the same columns in the same order
  (scikit-learn's rule; the pipeline itself matches by name and ignores extra columns).
- **errors**: bad input or settings raise :class:`TabTuneValueError`, which is both the pipeline's
  ``TabTuneError`` and the ``ValueError`` scikit-learn's tools and checks expect.
- **fitted state**: ``pipeline_`` (the fitted :class:`TabularPipeline`: ``save``, ``evaluate``, ``summary``),
  ``classes_`` (classifier: ``numpy.unique(y)``, the column order of ``predict_proba``).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (check_array, check_consistent_length, check_is_fitted, column_or_1d,
                                      validate_data)

from .errors import TabTuneError
from .pipeline import TabularPipeline


class TabTuneValueError(TabTuneError, ValueError):
    """A :class:`TabTuneError` raised through the estimators: also a ``ValueError``, as scikit-learn expects."""


@contextmanager
def _value_errors():
    try:
        yield
    except TabTuneError as exc:
        if isinstance(exc, ValueError):
            raise
        raise TabTuneValueError(*exc.args).with_traceback(exc.__traceback__) from None


class _TabularEstimator(BaseEstimator):
    _task: str

    def __init__(self, model_name: str = "nano", tuning_strategy: str = "inference",
                 tuning_params: dict | None = None, model_params: dict | None = None,
                 peft_config: dict | None = None, device: str | None = None, seed: int = 0,
                 text_columns: list | None = None, text_features: int = 8):
        self.model_name = model_name
        self.tuning_strategy = tuning_strategy
        self.tuning_params = tuning_params
        self.model_params = model_params
        self.peft_config = peft_config
        self.device = device
        self.seed = seed
        self.text_columns = text_columns
        self.text_features = text_features

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # filled by the preprocessor (median plus a missing indicator)
        return tags

    def _random_weights(self) -> bool:
        """Random weights (``model_params={"pretrained": False}``, for tests) carry no prior: poor scores."""
        params = self.model_params if isinstance(self.model_params, dict) else {}
        return params.get("pretrained", True) is False

    # ---- validation ------------------------------------------------------------------------
    def _validate_X(self, X, reset: bool = False):
        """``X`` as the pipeline takes it: a DataFrame as it is, anything else as a 2-D array."""
        if isinstance(X, pd.DataFrame) and (reset or self._fitted_on_frame):
            # names and count only: the columns keep their own types for the preprocessor
            X = validate_data(self, X, reset=reset, skip_check_array=True)
            if X.shape[0] < 1 or X.shape[1] < 1:
                raise ValueError(f"Found array with {X.shape[0]} sample(s) and {X.shape[1]} feature(s) "
                                 f"(shape={X.shape}) while a minimum of 1 is required by {type(self).__name__}.")
            return X
        if reset or not self._fitted_on_frame:
            return validate_data(self, X, reset=reset, dtype="numeric", ensure_all_finite="allow-nan")
        # an array for a pipeline fitted on a DataFrame: columns by position, types checked by the pipeline
        return validate_data(self, X, reset=reset, dtype=None, ensure_all_finite=False)

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X, y):
        """Fit the pipeline on ``(X, y)`` (the training rows become the model's context); returns ``self``."""
        if y is None:
            raise ValueError(f"This {type(self).__name__} estimator requires y to be passed, "
                             f"but the target y is None.")
        X = self._validate_X(X, reset=True)
        self._fitted_on_frame = isinstance(X, pd.DataFrame)
        y = column_or_1d(y, warn=True)
        y = check_array(y, ensure_2d=False, dtype="numeric" if self._task == "regression" else None,
                        input_name="y", estimator=self)
        check_consistent_length(X, y)
        if len(y) < 2:  # every column would be constant: the preprocessor keeps none
            raise ValueError(f"{type(self).__name__} needs at least 2 training rows (its context), "
                             f"got n_samples={len(y)}")
        y = self._check_target(y)
        pipeline = TabularPipeline(
            model_name=self.model_name, task_type=self._task, tuning_strategy=self.tuning_strategy,
            tuning_params=self.tuning_params, model_params=self.model_params, peft_config=self.peft_config,
            device=self.device, seed=self.seed, text_columns=self.text_columns, text_features=self.text_features)
        with _value_errors():
            self.pipeline_ = pipeline.fit(X, y)
        return self

    def _check_target(self, y: np.ndarray) -> np.ndarray:
        return y


class TabularClassifier(ClassifierMixin, _TabularEstimator):
    """A tabular foundation model as a scikit-learn classifier (default model: nano, its weights shipped).

    Parameters are :class:`TabularPipeline`'s, without ``task_type``. Fitted attributes: ``classes_``,
    ``n_features_in_``, ``feature_names_in_`` (DataFrame input with string column names), ``pipeline_``.
    """

    _task = "classification"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = self._random_weights()
        return tags

    def _check_target(self, y):
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise TabTuneValueError(f"y has 1 class ({self.classes_[0]!r}); a classifier needs at least 2 classes")
        return y

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, one column per class of ``classes_``, in that order."""
        check_is_fitted(self)
        X = self._validate_X(X)
        with _value_errors():
            proba = self.pipeline_.predict_proba(X)
        # the pipeline orders its classes its own way; ``classes_`` is numpy.unique(y)
        order = self.pipeline_.label_encoder_.transform(pd.Series(self.classes_, dtype=object))
        return proba[:, order]

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, from ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]


class TabularRegressor(RegressorMixin, _TabularEstimator):
    """A tabular foundation model as a scikit-learn regressor (default model: TabICL, which needs its
    checkpoint: ``model_params={"checkpoint": ...}``, or ``allow_download``).

    Parameters are :class:`TabularPipeline`'s, without ``task_type``. Fitted attributes: ``n_features_in_``,
    ``feature_names_in_`` (DataFrame input with string column names), ``pipeline_``.
    """

    _task = "regression"

    def __init__(self, model_name: str = "tabicl", tuning_strategy: str = "inference",
                 tuning_params: dict | None = None, model_params: dict | None = None,
                 peft_config: dict | None = None, device: str | None = None, seed: int = 0,
                 text_columns: list | None = None, text_features: int = 8):
        super().__init__(model_name=model_name, tuning_strategy=tuning_strategy, tuning_params=tuning_params,
                         model_params=model_params, peft_config=peft_config, device=device, seed=seed,
                         text_columns=text_columns, text_features=text_features)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.regressor_tags.poor_score = self._random_weights()
        return tags

    def _check_target(self, y):
        return np.asarray(y, dtype=np.float64)

    def predict(self, X) -> np.ndarray:
        """Predicted values, in the target's own units."""
        check_is_fitted(self)
        X = self._validate_X(X)
        with _value_errors():
            return np.asarray(self.pipeline_.predict(X), dtype=np.float64).reshape(-1)
