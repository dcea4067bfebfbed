"""A new table checked against the training schema: the one check behind ``TabularPipeline.predict`` and the CLI.

``check_schema(state, frame)`` reads a fitted preprocessor's JSON state (``input_columns``: what ``fit`` saw;
``columns``: what the model reads, each with its kind) and returns the frame the preprocessor may transform:

- **order**: columns are matched by name, never by position; the result holds the model's columns in training
  order. A 2-D array (no names) must have exactly the training columns, in training order.
- **missing**: a column the model reads that the table lacks is an error naming every such column. A training
  column the preprocessor dropped (constant, ID-like; ``state["dropped"]``) may be absent.
- **extra**: a column training never saw is ignored, with one logged warning naming them all. (The CLI drops
  the run's target, ``dataset.drop_columns`` and the ``id=`` column itself, so those do not warn.)
- **duplicated**: a column the model reads that appears twice is an error (which one is meant is unknowable).
- **types**: a numeric column holding a value that is not a number, or a date column holding a value that is
  not a date (numbers included), is an error naming the column and the first such value. Missing values
  (empty cells, NaN, None) are fine everywhere: they are filled as in training.
- **unseen categories**: a categorical value training never saw is read as the column's "unknown" level, the
  same as a missing value (codes: the shared extra code; one-hot: all zeros); one logged warning per column
  gives the count and an example. Free-text columns (and every string column for ContextTab, which embeds its
  cells) have no unseen values: each cell is embedded as it is.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

from ..errors import TabTuneError
from .preprocess import _to_datetime

log = logging.getLogger("tabtune")

NUMERIC_KINDS = {"numeric", "number"}      # the shared preprocessor's kind, ContextTab's
DATE_KINDS = {"datetime", "date"}
CATEGORY_KINDS = {"categorical", "one-hot"}
SHOWN = 8  # column names listed in one message
_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_schema(state: dict, frame) -> pd.DataFrame:
    """Return ``frame``'s columns that the model reads, in training order, after the checks in the module doc."""
    inputs = [str(c) for c in state.get("input_columns") or []]
    specs = state["columns"]
    if not isinstance(frame, pd.DataFrame):
        values = np.asarray(frame)
        if values.ndim != 2 or values.shape[1] != len(inputs):
            raise TabTuneError(f"an array of shape {values.shape} has no column names: the model was trained on "
                               f"{len(inputs)} columns ({_names(inputs)}); pass a DataFrame with those columns")
        frame = pd.DataFrame(values, columns=inputs)
    by_name: dict[str, list] = {}
    for label in frame.columns:
        by_name.setdefault(str(label), []).append(label)
    needed = [str(spec["name"]) for spec in specs]
    missing = [name for name in needed if name not in by_name]
    if missing:
        raise TabTuneError(f"the table lacks {len(missing)} column(s) the model was trained with: {_names(missing)}")
    doubled = [name for name in needed if len(by_name[name]) > 1]
    if doubled:
        raise TabTuneError(f"the table has more than one column named {_names(doubled)}")
    known = set(inputs) | set(needed)
    extra = [str(label) for label in frame.columns if str(label) not in known]
    if extra:
        log.warning("ignoring %d column(s) the model was not trained with: %s", len(extra), _names(extra))
    out = frame[[by_name[name][0] for name in needed]].set_axis([spec["name"] for spec in specs], axis=1)
    for position, (spec, name) in enumerate(zip(specs, needed)):
        col = out.iloc[:, position]
        if spec["kind"] in NUMERIC_KINDS:
            _check_numbers(name, col)
        elif spec["kind"] in DATE_KINDS:
            _check_dates(name, col)
        elif spec["kind"] in CATEGORY_KINDS:
            _warn_unseen(name, col, spec["categories"])
    return out


def _check_numbers(name: str, col: pd.Series) -> None:
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return
    present = col[col.notna()].astype(object)
    if pd.api.types.is_datetime64_any_dtype(col) or pd.api.types.is_timedelta64_dtype(col):
        bad = present
    else:
        # exactly the values the preprocessor would otherwise turn into NaN without a word
        bad = present[pd.to_numeric(present, errors="coerce").isna()]
    if len(bad):
        raise TabTuneError(f"column {name!r} was numeric in training but {len(bad)} of its values are not numbers "
                           f"(e.g. {bad.iloc[0]!r})")


def _check_dates(name: str, col: pd.Series) -> None:
    if pd.api.types.is_datetime64_any_dtype(col):
        return
    present = col[col.notna()].astype(object)
    if present.empty:
        return
    numbers = present.map(lambda v: isinstance(v, (int, float, np.number)) or bool(_NUMBER.fullmatch(str(v))))
    bad = present[numbers]
    if bad.empty:
        try:
            parsed = _to_datetime(present.astype(str))
        except (ValueError, TypeError):  # e.g. mixed time zones: the preprocessor cannot read them either
            parsed = pd.Series(pd.NaT, index=present.index)
        bad = present[parsed.isna()]
    if len(bad):
        raise TabTuneError(f"column {name!r} held dates in training but {len(bad)} of its values are not dates "
                           f"(e.g. {bad.iloc[0]!r})")


def _warn_unseen(name: str, col: pd.Series, categories: list[str]) -> None:
    present = col[col.notna()]
    unseen = present[~present.map(str).isin(set(categories))]
    if len(unseen):
        log.warning("column %r: %d value(s) not seen in training (e.g. %r) are read as unknown, like a missing "
                    "value", name, len(unseen), unseen.iloc[0])
