"""Seeded train / validation / test splits, stratified for classification.

A class too small to be both learnt and held out stays whole on the training side, with a logged warning
(recorded in the run's manifest): a class with a single row, or one a split would leave without any
training row (many classes in few rows). The model can then predict it; it is not tested. Every class a
held-out part holds is thus one the model was trained on, whatever the seed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from .checks import names

log = logging.getLogger("tabtune")


def split_frame(frame: pd.DataFrame, target: str, *, fraction: float, stratify: bool, seed: int,
                part: str | None = None, treatments: list | None = None):
    """Return ``(rest, held_out)`` with about ``fraction`` of the rows held out.

    With ``stratify`` (class labels), every class in ``held_out`` is also in ``rest`` (see the module doc);
    classes kept whole in ``rest`` are logged and appended to ``treatments``. Too few rows to hold any out:
    ``held_out`` is empty. ``part`` names the held-out rows in messages (``testing``, ``validation``)."""
    held_out_for = f"held out for {part}" if part else "held out"
    if fraction <= 0:
        return frame, frame.iloc[:0]
    pool, lone = frame, frame.iloc[:0]
    if stratify:
        counts = frame[target].value_counts()
        single = list(counts.index[counts < 2])
        if single:
            alone = frame[target].isin(single)
            pool, lone = frame[~alone], frame[alone]
            _note(treatments, target, f"{_classes(single)} a single row: kept in training, none {held_out_for}")
    if math.ceil(fraction * len(pool)) >= len(pool):  # nothing would be left to train on
        return frame, frame.iloc[:0]
    from sklearn.model_selection import train_test_split  # here: `tabtune train --help` needs no scikit-learn

    labels = pool[target] if stratify and _can_stratify(pool[target], fraction) else None
    rest, held = train_test_split(pool, test_size=fraction, random_state=seed, stratify=labels)
    if stratify:
        unseen = held[target].isin(set(held[target]) - set(rest[target]))
        if unseen.any():
            classes = list(dict.fromkeys(held.loc[unseen, target]))
            _note(treatments, target, f"{_classes(classes)} too few rows to be both in training and "
                                      f"{held_out_for}: all kept in training")
            rest, held = pd.concat([rest, held[unseen]]), held[~unseen]
    if len(lone):
        rest = pd.concat([rest, lone])
    return rest, held


def _classes(labels: list) -> str:
    return f"class {labels[0]!r} has" if len(labels) == 1 else f"{len(labels)} classes ({names(labels)}) have"


def _note(treatments: list | None, target: str, message: str) -> None:
    log.warning(message)
    if treatments is not None:
        treatments.append({"case": "rare class", "source": None, "column": str(target), "message": message})


def _can_stratify(y: pd.Series, fraction: float) -> bool:
    counts = y.value_counts()
    n_held = int(np.ceil(fraction * len(y)))
    return counts.min() >= 2 and n_held >= len(counts) and len(y) - n_held >= len(counts)


def subsample(frame: pd.DataFrame, target: str, max_rows: int | None, *, stratify: bool, seed: int) -> pd.DataFrame:
    """Return at most ``max_rows`` rows, stratified where the labels allow it."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    from sklearn.model_selection import train_test_split

    labels = frame[target] if stratify and _can_stratify(frame[target], 1 - max_rows / len(frame)) else None
    kept, _ = train_test_split(frame, train_size=max_rows, random_state=seed, stratify=labels)
    return kept
