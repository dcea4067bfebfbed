"""The ensemble members of the Orions' reference wrappers, for prediction and training alike.

``OrionMSPClassifier`` and ``OrionBixClassifier`` (the competitor's package vendors both) prepare their members
as TabICL 1.x's classifier did: constant columns dropped; for each normalisation ("none", "power") the context
fits a standard scaling, that normalisation and an outlier clipping at 4 standard deviations; feature orders
are rows of a random Latin square; labels get cyclic class shifts; 32 members from seed 42; the members'
logits are averaged after undoing each shift, then one softmax at temperature 0.9.

tabicl 2.2's ``EnsembleGenerator`` (a dependency already, for TabICL) computes the same values for a member
(measured: 0 difference after undoing the feature order), but it chooses its members differently: its class
patterns come from a generator of their own, so the shuffled list of (feature order, class shift) pairs that
the first 32 are taken from is another. ``WrapperMembers`` keeps tabicl's preprocessing and chooses the members
as the wrappers do, so the same table gives the wrappers' members (``tests/parity``, ``make parity``).
Unlike the wrappers, which refuse a table with a gap, ``WrapperMembers`` first fills a gap with the context's mean
(as tabicl's own estimator does).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import numpy as np
from sklearn.impute import SimpleImputer
from tabicl._sklearn.preprocessing import EnsembleGenerator, Shuffler

QUERY_CHUNK = 8192  # context + query rows a forward takes in prediction

SEED = 42  # the wrappers' random_state
OUTLIER_THRESHOLD = 4.0


class WrapperMembers(EnsembleGenerator):
    """tabicl's ``EnsembleGenerator`` with the members the Orions' wrappers choose; a gap is filled with the
    context's mean first (as tabicl's own estimator does; the wrappers refuse it)."""

    def fit(self, X, y):
        self.imputer_ = SimpleImputer(keep_empty_features=True).fit(X)
        return super().fit(self.imputer_.transform(X), y)

    def transform(self, X=None, mode="both"):
        return super().transform(None if X is None else self.imputer_.transform(X), mode=mode)

    def _generate_ensemble(self):
        orders = Shuffler(n_elements=self.n_features_in_, method=self.feat_shuffle_method,
                          random_state=self.random_state).shuffle(self.n_estimators)
        n = self.n_classes_
        # the wrappers draw the shifts from the generator that then shuffles the pairs (tabicl 2.2 does not)
        offsets = self.rng_.sample(range(n), n) if self.n_estimators > 1 else [0]
        pairs = list(itertools.product(orders, [[(c + k) % n for c in range(n)] for k in offsets]))
        self.rng_.shuffle(pairs)
        chosen = list(itertools.product(pairs, self.norm_methods_))[: self.n_estimators]
        configs: OrderedDict = OrderedDict()
        for pair, method in chosen:
            configs.setdefault(method, []).append(pair)
        orders = OrderedDict((m, [order for order, _ in pairs]) for m, pairs in configs.items())
        shifts = OrderedDict((m, [shift for _, shift in pairs]) for m, pairs in configs.items())
        return configs, orders, shifts


def fitted_members(X_context: np.ndarray, y_context: np.ndarray, n_estimators: int) -> WrapperMembers:
    """The wrappers' members fitted on a context whose labels are 0..n-1 (every one present)."""
    return WrapperMembers(classification=True, n_estimators=int(n_estimators), norm_methods=["none", "power"],
                          feat_shuffle_method="latin", class_shuffle_method="shift",
                          outlier_threshold=OUTLIER_THRESHOLD, random_state=SEED).fit(X_context, y_context)


def member_views(members: WrapperMembers, X_query: np.ndarray, batch: int):
    """Each member's ``(X (context + query rows, features), y_context, class pattern)``; a member's logits,
    indexed by its pattern (``logits[..., pattern]``), are back in the context's class order.

    The feature order is the one the wrappers' model computes with, which is not always the member's own: the
    wrappers send ``batch`` members a forward (OrionMSP's default, 8) (``np.array_split``), and their column embedder embeds only the
    batch's first table and re-orders those embeddings for the others with a map that composes the two
    orders the wrong way round (``map_feature_shuffle``, as in tabicl): a member whose planned order is ``p``,
    in a batch led by ``f``, sees its columns in the order ``f[argsort(p)[f]]``. Columns are embedded one by
    one, so handing the member those columns is that computation (measured in ``make parity``: on 3,000
    rows the wrapper's answers at its default ``batch_size=8`` and at ``batch_size=1`` differ by 3.5e-2;
    tabtune gives the default's)."""
    for method, (Xs, ys) in members.transform(X_query, mode="both").items():
        orders = [np.asarray(order) for order in members.feature_shuffles_[method]]
        shifts = members.class_shuffles_[method]
        for group in np.array_split(np.arange(len(Xs)), math.ceil(len(Xs) / batch)):
            first = orders[group[0]]
            table = Xs[group[0]][:, np.argsort(first)]  # the member's values in the table's own column order
            for i in group:
                yield table[:, first[np.argsort(orders[i])[first]]], ys[i], shifts[i]


def averaged_member_logits(forward, X_context: np.ndarray, y_context: np.ndarray, X_query: np.ndarray,
                           n_estimators: int, batch: int):
    """``(classes, logits)``: the classes the context holds (ascending) and the mean over the wrappers' members
    of ``forward(X, y)``'s logits for the query rows, columns in the order of ``classes``.

    ``forward(X (context + query rows, features), y (context labels 0..k-1))`` gives a member's logits
    (n_query, at least k): numpy in prediction, tensors with gradients in training; ``batch``: the wrapper's
    members a forward (``member_views``)."""
    classes, y_encoded = np.unique(y_context, return_inverse=True)
    members = fitted_members(X_context, y_encoded, n_estimators)
    total, count = 0.0, 0
    for X, y, pattern in member_views(members, X_query, batch):
        total = total + forward(X, y)[..., : len(classes)][..., list(pattern)]
        count += 1
    return classes, total / count


def predicted_probabilities(forward, X_context: np.ndarray, y_context: np.ndarray, X_query: np.ndarray,
                            n_estimators: int, batch: int, temperature: float, n_classes: int) -> np.ndarray:
    """The wrappers' ``predict_proba``: members' mean logits, one softmax at ``temperature``; (n_query,
    n_classes) in the task's numbering (a class the context lacks gets 0). Queries go in chunks with the
    context, up to ``QUERY_CHUNK`` rows a forward."""
    from scipy.special import softmax

    probs = np.zeros((len(X_query), n_classes))
    if len(X_query) == 0:
        return probs
    n, chunk = len(X_context), max(256, QUERY_CHUNK - len(X_context))

    def chunked(X, y):
        return np.concatenate([forward(np.concatenate([X[:n], X[start:start + chunk]]), y)
                               for start in range(n, len(X), chunk)])

    classes, mean = averaged_member_logits(chunked, X_context, y_context, X_query, n_estimators, batch)
    probs[:, classes.astype(int)] = softmax(mean / temperature, axis=-1)
    return probs


def episode_logits(forward, X_context, y_context, X_query, n_estimators: int, batch: int, n_classes: int):
    """Training's view of a batch of episodes (B, rows, features): each through the wrappers' members fitted on
    its own context, as prediction sees it; the members' mean logits with gradients (B, n_query, n_classes),
    -inf for a class the episode's context lacks. ``forward(X, y)`` runs the module on one member's tensors."""
    import torch

    from .base import to_task_classes

    outputs = []
    for Xc, yc, Xq in zip(X_context, y_context, X_query):
        device = Xc.device

        def member(X, y, device=device):
            return forward(torch.from_numpy(X).float().to(device), torch.from_numpy(y).float().to(device))

        classes, mean = averaged_member_logits(member, Xc.detach().cpu().numpy(), yc.detach().cpu().numpy(),
                                               Xq.detach().cpu().numpy(), n_estimators, batch)
        outputs.append(to_task_classes(mean, classes, n_classes))
    return torch.stack(outputs)
