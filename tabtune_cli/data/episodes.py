"""Training episodes: context rows with labels, query rows to predict — always disjoint.

One epoch walks a seeded permutation of the training rows in query-sized
slices, so every row is a query at least once per epoch; each slice's context is drawn
from the *other* rows (stratified for classification), so no row ever sees
its own label.

More classes than the model's head: each epoch deals the classes at random into
groups of at most ``max_classes`` and walks each group's rows as above, so an
episode holds one group's classes, relabelled 0..k-1 — the same sub-problems the
hierarchical inference (``models.base.predict_classes``) asks the model to solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    context: np.ndarray  # row indices into the training split
    query: np.ndarray
    # The inference path ensembles over feature orders and cyclic class shifts, so training sees
    # features and class ids relabelled too: the model must read labels from the context, not
    # memorise which id means what.
    feature_order: np.ndarray | None = None
    class_order: np.ndarray | None = None  # global class id -> the episode's label
    n_classes: int | None = None           # labels the episode uses (0..n_classes-1)


def stratified_pick(labels: np.ndarray, candidates: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``size`` of ``candidates``, every class present where possible, in proportion otherwise."""
    if size >= len(candidates):
        return rng.permutation(candidates)
    classes, inverse = np.unique(labels[candidates], return_inverse=True)
    # at least one row of each class (when room allows), the rest drawn in proportion
    picked = [rng.choice(candidates[inverse == k]) for k in range(len(classes))][:size]
    rest = np.setdiff1d(candidates, picked, assume_unique=False)
    picked += list(rng.choice(rest, size=size - len(picked), replace=False))
    return rng.permutation(np.asarray(picked))


def _draw_context(pool: np.ndarray, in_query: np.ndarray, n_query: int, size: int, labels: np.ndarray | None,
                  by_class: dict | None, rng: np.random.Generator) -> np.ndarray:
    """``size`` rows of ``pool`` outside the query (``in_query``), drawn uniformly; with labels, every class
    that has rows outside the query is present (where ``size`` allows), each missing one taking the place of
    a row of the most frequent class. Costs O(size + query) per episode, not O(rows): a pass over a
    300k-row table builds its thousands of episodes in seconds."""
    # the query's rows are the pool's: `size` of them plus as many draws always hold `size` outside it
    drawn = pool[rng.choice(len(pool), size=size + n_query, replace=False)]
    context = drawn[~in_query[drawn]][:size]
    if by_class is None:
        return context
    present = set(labels[context].tolist())
    for k, rows in by_class.items():
        if k in present:
            continue
        outside = rows[~in_query[rows]]
        counts = np.bincount(labels[context])
        if not len(outside) or counts.max() < 2:  # none to add, or no room left without dropping a class
            continue
        swap = rng.choice(np.flatnonzero(labels[context] == counts.argmax()))
        context[swap] = rng.choice(outside)
        present.add(k)
    return context


def episode_sizes(n_rows: int, context_size: int, query_size: int) -> tuple[int, int]:
    """``(context rows, query rows)`` of an episode drawn from ``n_rows``: as asked, or, when the rows are fewer
    than an episode asks for, both shrunk in proportion (a recipe's 8,000 + 2,000 rows on a 1,000-row table:
    800 + 200, as the packages' fine-tuners split a small table 80/20). At least one row each."""
    if context_size + query_size <= n_rows:
        return context_size, query_size
    query = min(n_rows - 1, max(1, round(n_rows * query_size / (context_size + query_size))))
    return n_rows - query, query


def epoch_episodes(labels: np.ndarray | None, n_rows: int, context_size: int, query_size: int,
                   rng: np.random.Generator, n_features: int | None = None,
                   n_classes: int | None = None, max_classes: int | None = None) -> list[Episode]:
    """Return the episodes of one epoch; ``labels`` (class codes) makes the context stratified.

    With ``n_features`` / ``n_classes`` each episode also carries a random feature order and
    class relabelling; with ``n_classes > max_classes`` each episode covers one group of classes."""
    if n_rows < 2:
        raise ValueError("episodes need at least two training rows")
    if labels is not None and n_classes and max_classes and n_classes > max_classes:
        dealt = rng.permutation(n_classes)
        groups = np.array_split(dealt, int(np.ceil(n_classes / max_classes)))
        pools = [np.flatnonzero(np.isin(labels, g)) for g in groups]
    else:
        groups = [np.arange(n_classes)] if n_classes else [None]
        pools = [np.arange(n_rows)]
    smallest = min(len(p) for p in pools)
    if smallest < 2:
        raise ValueError("every group of classes needs at least two training rows")
    size, query_size = episode_sizes(smallest, context_size, query_size)
    episodes = []
    in_query = np.zeros(n_rows, dtype=bool)
    for group, pool in zip(groups, pools):
        order = rng.permutation(pool)
        by_class = None if labels is None else {k: pool[labels[pool] == k] for k in np.unique(labels[pool])}
        for start in range(0, len(pool), query_size):
            # the last slice reaches back so every episode has the same shape and batches stack
            query = order[min(start, len(pool) - query_size):][:query_size]
            in_query[query] = True
            context = _draw_context(pool, in_query, len(query), size, labels, by_class, rng)
            in_query[query] = False
            class_order = None
            if group is not None:
                class_order = np.zeros(n_classes, dtype=np.int64)
                class_order[group] = rng.permutation(len(group))
            episodes.append(Episode(
                context=context, query=query,
                feature_order=rng.permutation(n_features) if n_features else None,
                class_order=class_order, n_classes=None if group is None else len(group)))
    # interleave the groups' episodes so a batch mixes them
    return [episodes[i] for i in rng.permutation(len(episodes))]


def context_rows(labels: np.ndarray | None, n_rows: int, cap: int | None, seed: int) -> np.ndarray:
    """Rows of the training split used as context at prediction time: all (``cap`` None or not reached), or a
    seeded stratified ``cap``."""
    if cap is None or n_rows <= cap:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_rows, size=cap, replace=False))
    return np.sort(stratified_pick(labels, np.arange(n_rows), cap, rng))
