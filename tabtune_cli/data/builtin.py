"""Datasets that ship with scikit-learn, so a fresh offline machine has real tables to run on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TabTuneError

if TYPE_CHECKING:  # `tabtune ls` reads BUILTIN without importing pandas
    import pandas as pd

# name -> (scikit-learn loader, task)
BUILTIN = {
    "breast_cancer": ("load_breast_cancer", "classification"),
    "wine": ("load_wine", "classification"),
    "iris": ("load_iris", "classification"),
    "digits": ("load_digits", "classification"),
    "diabetes": ("load_diabetes", "regression"),
}

TARGET = "target"


def load_builtin(name: str) -> pd.DataFrame:
    """Return the built-in table ``name`` with its label in the column ``target``."""
    if name not in BUILTIN:
        raise TabTuneError(f"unknown built-in dataset {name!r} (available: {', '.join(sorted(BUILTIN))})")
    from sklearn import datasets

    bunch = getattr(datasets, BUILTIN[name][0])(as_frame=True)
    frame = bunch.frame.copy()
    if bunch.get("target_names") is not None and BUILTIN[name][1] == "classification":
        names = list(bunch.target_names)
        frame[TARGET] = [str(names[i]) for i in frame[TARGET]]
    return frame
