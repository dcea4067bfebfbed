"""The one writer of run directories: exclusive creation, atomic files, a manifest that says when a run is whole.

A file is written to a hidden temporary name beside it and renamed into place, so
no reader ever sees half a file. ``run.json`` says ``running`` from the start and
``complete`` only after ``metrics.json`` exists; a crashed run says ``running``
(killed outright), ``interrupted`` (Ctrl-C, SIGTERM) or ``failed``, and has no ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from .errors import TabTuneError

MANIFEST = "run.json"
UMASK = os.umask(0)
os.umask(UMASK)


def create(path: str | Path) -> Path:
    """Claim ``path`` as a new run directory; if another run holds it, take ``path_1``, ``path_2``, ..."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        candidate = base if attempt == 0 else base.with_name(f"{base.name}_{attempt}")
        candidate.mkdir(exist_ok=True)
        try:
            fd = os.open(candidate / MANIFEST, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **_owner()}, fh)
        return candidate
    raise RuntimeError(f"{base}: could not claim a free run directory")


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a run's files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_parquet(path: str | Path, frame) -> Path:
    """``frame`` (a pandas DataFrame) as Parquet."""
    return _atomic(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def write_file(path: str | Path, writer) -> Path:
    """Atomically write ``path`` with ``writer(tmp_path)``, for formats with their own savers."""
    return _atomic(Path(path), writer)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one whole line (a torn last line is the only possible partial state, and readers skip it)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()


def _owner() -> dict:
    """Which process runs a run: a resume must not take over one that is still going."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def update(run_dir: Path, **fields) -> dict:
    """Set ``fields`` in the run's manifest; return the manifest."""
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest.update(**fields)
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def finish(run_dir: Path, status: str, **extra) -> None:
    update(run_dir, status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)


def reopen(run_dir: Path) -> dict:
    """Mark an unfinished run as running again in this process (``tabtune train resume=``); return its
    manifest as it was. A run another live process on this machine still runs is refused."""
    manifest = json.loads((run_dir / MANIFEST).read_text())
    if manifest.get("status") == "complete":
        raise TabTuneError(f"{run_dir}: this run is complete; there is nothing to resume")
    if manifest.get("status") == "running" and manifest.get("host") == socket.gethostname() and _alive(
            manifest.get("pid")):
        raise TabTuneError(f"{run_dir}: still running (pid {manifest['pid']}); stop it before resuming it")
    resumed = [*manifest.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
    update(run_dir, status="running", resumed=resumed, **_owner())
    return manifest


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_complete(run_dir: str | Path) -> bool:
    path = Path(run_dir) / MANIFEST
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def discard_if_empty(path: str | Path) -> None:
    """Take back a folder made for a run that never started (and its date folder, if now empty)."""
    for folder in (Path(path), Path(path).parent):
        try:
            folder.rmdir()
        except OSError:
            return
