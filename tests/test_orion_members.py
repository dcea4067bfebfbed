"""The Orions' ensemble members are their reference wrappers' (models/orion_members.py).

The whole answer at the wrappers' defaults is compared with the wrappers themselves in ``make parity``
(tests/parity/test_orion_defaults_parity.py); here, without the reference installed, what decides it: which
members, in which feature order, on which numbers.
"""

import numpy as np
import pytest

from tabtune_cli.models.orion_members import fitted_members, member_views

# OrionMSPClassifier(n_estimators=32) on a 5-feature, 3-class table, as tabtune 0.2.1 chose them (printed from its
# ensemble_generator_: feature_shuffle_patterns_ and class_shift_offsets_); the same list for "power"
REFERENCE_MEMBERS = [([2, 0, 4, 3, 1], 0), ([4, 3, 0, 1, 2], 0), ([3, 2, 1, 4, 0], 1), ([2, 0, 4, 3, 1], 2),
                     ([0, 1, 3, 2, 4], 2), ([1, 4, 2, 0, 3], 1), ([1, 4, 2, 0, 3], 0), ([4, 3, 0, 1, 2], 2),
                     ([2, 0, 4, 3, 1], 1), ([0, 1, 3, 2, 4], 0), ([0, 1, 3, 2, 4], 1), ([1, 4, 2, 0, 3], 2),
                     ([3, 2, 1, 4, 0], 2), ([3, 2, 1, 4, 0], 0), ([4, 3, 0, 1, 2], 1)]


def table(n=60, n_features=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_features)) * np.array([1.0, 10.0, 1e3, 1.0, 5.0])[:n_features], np.arange(n) % 3


def test_the_members_are_the_ones_the_wrappers_choose():
    X, y = table()
    members = fitted_members(X, y, 32)
    assert list(members.feature_shuffles_) == ["none", "power"]  # 5 orders x 3 shifts x 2 = 30 < 32 members
    for method in ("none", "power"):
        # a cyclic shift by k maps class c to (c + k) mod 3, so k is where class 0 goes
        chosen = [(list(map(int, order)), int(shift[0]))
                  for order, shift in zip(members.feature_shuffles_[method], members.class_shuffles_[method])]
        assert chosen == REFERENCE_MEMBERS, method
    # the distinct orders are the rows of a Latin square: no two put the same feature in the same place
    orders = np.unique(np.array([o for o, _ in REFERENCE_MEMBERS]), axis=0)
    assert len(orders) == 5 and all(sorted(orders[:, j]) == list(range(5)) for j in range(5))


@pytest.mark.parametrize("batch", [1, 8])
def test_each_member_sees_the_numbers_scaled_on_the_context_in_the_order_its_batch_gives(batch):
    X, y = table(n=60)
    context, query = X[:50], X[50:]
    members = fitted_members(context, y[:50], 32)
    views = list(member_views(members, query, batch))
    assert len(views) == 30
    plain = (X - context.mean(0)) / context.std(0)  # the "none" members: standard scaling fitted on the context
    groups = [range(0, 8), range(8, 15)]  # 15 "none" members in np.array_split's two batches (8 + 7)
    for i, (Xm, ym, shift) in enumerate(views[:15]):
        order = np.asarray(members.feature_shuffles_["none"][i])
        if batch == 8:  # the wrapper embeds the batch's first table and re-maps it for the others
            first = np.asarray(members.feature_shuffles_["none"][next(g for g in groups if i in g)[0]])
            order = first[np.argsort(order)[first]]
        np.testing.assert_allclose(Xm, plain[:, order], atol=1e-5)
        np.testing.assert_array_equal(ym, np.asarray(shift)[y[:50]])  # the labels shifted cyclically
    # the "power" members: another transform of the same numbers, fitted on the context alone
    assert np.abs(views[15][0] - views[0][0]).max() > 0.05


def test_a_gap_is_filled_with_the_contexts_mean():
    X, y = table()
    gappy = X.copy()
    gappy[::7, 1] = np.nan
    filled = X.copy()
    filled[::7, 1] = np.nanmean(gappy[:50, 1])
    a = [v[0] for v in member_views(fitted_members(gappy[:50], y[:50], 4), gappy[50:], 8)]
    b = [v[0] for v in member_views(fitted_members(filled[:50], y[:50], 4), filled[50:], 8)]
    assert not np.isnan(np.stack(a)).any()
    np.testing.assert_allclose(np.stack(a), np.stack(b), atol=1e-6)
