"""Seeded train / validation / test splits, stratified for classification."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split


def split_frame(frame: pd.DataFrame, target: str, *, fraction: float, stratify: bool, seed: int):
    """Return ``(rest, held_out)`` with about ``fraction`` of the rows held out."""
    if fraction <= 0:
        return frame, frame.iloc[:0]
    labels = frame[target] if stratify and _can_stratify(frame[target], fraction) else None
    rest, held = train_test_split(frame, test_size=fraction, random_state=seed, stratify=labels)
    return rest, held


def _can_stratify(y: pd.Series, fraction: float) -> bool:
    counts = y.value_counts()
    n_held = int(np.ceil(fraction * len(y)))
    return counts.min() >= 2 and n_held >= len(counts) and len(y) - n_held >= len(counts)


def subsample(frame: pd.DataFrame, target: str, max_rows: int | None, *, stratify: bool, seed: int) -> pd.DataFrame:
    """Return at most ``max_rows`` rows, stratified where the labels allow it."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    labels = frame[target] if stratify and _can_stratify(frame[target], 1 - max_rows / len(frame)) else None
    kept, _ = train_test_split(frame, train_size=max_rows, random_state=seed, stratify=labels)
    return kept
