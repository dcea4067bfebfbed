"""Episodes: disjoint context and query rows, every row a query once a pass, relabelling, many classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tabtune_cli.data.episodes import epoch_episodes, episode_sizes

from tabicl_engine import CPU


# ---- episodes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_rows,context_size,query_size,n_classes",
                         [(216, 64, 32, 2), (100, 128, 48, 3), (57, 20, 10, 5), (10, 64, 64, 2)])
def test_episodes_are_disjoint_cover_every_row_and_hold_every_class(n_rows, context_size, query_size, n_classes):
    rng_labels = np.random.default_rng(7)
    labels = np.concatenate([np.arange(n_classes), rng_labels.integers(0, n_classes, n_rows - n_classes)])
    labels = rng_labels.permutation(labels)
    episodes = epoch_episodes(labels, n_rows, context_size, query_size, np.random.default_rng(0))
    # as asked when the table holds an episode; otherwise both parts shrink in proportion (48 of 176 rows are
    # query: 27 of 100), the table's every row in one of them
    c, q = {216: (64, 32), 100: (73, 27), 57: (20, 10), 10: (5, 5)}[n_rows]
    assert episode_sizes(n_rows, context_size, query_size) == (c, q)
    queried = np.zeros(n_rows, dtype=int)
    for e in episodes:
        assert len(e.query) == q and len(set(e.query)) == q
        assert len(e.context) == c and len(set(e.context)) == len(e.context)
        assert set(e.context).isdisjoint(e.query)
        assert e.context.min() >= 0 and e.context.max() < n_rows
        # every class that has rows outside this query is in the context
        assert set(labels[e.context]) == set(np.delete(labels, e.query))
        queried[e.query] += 1
    assert (queried >= 1).all()
    assert len(episodes) == -(-n_rows // q)


def test_episode_relabelling_is_a_consistent_bijection():
    """Each episode permutes features and renames classes; context and query get the same mapping."""
    from tabtune_cli.tuning.trainer import _episode_tensors

    rng = np.random.default_rng(0)
    X_all = torch.as_tensor(rng.normal(size=(60, 5)).astype(np.float32))
    y_np = rng.integers(0, 3, 60)
    y_all = torch.as_tensor(y_np)
    episodes = epoch_episodes(y_np, 60, 20, 10, np.random.default_rng(1), n_features=5, n_classes=3)
    assert any(not np.array_equal(e.feature_order, np.arange(5)) for e in episodes)
    assert any(not np.array_equal(e.class_order, np.arange(3)) for e in episodes)
    batch = episodes[:4]
    Xc, yc, Xq, yq = _episode_tensors(batch, X_all, y_all, CPU)
    for b, e in enumerate(batch):
        assert sorted(e.feature_order) == list(range(5)) and sorted(e.class_order) == list(range(3))
        np.testing.assert_array_equal(Xc[b].numpy(), X_all.numpy()[e.context][:, e.feature_order])
        np.testing.assert_array_equal(Xq[b].numpy(), X_all.numpy()[e.query][:, e.feature_order])
        np.testing.assert_array_equal(yc[b].numpy(), e.class_order[y_np[e.context]])
        np.testing.assert_array_equal(yq[b].numpy(), e.class_order[y_np[e.query]])


def test_episodes_without_labels_are_disjoint_and_cover_every_row():
    episodes = epoch_episodes(None, 90, 30, 20, np.random.default_rng(3))
    seen = set()
    for e in episodes:
        assert set(e.context).isdisjoint(e.query) and len(e.context) == 30
        seen |= set(e.query)
    assert seen == set(range(90))


def test_episodes_stratified_context_keeps_a_rare_class():
    labels = np.zeros(200, dtype=int)
    labels[:2] = 1  # two rows of a rare class
    for seed in range(20):
        for e in epoch_episodes(labels, 200, 16, 32, np.random.default_rng(seed)):
            outside = np.setdiff1d(np.arange(2), e.query)
            if len(outside):
                assert 1 in labels[e.context]


def test_episodes_same_seed_same_episodes_other_seed_different():
    labels = np.random.default_rng(0).integers(0, 3, 150)
    a = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11))
    b = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11))
    c = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(12))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.context, y.context)
        np.testing.assert_array_equal(x.query, y.query)
    a = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11), n_features=4, n_classes=3)
    b = epoch_episodes(labels, 150, 64, 32, np.random.default_rng(11), n_features=4, n_classes=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.feature_order, y.feature_order)
        np.testing.assert_array_equal(x.class_order, y.class_order)
    assert any(not np.array_equal(x.query, z.query) for x, z in zip(a, c))


def test_episodes_need_two_rows():
    with pytest.raises(ValueError, match="two"):
        epoch_episodes(np.array([0]), 1, 4, 4, np.random.default_rng(0))


def test_many_class_episodes_hold_one_group_of_classes_each():
    labels = np.arange(520) % 26
    episodes = epoch_episodes(labels, len(labels), 64, 16, np.random.default_rng(0), n_features=3, n_classes=26,
                              max_classes=10)
    queried = set()
    for e in episodes:
        classes = set(labels[e.context]) | set(labels[e.query])
        assert len(classes) <= 10 and e.n_classes == len(set(labels[e.context]))
        assert set(labels[e.query]) <= set(labels[e.context])  # every query class is in the context
        assert not set(e.context) & set(e.query)
        local = e.class_order[sorted(classes)]
        assert sorted(local) == list(range(len(classes)))  # a bijection onto 0..k-1
        queried |= set(e.query)
    assert queried == set(range(len(labels)))
    assert {e.context.shape for e in episodes} == {(64,)} and {e.query.shape for e in episodes} == {(16,)}
