"""The shared preprocessor: fitted on the training split only, its whole state is plain JSON.

Every column becomes one or more float features:
- numeric: missing values filled with the training median (plus a 0/1 missing
  indicator when training had gaps), then standardised and clipped; or, for a model whose
  package reads numbers itself (``raw_numbers``: TabICL, TabPFN, TabDPT), the user's values
  as given, a missing or non-finite value as NaN, so the package's own member preprocessing
  sees what it would see without tabtune;
- categorical (strings, booleans, categories): codes by training frequency, one
  extra code shared by missing and unseen values, then standardised; or, for a
  model that asks for it (``one_hot_max_levels``), one 0/1 column per level when
  training saw more than two and at most that many (missing and unseen values:
  all zeros);
- datetimes: year, month, day, weekday and days since the epoch, as numeric;
- text (free-text columns: declared, or detected by :func:`is_text`): ``text_features`` numeric
  features per column, the leading principal components of the cells' sentence embeddings
  (``data.text``), fitted on the training rows and standardised; ``text_features=0`` drops them;
- constant columns and ID-like columns (all-distinct strings, or all-distinct
  integers forming a run) are dropped.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import TabTuneError
from .text import apply_text_features, fit_text_features, shared_encoder

CLIP = 4.0  # standardised values beyond this many deviations are clipped
DATE_PARTS = ("year", "month", "day", "dayofweek")


def _is_datetime_like(col: pd.Series) -> bool:
    if pd.api.types.is_datetime64_any_dtype(col):
        return True
    if not (pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)):
        return False
    sample = col.dropna().astype(str).head(200)
    # a date has a 4-digit year or digits joined by - / . (month names and "1st" are not dates)
    if sample.empty or not sample.str.contains(r"\d{4}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}", regex=True).all():
        return False
    if sample.str.fullmatch(r"[-+]?\d+(\.\d*)?").any():
        return False
    parsed = pd.to_datetime(sample, errors="coerce", format="mixed")
    return parsed.notna().mean() >= 0.95


def _to_datetime(col: pd.Series) -> pd.Series:
    out = pd.to_datetime(col, errors="coerce", format="mixed")
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert(None)
    return out


def _date_features(col: pd.Series) -> pd.DataFrame:
    dt = _to_datetime(col)
    parts = {p: getattr(dt.dt, p).astype("float64") for p in DATE_PARTS}
    # seconds since the epoch in the column's own unit, so dates past 2262 (9999-12-31) do not overflow
    seconds = dt.astype("datetime64[s]").astype("int64").astype("float64")
    parts["days"] = np.where(dt.isna(), np.nan, seconds / 86400.0)
    return pd.DataFrame(parts, index=col.index)


TEXT_MIN_WORDS = 3      # a text column's cells average at least this many words...
TEXT_MIN_DISTINCT = 0.5  # ...and at least this share of them are distinct


def is_text(col: pd.Series) -> bool:
    """True for free text: strings averaging 3+ words, at least half of them distinct (a review, a title).

    Categories (few distinct values) and codes (one word) stay categorical."""
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col) or _is_datetime_like(col):
        return False
    values = col.dropna().astype(str)
    if values.empty:
        return False
    return bool(values.str.split().str.len().mean() >= TEXT_MIN_WORDS
                and values.nunique() >= TEXT_MIN_DISTINCT * len(values))


def text_cells(col: pd.Series) -> list[str]:
    """The cells of a text column as strings to embed; a missing cell is the empty string."""
    return ["" if pd.isna(v) else str(v) for v in col]


def _json_value(v):
    """A label or category as a JSON-safe Python value."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


class Preprocessor:
    """Fit on the training features, then map any table with the same columns to float arrays."""

    def __init__(self, state: dict | None = None, one_hot_max_levels: int = 0, text_columns: list | None = None,
                 text_features: int = 8, raw_numbers: bool = False):
        self.state, self.one_hot_max_levels = state, one_hot_max_levels
        self.text_columns, self.text_features, self.raw_numbers = text_columns, text_features, raw_numbers

    @property
    def _raw(self) -> bool:
        """Numeric columns pass as given (a saved state says so; states written before the option did not)."""
        return bool(self.state.get("raw_numbers", False)) if self.state else self.raw_numbers

    # ---- fitting -------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame, y: pd.Series | None = None) -> "Preprocessor":
        """Fit on the training features (``y`` is accepted for the scikit-learn convention and not read)."""
        columns, dropped = [], {}
        n = len(frame)
        text = declared_text_columns(frame, self.text_columns)
        for name in frame.columns:
            col = frame[name]
            non_null = col.dropna()
            if non_null.nunique() <= 1:
                dropped[str(name)] = "constant"
                continue
            if name in text or (self.text_columns is None and is_text(col)):
                if self.text_features < 1:
                    dropped[str(name)] = "text"
                    continue
                embeddings = shared_encoder().encode(text_cells(col))
                features = fit_text_features(embeddings, self.text_features)
                std = self._project(features, embeddings).std(axis=0)
                columns.append({"name": name, "kind": "text", "features": features,
                                "std": [float(s) if s > 0 else 1.0 for s in std]})
                continue
            if _is_datetime_like(col):
                feats = _date_features(col)
                columns.append({"name": name, "kind": "datetime", "stats": self._numeric_stats(feats)})
                continue
            numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
            if self._is_id_like(col, numeric, n):
                dropped[str(name)] = "id-like"
                continue
            if numeric:
                values = col.astype("float64")
                columns.append({"name": name, "kind": "numeric", "stats": self._numeric_stats(values.to_frame())})
            else:
                counts = col.dropna().astype(str).value_counts(sort=True)
                categories = sorted(counts.index, key=lambda c: (-counts[c], c))
                if 2 < len(categories) <= self.one_hot_max_levels:  # two levels: one 0/1 code says it all
                    columns.append({"name": name, "kind": "one-hot", "categories": categories})
                    continue
                codes = self._category_codes(col, categories)
                mean, std = float(codes.mean()), float(codes.std(ddof=0)) or 1.0
                columns.append({"name": name, "kind": "categorical", "categories": categories, "mean": mean, "std": std})
        if not columns:
            raise TabTuneError("no usable feature columns: every column is constant or ID-like "
                               f"({', '.join(f'{k}: {v}' for k, v in dropped.items())})")
        self.state = {"columns": columns, "dropped": dropped, "input_columns": [str(c) for c in frame.columns],
                      "raw_numbers": self.raw_numbers}
        return self

    @staticmethod
    def _project(features: dict, embeddings: np.ndarray) -> np.ndarray:
        return apply_text_features(features, embeddings).astype("float64")

    @staticmethod
    def _is_id_like(col: pd.Series, numeric: bool, n: int) -> bool:
        if n < 20 or col.isna().any() or col.nunique() != n:
            return False
        if not numeric:
            return True
        if pd.api.types.is_integer_dtype(col):
            ordered = np.sort(col.to_numpy())
            return bool((np.diff(ordered) == 1).all())
        return False

    @staticmethod
    def _numeric_stats(frame: pd.DataFrame) -> list[dict]:
        stats = []
        for name in frame.columns:
            values = frame[name].astype("float64")
            values = values.where(np.isfinite(values))
            median = values.median()
            median = 0.0 if math.isnan(median) else float(median)
            filled = values.fillna(median)
            std = float(filled.std(ddof=0))
            stats.append({"part": str(name), "median": median, "mean": float(filled.mean()),
                          "std": std if std > 0 else 1.0, "missing_indicator": bool(values.isna().any())})
        return stats

    @staticmethod
    def _category_codes(col: pd.Series, categories: list[str]) -> pd.Series:
        lookup = {c: i for i, c in enumerate(categories)}
        # missing and unseen values share the code after the last known category
        return col.map(lambda v: lookup.get(str(v), len(categories)) if pd.notna(v) else len(categories)).astype("float64")

    # ---- transforming --------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        names = []
        for spec in self._columns:
            if spec["kind"] == "categorical":
                names.append(str(spec["name"]))
                continue
            if spec["kind"] == "one-hot":
                names.extend(f"{spec['name']}={c}" for c in spec["categories"])
                continue
            if spec["kind"] == "text":
                names.extend(f"{spec['name']}.text{i}" for i in range(len(spec["std"])))
                continue
            raw = spec["kind"] == "numeric" and self._raw
            for st in spec["stats"]:
                base = str(spec["name"]) if spec["kind"] == "numeric" else f"{spec['name']}.{st['part']}"
                names.append(base)
                if st["missing_indicator"] and not raw:
                    names.append(f"{base}.missing")
        return names

    @property
    def _columns(self) -> list[dict]:
        if self.state is None:
            raise TabTuneError("the preprocessor is not fitted")
        return self.state["columns"]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the feature matrix for ``frame`` (its columns must include the fitted ones): float32, or float64
        with ``raw_numbers``."""
        missing = [str(s["name"]) for s in self._columns if s["name"] not in frame.columns]
        if missing:
            raise TabTuneError(f"column {missing[0]!r} is missing from the table (the model was fitted with it)")
        blocks = []
        for spec in self._columns:
            col = frame[spec["name"]]
            if spec["kind"] == "categorical":
                codes = self._category_codes(col, spec["categories"]).to_numpy()
                blocks.append(((codes - spec["mean"]) / spec["std"])[:, None])
                continue
            if spec["kind"] == "one-hot":
                codes = self._category_codes(col, spec["categories"]).to_numpy()
                blocks.append((codes[:, None] == np.arange(len(spec["categories"]))).astype("float64"))
                continue
            if spec["kind"] == "text":
                projected = self._project(spec["features"], shared_encoder().encode(text_cells(col)))
                blocks.append(np.clip(projected / np.asarray(spec["std"]), -CLIP, CLIP))
                continue
            if spec["kind"] == "datetime":
                parts = _date_features(col)
            else:
                values = pd.to_numeric(col, errors="coerce") if not pd.api.types.is_numeric_dtype(col) else col
                parts = values.astype("float64").to_frame(name=str(spec["name"]))
                if self._raw:  # the user's numbers; the package fills and scales them itself
                    values = parts.iloc[:, 0].to_numpy(dtype="float64")
                    blocks.append(np.where(np.isfinite(values), values, np.nan)[:, None])
                    continue
            for st, part in zip(spec["stats"], parts.columns):
                values = parts[part].to_numpy(dtype="float64")
                gap = ~np.isfinite(values)
                values = np.where(gap, st["median"], values)
                blocks.append(np.clip((values - st["mean"]) / st["std"], -CLIP, CLIP)[:, None])
                if st["missing_indicator"]:
                    blocks.append(gap.astype("float64")[:, None])
        # float64 where the user's numbers pass through: float32 would round a value like 10,000.3 to 10,000.2998,
        # and a package's quantile and power transforms are not blind to that
        return np.hstack(blocks).astype(np.float64 if self._raw else np.float32)

    def fit_transform(self, frame: pd.DataFrame) -> np.ndarray:
        return self.fit(frame).transform(frame)

    # ---- persistence ---------------------------------------------------------------------
    def freeze(self) -> None:
        """The fitted state is final: the pipeline's context is built. (This preprocessor learns nothing from
        what it transforms; ``models.contexttab.ContextTabTable`` does, and stops there.)"""

    def to_json(self) -> dict:
        state = dict(self.state)
        state["columns"] = [{**s, "name": _json_value(s["name"])} for s in state["columns"]]
        return state

    @classmethod
    def from_json(cls, state: dict) -> "Preprocessor":
        return cls(state)


def declared_text_columns(frame: pd.DataFrame, declared: list | None) -> set:
    """``dataset.text_columns`` checked against the table: a name it lacks is an error naming it."""
    absent = [c for c in declared or [] if c not in frame.columns]
    if absent:
        raise TabTuneError(f"dataset.text_columns names {absent[0]!r}, which is not a column of the table")
    return set(declared or [])


class LabelEncoder:
    """Class labels <-> 0..C-1, in sorted order, JSON-serialisable."""

    def __init__(self, classes: list | None = None):
        self.classes = classes

    def fit(self, y: pd.Series) -> "LabelEncoder":
        self.classes = [_json_value(v) for v in sorted(pd.unique(y.dropna()), key=lambda v: (str(type(v)), v))]
        return self

    def transform(self, y: pd.Series) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.classes)}
        codes = np.array([lookup.get(_json_value(v), -1) for v in y], dtype=np.int64)
        if (codes < 0).any():
            unknown = [v for v, c in zip(y, codes) if c < 0][0]
            raise TabTuneError(f"label {unknown!r} was not seen in training (known: {self.classes})")
        return codes

    def inverse(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[codes]
