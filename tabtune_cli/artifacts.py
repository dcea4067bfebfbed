"""The saved pipeline's file format: safetensors and JSON only, and the facts that tie it to its base.

``pack_folder`` / ``unpack_file``: a saved folder as one safetensors file and back (nothing executed, only
a saved pipeline's own file names written); ``read_safetensors`` refuses anything else (a pickle, say)
without running it; ``provenance`` and ``base_sha256`` fingerprint the base weights and the data, and
``check_same_checkpoint`` refuses a checkpoint file that is not the one a run was trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .data.dataset import file_sha256
from .errors import TabTuneError
from .models.base import Task

FORMAT_VERSION = 1  # of a saved pipeline folder (pipeline.json "format")
WEIGHT_FILES = {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"}


def read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors; anything else (a pickle, say) is refused without being run."""
    try:
        return load_file(path)
    except Exception as exc:
        raise TabTuneError(f"{path}: not a safetensors file ({str(exc).splitlines()[0][:100]}); "
                           f"tabtune reads weights only as safetensors and never unpickles") from None


PACKED = "tabtune-pipeline"
# every file a saved pipeline folder may hold: a packed file naming any other is refused
PIPELINE_FILES = WEIGHT_FILES | {"context.safetensors", "preprocessor.json", "pipeline.json", "README.md"}


def pack_folder(folder: Path, target: Path) -> None:
    """One safetensors file holding a saved pipeline folder: tensors under ``<file>/<key>``, JSON in the metadata."""
    tensors, metadata = {}, {"format": PACKED, "version": str(FORMAT_VERSION)}
    for item in sorted(folder.iterdir()):
        if item.suffix == ".safetensors":
            tensors.update({f"{item.name}/{k}": v for k, v in load_file(item).items()})
        elif item.is_file():
            metadata[f"file:{item.name}"] = item.read_text()
    save_file(tensors, target, metadata=metadata)


def unpack_file(path: Path, folder: Path) -> None:
    """The folder :func:`pack_folder` packed; a file of any other kind is refused, never executed, and only
    the files a saved pipeline has are written (by their fixed names, inside ``folder``)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("format") != PACKED:
                raise ValueError("no tabtune pipeline inside")
            files: dict[str, dict] = {}
            for key in fh.keys():
                name, _, tensor = key.partition("/")
                files.setdefault(name, {})[tensor] = fh.get_tensor(key)
        texts = {key[5:]: text for key, text in metadata.items() if key.startswith("file:")}
        stray = next((n for n in [*files, *texts] if n not in PIPELINE_FILES), None)
        if stray is not None:
            raise ValueError(f"it names a file {stray!r} that no saved pipeline has")
    except Exception as exc:
        raise TabTuneError(f"{path}: not a pipeline saved by tabtune ({str(exc).splitlines()[0][:100]}); "
                           f"tabtune saves safetensors + JSON whatever the extension and never unpickles") from None
    for name, state in files.items():
        save_file(state, folder / name)
    for name, text in texts.items():
        (folder / name).write_text(text)


def check_same_checkpoint(checkpoint: Path, provenance: dict, path: Path) -> None:
    """A saved pipeline holds no base weights of its own: the checkpoint found now must be the one it was
    trained on (its SHA-256 in the manifest), or its predictions would silently change."""
    expected = (provenance.get("checkpoint") or {}).get("sha256")
    if expected and file_sha256(checkpoint) != expected:
        raise TabTuneError(f"{path}: its base checkpoint {str(checkpoint)!r} is not the file it was trained on "
                           f"(SHA-256 differs from pipeline.json's provenance)")


def base_sha256(provenance: dict, random_state: dict | None) -> str | None:
    """The fingerprint of a model's base weights: its checkpoint file's SHA-256, or for random weights the
    SHA-256 of the tensors (names, dtypes, shapes, bytes in name order)."""
    if random_state is None:
        return (provenance.get("checkpoint") or {}).get("sha256")
    digest = hashlib.sha256()
    for name in sorted(random_state):
        tensor = random_state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def provenance(adapter, config, task: Task, X: pd.DataFrame, y: pd.Series) -> dict:
    """Where a fitted pipeline came from: versions, checkpoint and data fingerprints, seed-independent facts."""
    from importlib import metadata

    from . import __version__

    checkpoint = adapter.checkpoint_file(config, task)
    versions = {}
    for package in ("torch", "peft", "transformers", "safetensors", "numpy", "pandas", "scikit-learn",
                    "tabicl", "tabpfn", "tabdpt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    rows = pd.util.hash_pandas_object(X.assign(__target__=y.to_numpy()), index=False).to_numpy()
    return {"tabtune": __version__, "model": adapter.name,
            "checkpoint": None if checkpoint is None else {"path": str(checkpoint), "sha256": file_sha256(checkpoint)},
            "data_sha256": hashlib.sha256(rows.tobytes()).hexdigest(), "packages": versions}
