"""Read a user's table from CSV or Parquet, chosen by the file's extension."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import TabTuneError

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


def read_table(path: str | Path) -> pd.DataFrame:
    """Return the table at ``path``; a missing, unreadable or empty file is a TabTuneError naming it."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TabTuneError(f"{path}: unsupported file type {path.suffix!r} (use .csv or .parquet)")
    if not path.is_file():
        raise TabTuneError(f"{path}: no such file")
    try:
        frame = reader(path)
    except pd.errors.EmptyDataError:
        raise TabTuneError(f"{path}: the table is empty") from None
    except Exception as exc:  # a parser's own message, kept to one line
        raise TabTuneError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise TabTuneError(f"{path}: the table is empty ({frame.shape[0]} rows, {frame.shape[1]} columns)")
    return frame
