"""Training episodes: context rows with labels, query rows to predict — always disjoint.

One epoch walks a seeded permutation of the training rows in query-sized
slices, so every row is a query at least once per epoch; each slice's context is drawn
from the *other* rows (stratified for classification), so no row ever sees
its own label.
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
    class_order: np.ndarray | None = None


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


def epoch_episodes(labels: np.ndarray | None, n_rows: int, context_size: int, query_size: int,
                   rng: np.random.Generator, n_features: int | None = None,
                   n_classes: int | None = None) -> list[Episode]:
    """Return the episodes of one epoch; ``labels`` (class codes) makes the context stratified.

    With ``n_features`` / ``n_classes`` each episode also carries a random feature order and
    class relabelling."""
    if n_rows < 2:
        raise ValueError("episodes need at least two training rows")
    query_size = min(query_size, max(1, n_rows // 2))
    order = rng.permutation(n_rows)
    episodes = []
    size = min(context_size, n_rows - query_size)
    for start in range(0, n_rows, query_size):
        # the last slice reaches back so every episode has the same shape and batches stack
        query = order[min(start, n_rows - query_size):][:query_size]
        others = np.setdiff1d(np.arange(n_rows), query, assume_unique=True)
        if labels is None:
            context = rng.choice(others, size=size, replace=False)
        else:
            context = stratified_pick(labels, others, size, rng)
        episodes.append(Episode(
            context=context, query=query,
            feature_order=rng.permutation(n_features) if n_features else None,
            class_order=rng.permutation(n_classes) if n_classes else None))
    return episodes


def context_rows(labels: np.ndarray | None, n_rows: int, cap: int, seed: int) -> np.ndarray:
    """Rows of the training split used as context at prediction time: all, or a seeded stratified ``cap``."""
    if n_rows <= cap:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_rows, size=cap, replace=False))
    return np.sort(stratified_pick(labels, np.arange(n_rows), cap, rng))
