"""The checks a table passes before tabtune fits on it: the one place behind ``load_dataset`` (the command
line) and ``TabularPipeline.fit`` (the library), so both say the same thing about the same table.

``check_table(frame, source)`` raises a one-line :class:`TabTuneError` naming ``source`` and the column for
what cannot work, and returns (after logging each as a warning) the automatic treatments of the rest — the
command line records them in the run's manifest (``run.json`` → ``provenance.dataset.treatments``):

=========================================  ==================================================================
case                                       what happens
=========================================  ==================================================================
the same column name twice                 error naming the name (a CSV's header is read as written: pandas
                                           would silently rename the second ``a`` to ``a.1``)
nested values (lists, dicts, arrays)       error naming the column (flatten it, or drop it)
infinite values in a feature               read as missing (filled, and flagged by the missing indicator)
infinite or nested values in the target    error naming the target
a number beyond ±1e150 (a sentinel?)       error naming the column and value (its mean and spread overflow)
a column with no values at all             dropped (it carries nothing)
numbers and text in one column             read as categories, not numbers (say ``12`` and ``?``: clean
                                           the column if it is meant to be numeric)
a categorical column with > 10,000 levels  kept as codes by training frequency, with a warning: such codes
                                           carry little signal; drop the column or declare it text
free text (see ``preprocess.is_text``)     read through sentence embeddings (``text_features`` numeric
                                           features per column; ContextTab embeds the cells itself)
=========================================  ==================================================================

What the splits do with classes too small to split, and how files are read, is in ``split.py`` and ``io.py``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np
import pandas as pd

from ..errors import TabTuneError

log = logging.getLogger("tabtune")

MANY_LEVELS = 10_000  # a categorical column with more distinct values than this gets a warning
HUGE = 1e150          # beyond this magnitude a column's mean and spread overflow float64
SHOWN = 8             # names listed in one message
_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*|\s*[-+]?(inf|infinity|nan)\s*", re.I)
_NESTED = (list, tuple, dict, set, frozenset, np.ndarray)


def names(items) -> str:
    """``'a', 'b' and 3 more``: a list of names for one line."""
    items = list(items)
    shown = ", ".join(repr(n) for n in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def check_names(columns, source: str) -> None:
    """Refuse a header holding the same name twice (which of the two is meant cannot be known)."""
    labels = [str(c) for c in columns]
    counts = Counter(labels)
    doubled = [name for name, count in counts.items() if count > 1]
    if doubled:
        positions = ", ".join(str(i + 1) for i, name in enumerate(labels) if name == doubled[0])
        what = (f"the column name {doubled[0]!r} appears {counts[doubled[0]]} times" if len(doubled) == 1 else
                f"{len(doubled)} column names appear more than once ({names(doubled)}); {doubled[0]!r}")
        raise TabTuneError(f"{source}: {what} (columns {positions}); rename or drop the extra ones")


def _treatment(notes: list, quiet: bool, case: str, source: str, column, message: str) -> None:
    message = f"{source}: {message}"
    notes.append({"case": case, "source": source, "column": None if column is None else str(column),
                  "message": message})
    if not quiet:
        log.warning(message)


def _nested(col: pd.Series) -> bool:
    dtype = col.dtype
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow as pa

        return pa.types.is_nested(dtype.pyarrow_dtype)
    if not pd.api.types.is_object_dtype(dtype):
        return False
    return bool(col.map(lambda v: isinstance(v, _NESTED)).any())


def _infinite(col: pd.Series) -> int:
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        return 0
    values = col.to_numpy(dtype="float64", na_value=np.nan)
    return int(np.isinf(values).sum())


def _huge(col: pd.Series):
    """The first finite value of a numeric column too large to standardise, or None."""
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        return None
    values = col.to_numpy(dtype="float64", na_value=np.nan)
    huge = np.isfinite(values) & (np.abs(values) > HUGE)
    return values[huge][0] if huge.any() else None


def _too_large(source: str, what: str, value) -> TabTuneError:
    return TabTuneError(f"{source}: {what} holds {value:g}, beyond the ±{HUGE:g} that can be standardised "
                        f"(a placeholder for a missing value? leave the cell empty instead)")


def _is_number(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    return isinstance(value, str) and bool(_NUMBER.fullmatch(value))


def check_target(y: pd.Series, source: str) -> None:
    """Refuse a target that no model can learn from: nested or infinite values (missing ones are the caller's)."""
    if _nested(y):
        raise TabTuneError(f"{source}: target column {str(y.name)!r} holds lists or other nested values; "
                           f"a target needs one plain value per row")
    infinite = _infinite(y)
    if infinite:
        raise TabTuneError(f"{source}: target column {str(y.name)!r} has {infinite} infinite value(s); "
                           f"drop those rows first")
    huge = _huge(y)
    if huge is not None:
        raise _too_large(source, f"target column {str(y.name)!r}", huge)


def check_table(frame: pd.DataFrame, source: str, *, target=None, text_columns: list | None = None,
                quiet: bool = False) -> list[dict]:
    """Raise a TabTuneError for what cannot work; return (and log, unless ``quiet``) the automatic treatments.

    ``target`` (a column of ``frame``) is checked as a target, every other column as a feature.
    ``text_columns`` are the columns declared free text (None: detected)."""
    from .preprocess import TEXT_MIN_DISTINCT, _is_datetime_like, is_text

    check_names(frame.columns, source)
    notes: list[dict] = []
    nested = [str(name) for name in frame.columns if _nested(frame[name])]
    if nested:
        raise TabTuneError(f"{source}: column(s) {names(nested)} hold lists or other nested values; tabtune reads "
                           f"one plain value per cell (flatten them into columns, or drop them)")
    if target is not None:
        check_target(frame[target], source)
    features = [name for name in frame.columns if target is None or name != target]
    for name in features:
        huge = _huge(frame[name])
        if huge is not None:
            raise _too_large(source, f"column {str(name)!r}", huge)
    for name in features:
        col = frame[name]
        present = col.dropna()
        if present.empty:
            _treatment(notes, quiet, "empty column", source, name,
                       f"column {str(name)!r} has no values: dropped")
            continue
        infinite = _infinite(col)
        if infinite:
            _treatment(notes, quiet, "infinities", source, name,
                       f"column {str(name)!r} has {infinite} infinite value(s): read as missing")
            continue
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            continue
        as_text = present.astype(str)
        levels = as_text.nunique()
        if not isinstance(col.dtype, pd.CategoricalDtype) and not pd.api.types.is_datetime64_any_dtype(col):
            declared = text_columns is not None
            # is_text's own first test (half the cells distinct) spares splitting a categorical column's cells
            if name in text_columns if declared else levels >= TEXT_MIN_DISTINCT * len(present) and is_text(col):
                _treatment(notes, quiet, "text", source, name,
                           f"column {str(name)!r} is free text ({'declared' if declared else 'detected'}): read "
                           f"through its sentence embeddings (text_features=0 drops it)")
                continue
            if _is_datetime_like(col):
                continue
            if pd.api.types.infer_dtype(present, skipna=True) != "string":  # Python objects of several types
                numbers = present.map(_is_number).astype(bool)
            else:  # strings: each distinct one looked at once
                distinct = pd.Series(as_text.unique(), dtype=object)
                numbers = as_text.isin(set(distinct[distinct.str.fullmatch(_NUMBER).astype(bool)]))
            if numbers.any() and not numbers.all():
                _treatment(notes, quiet, "mixed types", source, name,
                           f"column {str(name)!r} mixes {int(numbers.sum())} number(s) and {int((~numbers).sum())} "
                           f"other value(s) (e.g. {present[numbers].iloc[0]!r} and {present[~numbers].iloc[0]!r}): "
                           f"read as categories, not numbers")
                continue
        if levels > MANY_LEVELS and levels < len(col):  # all distinct, no gaps: ID-like, which the preprocessor drops
            _treatment(notes, quiet, "many levels", source, name,
                       f"column {str(name)!r} has {levels:,} distinct values: kept as codes by training frequency, "
                       f"which carry little signal (drop it, or declare it a text column)")
    return notes
