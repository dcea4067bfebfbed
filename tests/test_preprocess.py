"""The shared preprocessor: fitted on training rows only, robust to unseen data, plain-JSON state."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from tabtune_cli import TabTuneError
from tabtune_cli.data.preprocess import CLIP, LabelEncoder, Preprocessor


def mixed_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Numeric (with gaps), categorical (with gaps), datetime, constant and ID-like columns."""
    rng = np.random.default_rng(seed)
    amount = rng.normal(50, 10, n)
    amount[[2, 7, 11]] = np.nan
    color = rng.choice(["red", "green", "blue"], n).astype(object)
    color[[4, 9]] = None
    return pd.DataFrame({
        "amount": amount,
        "count": rng.integers(0, 5, n),
        "color": color,
        "signup": pd.date_range("2021-01-01", periods=n, freq="11D").strftime("%Y-%m-%d"),
        "const": 7.0,
        "row_id": np.arange(1000, 1000 + n),
        "email": [f"user{i}@example.com" for i in range(n)],
    })


def column(pre: Preprocessor, out: np.ndarray, name: str) -> np.ndarray:
    return out[:, pre.feature_names.index(name)]


def spec(pre: Preprocessor, name: str) -> dict:
    return next(s for s in pre.state["columns"] if s["name"] == name)


@pytest.fixture()
def train():
    return mixed_frame()


@pytest.fixture()
def fitted(train):
    return Preprocessor().fit(train)


def test_feature_layout(fitted):
    assert fitted.feature_names == [
        "amount", "amount.missing", "count", "color",
        "signup.year", "signup.month", "signup.day", "signup.dayofweek", "signup.days",
    ]
    assert [s["kind"] for s in fitted.state["columns"]] == ["numeric", "numeric", "categorical", "datetime"]
    assert fitted.state["input_columns"] == list(mixed_frame().columns)


def test_statistics_come_from_training_rows_only(train, fitted):
    state_before = json.dumps(fitted.to_json(), sort_keys=True)
    out_train = fitted.transform(train)
    other = mixed_frame(n=40, seed=5)
    other["amount"] = other["amount"] + 1000.0  # a very different distribution
    out_other = fitted.transform(other)
    # transforming other data changes nothing in the state, and the training output stays the same
    assert json.dumps(fitted.to_json(), sort_keys=True) == state_before
    np.testing.assert_array_equal(fitted.transform(train), out_train)
    # training stats: the median fills training gaps, mean/std are those of the filled training column
    values = train["amount"]
    filled = values.fillna(values.median())
    st = spec(fitted, "amount")["stats"][0]
    assert st["median"] == pytest.approx(values.median())
    assert st["mean"] == pytest.approx(filled.mean()) and st["std"] == pytest.approx(filled.std(ddof=0))
    np.testing.assert_allclose(column(fitted, out_train, "amount"), (filled - filled.mean()) / filled.std(ddof=0),
                               rtol=1e-5, atol=1e-5)
    # other data is scaled by the training stats: +1000 is far beyond CLIP deviations, and its gaps get
    # the *training* median (the other table's own median would be about 1050)
    gaps = other["amount"].isna().to_numpy()
    assert gaps.any() and not gaps.all()
    np.testing.assert_array_equal(column(fitted, out_other, "amount")[~gaps], CLIP)
    np.testing.assert_allclose(column(fitted, out_other, "amount")[gaps], (st["median"] - st["mean"]) / st["std"],
                               rtol=1e-5)
    # a refit on the other data would give different stats
    assert Preprocessor().fit(other).to_json() != fitted.to_json()


def test_train_output_is_standardised(train, fitted):
    out = fitted.transform(train)
    assert out.dtype == np.float32
    for name in ("amount", "count", "color", "signup.days"):
        assert column(fitted, out, name).mean() == pytest.approx(0.0, abs=1e-5)
        assert column(fitted, out, name).std() == pytest.approx(1.0, abs=1e-4)


def test_categories_coded_by_training_frequency(train, fitted):
    counts = train["color"].value_counts()
    st = spec(fitted, "color")
    assert st["categories"] == sorted(counts.index, key=lambda c: (-counts[c], c))
    codes = column(fitted, fitted.transform(train), "color") * st["std"] + st["mean"]
    expected = train["color"].map({c: i for i, c in enumerate(st["categories"])}).fillna(3)
    np.testing.assert_allclose(codes, expected, atol=1e-5)


def test_unseen_categories_share_the_missing_code(train, fitted):
    rows = train.iloc[:5].copy()
    rows["color"] = ["purple", None, "red", "magenta", np.nan]
    out = column(fitted, fitted.transform(rows), "color")
    st = spec(fitted, "color")
    missing_code = (len(st["categories"]) - st["mean"]) / st["std"]
    assert out[0] == out[1] == out[3] == out[4] == pytest.approx(missing_code, rel=1e-6)
    red = (st["categories"].index("red") - st["mean"]) / st["std"]
    assert out[2] == pytest.approx(red, rel=1e-6) and out[2] != out[0]


def test_missing_numeric_gets_median_and_indicator(train, fitted):
    out = fitted.transform(train)
    gaps = train["amount"].isna().to_numpy()
    np.testing.assert_array_equal(column(fitted, out, "amount.missing"), gaps.astype(np.float32))
    st = spec(fitted, "amount")["stats"][0]
    at_median = (train["amount"].median() - st["mean"]) / st["std"]
    np.testing.assert_allclose(column(fitted, out, "amount")[gaps], at_median, rtol=1e-5)
    # new data: gaps and unparsable strings are filled the same way, and flagged
    new = train.iloc[:3].copy()
    new["amount"] = [np.nan, 55.0, np.nan]
    out_new = fitted.transform(new)
    np.testing.assert_array_equal(column(fitted, out_new, "amount.missing"), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(column(fitted, out_new, "amount")[[0, 2]], at_median, rtol=1e-5)
    text = train.iloc[:2].copy()
    text["amount"] = pd.Series(["n/a", "55"], dtype=object, index=text.index)
    out_text = fitted.transform(text)
    np.testing.assert_array_equal(column(fitted, out_text, "amount.missing"), [1.0, 0.0])
    np.testing.assert_allclose(column(fitted, out_text, "amount"), column(fitted, out_new, "amount")[:2], rtol=1e-6)


def test_gap_in_a_column_complete_at_training_is_filled_without_indicator(train, fitted):
    assert "count.missing" not in fitted.feature_names
    new = train.iloc[:2].copy()
    new["count"] = [np.nan, 2.0]
    out = fitted.transform(new)
    assert out.shape[1] == len(fitted.feature_names) and np.isfinite(out).all()
    st = spec(fitted, "count")["stats"][0]
    assert column(fitted, out, "count")[0] == pytest.approx((st["median"] - st["mean"]) / st["std"], rel=1e-6)


def test_constant_and_id_like_columns_are_dropped(fitted):
    assert fitted.state["dropped"] == {"const": "constant", "row_id": "id-like", "email": "id-like"}
    assert not any(n.startswith(("const", "row_id", "email")) for n in fitted.feature_names)


def test_distinct_values_that_are_not_ids_are_kept():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "price": rng.normal(size=40),                                   # all distinct floats: a measurement
        "sparse_int": rng.choice(10_000, size=40, replace=False),     # all distinct, not a run
        "all_missing": [np.nan] * 40,                                  # constant (nothing to learn)
        "short_id": ["a", "b", "c"] * 13 + ["d"],                       # repeats: a category
    })
    pre = Preprocessor().fit(frame)
    assert pre.state["dropped"] == {"all_missing": "constant"}
    assert [s["name"] for s in pre.state["columns"]] == ["price", "sparse_int", "short_id"]


def test_all_columns_unusable_is_an_error_listing_them():
    frame = pd.DataFrame({"k": np.arange(30), "c": ["x"] * 30})
    with pytest.raises(TabTuneError, match="no usable feature columns.*k: id-like.*c: constant"):
        Preprocessor().fit(frame)


def test_datetime_columns_are_expanded(train, fitted):
    out = fitted.transform(train)
    dates = pd.to_datetime(train["signup"])
    for part, expected in [("year", dates.dt.year), ("month", dates.dt.month), ("day", dates.dt.day),
                           ("dayofweek", dates.dt.dayofweek),
                           ("days", (dates - pd.Timestamp("1970-01-01")).dt.days)]:
        st = next(s for s in spec(fitted, "signup")["stats"] if s["part"] == part)
        raw = column(fitted, out, f"signup.{part}").astype(np.float64) * st["std"] + st["mean"]
        np.testing.assert_allclose(raw, expected.to_numpy(dtype=float), atol=1e-2 * max(1.0, st["std"]))
    # a real datetime dtype gives the same features as its string form
    typed = train.assign(signup=dates)
    np.testing.assert_allclose(fitted.transform(typed), out, atol=1e-6)


def test_unparsable_date_at_transform_is_filled_with_the_median(train, fitted):
    rows = train.iloc[:2].copy()
    rows["signup"] = ["not a date", train["signup"].iloc[1]]
    out = fitted.transform(rows)
    assert np.isfinite(out).all()
    st = next(s for s in spec(fitted, "signup")["stats"] if s["part"] == "days")
    assert column(fitted, out, "signup.days")[0] == pytest.approx((st["median"] - st["mean"]) / st["std"], rel=1e-5)
    np.testing.assert_array_equal(out[1], fitted.transform(train.iloc[[1]])[0])


def test_numeric_strings_are_not_taken_for_dates():
    frame = pd.DataFrame({"code": [str(v) for v in np.random.default_rng(0).integers(1, 4, 30)],
                          "x": np.random.default_rng(1).normal(size=30)})
    pre = Preprocessor().fit(frame)
    assert spec(pre, "code")["kind"] == "categorical"


def test_far_future_sentinel_date_does_not_crash():
    dates = list(pd.date_range("2020-01-01", periods=39, freq="D").strftime("%Y-%m-%d")) + ["9999-12-31"]
    frame = pd.DataFrame({"valid_to": dates, "x": np.random.default_rng(1).normal(size=40)})
    pre = Preprocessor().fit(frame)
    out = pre.transform(frame)
    assert np.isfinite(out).all()
    days = column(pre, out, "valid_to.days")
    assert days[-1] > days[:-1].max()  # the sentinel stays the latest date


@pytest.mark.parametrize("values", [["May", "June", "July"], ["1st", "2nd", "3rd"]])
def test_month_names_and_ordinals_are_categories(values):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"when": rng.choice(values, 40), "x": rng.normal(size=40)})
    pre = Preprocessor().fit(frame)
    assert spec(pre, "when")["kind"] == "categorical"


def test_json_round_trip_gives_identical_transform(train, fitted):
    text = json.dumps(fitted.to_json())
    restored = Preprocessor.from_json(json.loads(text))
    new = mixed_frame(n=25, seed=9)
    new.loc[0, "color"] = "purple"
    new.loc[1, "amount"] = np.nan
    new.loc[2, "signup"] = None
    for frame in (train, new):
        np.testing.assert_array_equal(restored.transform(frame), fitted.transform(frame))
    assert restored.feature_names == fitted.feature_names
    assert json.dumps(restored.to_json()) == text


def test_json_round_trip_with_integer_column_names():
    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(30, 3)))
    pre = Preprocessor().fit(frame)
    restored = Preprocessor.from_json(json.loads(json.dumps(pre.to_json())))
    np.testing.assert_array_equal(restored.transform(frame), pre.transform(frame))


def test_to_json_does_not_alias_the_state(fitted):
    before = copy.deepcopy(fitted.state)
    out = fitted.to_json()
    out["columns"][0]["name"] = "renamed"
    out["dropped"]["x"] = "constant"
    assert fitted.state["columns"][0]["name"] == before["columns"][0]["name"]


def test_missing_column_at_transform_is_named(train, fitted):
    with pytest.raises(TabTuneError, match="column 'color' is missing"):
        fitted.transform(train.drop(columns="color"))
    # dropped columns are not needed at transform time; extra columns and a new order are fine
    reordered = train.drop(columns=["const", "row_id", "email"]).assign(extra=1)
    reordered = reordered[list(reversed(reordered.columns))]
    np.testing.assert_array_equal(fitted.transform(reordered), fitted.transform(train))


def test_unfitted_preprocessor_refuses_to_transform(train):
    with pytest.raises(TabTuneError, match="not fitted"):
        Preprocessor().transform(train)


def test_label_encoder_round_trip_and_unknown_label():
    enc = LabelEncoder().fit(pd.Series(["b", "a", "c", "a"]))
    assert enc.classes == ["a", "b", "c"]
    codes = enc.transform(pd.Series(["c", "a", "b"]))
    np.testing.assert_array_equal(codes, [2, 0, 1])
    np.testing.assert_array_equal(enc.inverse(codes), ["c", "a", "b"])
    restored = LabelEncoder(json.loads(json.dumps(enc.classes)))
    np.testing.assert_array_equal(restored.transform(pd.Series(["b"])), [1])
    with pytest.raises(TabTuneError, match="label 'z' was not seen in training"):
        enc.transform(pd.Series(["a", "z"]))
    ints = LabelEncoder().fit(pd.Series(np.array([3, 1, 2, 1])))
    assert ints.classes == [1, 2, 3] and all(type(c) is int for c in ints.classes)
    np.testing.assert_array_equal(ints.transform(pd.Series([1, 3])), [0, 2])


def test_a_model_may_take_categories_one_hot():
    frame = mixed_frame()
    frame["plan"] = np.where(np.arange(60) % 3 == 0, "yes", "no")  # two levels: stays one 0/1 code
    frame["size"] = np.array(list("abcdefgh") * 8)[:60]             # eight levels: wider than the limit
    pre = Preprocessor(one_hot_max_levels=4).fit(frame)
    assert [spec(pre, c)["kind"] for c in ("color", "plan", "size")] == ["one-hot", "categorical", "categorical"]
    levels = spec(pre, "color")["categories"]
    assert pre.feature_names[3:6] == [f"color={c}" for c in levels]
    out = pre.transform(frame)
    block = out[:, 3:6]
    for i, value in enumerate(frame["color"]):
        expected = [float(value == c) for c in levels]  # missing: all zeros
        assert block[i].tolist() == expected
    rows = frame.iloc[:2].copy()
    rows["color"] = ["purple", levels[1]]                               # unseen: all zeros too
    assert pre.transform(rows)[:, 3:6].tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # the choice lives in the JSON state: a reloaded preprocessor needs no setting
    restored = Preprocessor.from_json(json.loads(json.dumps(pre.to_json())))
    np.testing.assert_array_equal(restored.transform(frame), out)
    assert spec(Preprocessor().fit(frame), "color")["kind"] == "categorical"  # the default: codes


# ---- free text ---------------------------------------------------------------------------------------------

def reviews(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = ["soft", "lovely", "cheap", "torn", "perfect", "itchy", "warm", "faded", "elegant", "baggy"]
    text = [" ".join(rng.choice(words, 5)) + f" number {i}" for i in range(n)]
    return pd.DataFrame({"review": text, "shade": rng.choice(["red", "blue"], n), "price": rng.normal(size=n)})


def test_free_text_is_detected_and_becomes_features_fitted_on_the_training_rows_only():
    from tabtune_cli.data.preprocess import is_text

    frame = reviews()
    assert is_text(frame["review"]) and not is_text(frame["shade"]) and not is_text(frame["price"])
    fitted = Preprocessor(text_features=4).fit(frame.iloc[:40])
    kinds = {s["name"]: s["kind"] for s in fitted.state["columns"]}
    assert kinds == {"review": "text", "shade": "categorical", "price": "numeric"}
    assert fitted.feature_names[:4] == [f"review.text{i}" for i in range(4)]
    X = fitted.transform(frame)
    assert X.shape == (60, 4 + 2) and np.isfinite(X).all()
    # standardised on the training rows; nothing about the other rows shaped the features
    np.testing.assert_allclose(X[:40, :4].std(axis=0), 1.0, atol=1e-3)
    other = frame.copy()
    other.loc[40:, "review"] = "something else entirely, said twice and more"
    again = Preprocessor(text_features=4).fit(other.iloc[:40])
    np.testing.assert_array_equal(again.transform(frame), X)
    # the state is JSON and gives the same matrix; text_features=0 drops the column; declared names must exist
    restored = Preprocessor.from_json(json.loads(json.dumps(fitted.to_json())))
    np.testing.assert_array_equal(restored.transform(frame), X)
    dropped = Preprocessor(text_features=0).fit(frame)
    assert dropped.state["dropped"] == {"review": "text"} and dropped.transform(frame).shape == (60, 2)
    # an empty declaration turns detection off: the all-distinct review strings then look like IDs
    assert Preprocessor(text_columns=[]).fit(frame).state["dropped"] == {"review": "id-like"}
    with pytest.raises(TabTuneError, match="dataset.text_columns names 'comment', which is not a column"):
        Preprocessor(text_columns=["comment"]).fit(frame)
