"""Read a user's table from CSV or Parquet, chosen by the file's extension.

- A header is read as written: the same column name twice is an error naming it (pandas alone would
  rename a CSV's second ``a`` to ``a.1`` without a word).
- A CSV that is not UTF-8 (a Windows or Excel export, say) is read as Latin-1, which every byte sequence
  is, with a logged warning naming the file and the offset of its first byte that is not UTF-8. A file
  starting with a UTF-16 byte-order mark is read as UTF-16.
- A folder, a missing, unreadable or empty file is an error naming it.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

import pandas as pd

from ..errors import TabTuneError
from .checks import check_names

log = logging.getLogger("tabtune")

SUFFIXES = (".csv", ".parquet", ".pq")
FALLBACK_ENCODING = "latin-1"


def read_table(path: str | Path, treatments: list | None = None) -> pd.DataFrame:
    """Return the table at ``path``; a missing, unreadable or empty file is a TabTuneError naming it.

    How the file had to be read (an encoding other than UTF-8) is logged and appended to ``treatments``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TabTuneError(f"{path}: unsupported file type {path.suffix!r} (use .csv or .parquet)")
    if path.is_dir():
        raise TabTuneError(f"{path}: is a folder, not a table file (give one .csv or .parquet file)")
    if not path.is_file():
        raise TabTuneError(f"{path}: no such file")
    try:
        frame = _read_csv(path, treatments) if suffix == ".csv" else _read_parquet(path)
    except pd.errors.EmptyDataError:
        raise TabTuneError(f"{path}: the table is empty") from None
    except TabTuneError:
        raise
    except OSError as exc:
        raise TabTuneError(f"{path}: cannot read it ({exc.strerror or str(exc).splitlines()[0]})") from None
    except Exception as exc:  # a parser's own message, kept to one line
        raise TabTuneError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise TabTuneError(f"{path}: the table is empty ({frame.shape[0]} rows, {frame.shape[1]} columns)")
    check_names(frame.columns, str(path))
    return frame


def _read_csv(path: Path, treatments: list | None) -> pd.DataFrame:
    with open(path, "rb") as fh:
        if fh.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            return _parse_csv(path, "utf-16")
    try:
        return _parse_csv(path, "utf-8")
    except UnicodeDecodeError:
        offset = first_non_utf8(path)
        if offset is None:
            raise
    with open(path, "rb") as fh:
        fh.seek(offset)
        byte = fh.read(1)
    message = (f"{path}: not UTF-8 (byte 0x{byte.hex()} at offset {offset} is the first that is not): "
               f"read as {FALLBACK_ENCODING}; re-save the file as UTF-8 if its text looks wrong")
    log.warning(message)
    if treatments is not None:
        treatments.append({"case": "encoding", "source": str(path), "column": None, "message": message})
    return _parse_csv(path, FALLBACK_ENCODING)


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    check_names(pq.read_schema(path).names, str(path))  # pyarrow's own error for a repeated name is cryptic
    return pd.read_parquet(path)


def _parse_csv(path: Path, encoding: str) -> pd.DataFrame:
    # the header as written (header=None: pandas renames repeated names when it reads them as a header)
    header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, encoding=encoding)
    check_names(header.iloc[0].tolist(), str(path))
    return pd.read_csv(path, encoding=encoding)


def first_non_utf8(path: Path, block: int = 1 << 20) -> int | None:
    """The byte offset of the first byte of ``path`` that is not valid UTF-8, or None if the whole file is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block)
            final = not chunk
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                return consumed - pending + exc.start
            consumed += len(chunk)
            if final:
                return None
