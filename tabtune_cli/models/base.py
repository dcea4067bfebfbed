"""The ModelAdapter protocol — the one seam between tabtune and a model family — and shared helpers.

A family is two classes: its ``ModelSpec`` (``models/specs/<name>.py``: name, tasks, limits, sizes, config
schema, checkpoint files), which ``tabtune ls``, ``train --help`` and config validation read, and its
adapter (``models/<name>.py``), which subclasses the spec and adds the architecture. Importing this module
imports no torch, so the specs stay light: the functions that compute import it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..config import ModelConfig
from ..errors import TabTuneError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn


@dataclass(frozen=True)
class Task:
    """What the model predicts: ``classification`` with ``n_classes`` labels, or ``regression``."""

    kind: str
    n_classes: int = 0

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


class ModelSpec:
    """What a model family is, without torch: its names, tasks, limits, random sizes, config schema and
    checkpoint files. ``tabtune ls``, ``train --help`` and config validation read only this; the family's
    adapter subclasses its spec, so these are written once (``models/specs/<name>.py``)."""

    name: ClassVar[str]
    title: ClassVar[str]                  # the model's own spelling, for tables
    config_class: ClassVar[type] = ModelConfig
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    max_classes: ClassVar[int | None] = None   # widest head; None = unlimited
    # True where the model's own predict handles more classes than its head (TabICL's hierarchy);
    # otherwise tabtune's generic hierarchy (predict_classes) does
    native_many_classes: ClassVar[bool] = False
    # whether the adapter's episodes carry gradients to the context rows' features (strategy=context learns
    # them); a model whose package preprocesses each member's rows in numpy has none
    context_gradients: ClassVar[bool] = False
    sizes: ClassVar[dict[str, dict]] = {}      # named random-weight sizes
    limits: ClassVar[str] = ""                  # what the model takes, in words (`tabtune ls`)
    repo_id: ClassVar[str | None] = None       # the official weights on the Hugging Face Hub
    checkpoints: ClassVar[dict[str, str]] = {}  # task kind -> official checkpoint file name
    default_lora_prefixes: ClassVar[tuple[str, ...]] = ()  # module-name prefixes LoRA reaches by default
    # True where the model's package preprocesses numbers itself (imputation, scaling, transforms per member)
    # and training follows it: numeric columns then reach it as the user gave them (``data.preprocess``)
    raw_numbers: ClassVar[bool] = False

    def checkpoint_file(self, config: ModelConfig, task: Task, fetch: bool = True) -> Path | None:
        """The local checkpoint ``build`` will load (None for random weights); errors before any run starts.

        ``fetch=False`` (``tabtune validate``): check that a missing official file could be fetched, and
        download nothing; None then stands for a file the Hub has but this machine does not yet."""
        if not config.pretrained:
            return None
        return resolve_checkpoint(config, repo_id=self.repo_id, filename=self.checkpoints[task.kind],
                                  model_title=self.title, fetch=fetch)

    def random_size(self, config: ModelConfig) -> dict:
        """The constructor arguments of the random-weight size ``model.size``; an unknown size is refused."""
        if config.size not in self.sizes:
            raise TabTuneError(f"model.size: unknown size {config.size!r} for {self.name} "
                               f"(known: {', '.join(self.sizes)})")
        return dict(self.sizes[config.size])

    def feature_limit(self, config: ModelConfig, strategy: str) -> int | None:
        """The most features (preprocessed columns) this model takes under ``strategy``; None: any number.
        A wider table is refused before a run starts (``commands.train.preflight``)."""
        return None

    def check_task(self, task: Task, strategy: str) -> None:
        """Refuse a task this model cannot do, before any training."""
        if task.kind not in self.tasks:
            raise TabTuneError(f"model {self.name!r} does not support {task.kind} (it supports: {', '.join(self.tasks)})")


class ModelAdapter(ModelSpec):
    """One model family. Subclasses fill in the architecture; the rest of tabtune knows only this."""

    # -- building ----------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task) -> tuple[nn.Module, dict]:
        """Return ``(module, architecture)``; ``architecture`` is JSON that :meth:`from_architecture` rebuilds."""
        raise NotImplementedError

    def from_architecture(self, architecture: dict) -> nn.Module:
        """Return a module of the saved architecture (weights to be loaded by the caller)."""
        raise NotImplementedError

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """Write ``module``'s weights in the model's official checkpoint format into the folder ``path``
        and return the checkpoint file written (the path ``model.checkpoint`` takes).

        ``module`` is a plain module of ``architecture`` (LoRA already merged: no peft wrapper). The
        file keeps the official name where the model has one, is written atomically (``rundir``),
        and loads with the model's own package where there is one; torch files hold only tensors
        and plain containers, so ``torch.load(..., weights_only=True)`` reads them. Existing files
        of the same name are replaced: refusing to overwrite is the caller's decision.
        """
        raise TabTuneError(f"{self.title} has no official checkpoint format that tabtune can write")

    # -- forward -----------------------------------------------------------------------------
    def episode_logits(self, module: nn.Module, X_context: Tensor, y_context: Tensor, X_query: Tensor,
                       task: Task, config: ModelConfig | None = None) -> Tensor:
        """Differentiable outputs for a batch of episodes: (B, n_query, n_classes) logits, or the
        model's regression outputs. Context and query rows are disjoint by construction. ``config``
        is the run's model config (None: the defaults), for a model whose inputs depend on it."""
        raise NotImplementedError

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        """Mean training loss of :meth:`episode_logits` outputs on the query labels."""
        from torch import nn

        if task.is_classification:
            return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y_query.reshape(-1))
        raise NotImplementedError

    def predict(self, module: nn.Module, X_context: np.ndarray, y_context: np.ndarray, X_query: np.ndarray,
                task: Task, config: ModelConfig, device: torch.device) -> np.ndarray:
        """Class probabilities (n_query, n_classes), or point predictions (n_query,) for regression."""
        raise NotImplementedError

    def pretrain_logits(self, module: nn.Module, X: Tensor, y_context: Tensor, n_features: Tensor) -> Tensor:
        """The training forward on a batch of synthetic tables as a prior draws them (``tabtune pretrain``):
        ``X`` (B, rows, features) with the first ``y_context.shape[1]`` rows the context, ``n_features`` (B,)
        the columns each table really has (the rest zero padding). Returns the query rows' outputs over the
        whole head: (B, query rows, max_classes) logits, or the regression outputs ``episode_loss`` reads."""
        raise TabTuneError(f"tabtune cannot pretrain {self.title} (no training forward on prior tables)")

    # -- tables ------------------------------------------------------------------------------
    def preprocessor(self, config: ModelConfig, text_columns: list | None = None, text_features: int = 8):
        """A fresh preprocessor for this model's tables (default: the shared one); ``fit(X, y)`` then ``transform``.

        ``text_columns`` (None: detected) and ``text_features`` say how free-text columns are read; numbers pass
        as given where the model's package reads them itself (``raw_numbers``)."""
        from ..data.preprocess import Preprocessor

        return Preprocessor(one_hot_max_levels=self.one_hot_max_levels(config), text_columns=text_columns,
                            text_features=text_features, raw_numbers=self.raw_numbers)

    def preprocessor_from_json(self, state: dict, config: ModelConfig):
        """The fitted preprocessor a saved pipeline wrote with ``to_json``."""
        from ..data.preprocess import Preprocessor

        return Preprocessor.from_json(state)

    # -- context -----------------------------------------------------------------------------
    def one_hot_max_levels(self, config: ModelConfig) -> int:
        """Categorical columns with at most this many levels reach the model one-hot (0: all as codes)."""
        return 0

    def prediction_context(self, labels: np.ndarray | None, n_rows: int, config: ModelConfig, seed: int) -> np.ndarray:
        """Training rows handed to :meth:`predict` as context: all, or a seeded stratified ``max_context_rows``."""
        from ..data.episodes import context_rows

        return context_rows(labels, n_rows, config.max_context_rows, seed)

    def plan_episodes(self, episodes: list, X: np.ndarray, config: ModelConfig, rng: np.random.Generator) -> list:
        """One epoch's episodes as this model trains on them (default: the sampler's, unchanged).

        A model whose prediction context is not a random sample (e.g. retrieved neighbours) reshapes
        them here, keeping context and query rows disjoint."""
        return episodes

    # -- LoRA --------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes: list[str] | None) -> tuple[list[str], list[str]]:
        """Return ``(target_modules, target_parameters)`` for peft, expanded from module-name prefixes."""
        raise NotImplementedError

    def modules_under(self, module: nn.Module, prefixes: list[str] | None) -> dict[str, nn.Module]:
        """``name -> module`` for every module under ``prefixes`` (default: this model's); unknown prefixes fail."""
        prefixes = list(prefixes or self.default_lora_prefixes)
        names = dict(module.named_modules())
        unknown = [p for p in prefixes if p not in names]
        if unknown:
            raise TabTuneError(f"lora.target_modules: {unknown[0]!r} is not a module of {self.title}")
        return {n: m for n, m in names.items() if under_prefixes(n, prefixes)}

    # -- memory ------------------------------------------------------------------------------
    def set_gradient_checkpointing(self, module: nn.Module, enabled: bool = True) -> None:
        """Have training recompute the activations of ``module``'s repeated blocks in the backward pass
        instead of keeping them (``strategy.gradient_checkpointing``); ``enabled=False`` keeps them again.

        The default: :func:`checkpoint_blocks`. A model with a switch of its own overrides this."""
        checkpoint_blocks(module, enabled, self.title)


def checkpoint_blocks(module: nn.Module, enabled: bool = True, title: str = "the model") -> int:
    """Run each block of ``module``'s block stacks through ``torch.utils.checkpoint`` (non-reentrant) in
    training with grad enabled (``enabled``), or plainly again; return how many blocks it reached.

    A stack is an ``nn.ModuleList`` of at least two modules of one class (a transformer's layers); a
    stack inside a block already reached is left to that block's recomputation. The block's class is
    swapped for a subclass whose ``forward`` checkpoints, so parameters, names and outputs stay as they
    are; outside training (or under ``no_grad``) it is the block's own forward. A model that runs its
    blocks through other methods than ``forward`` recomputes nothing: the first training forward then
    says so in a warning (the numbers are the same either way)."""
    import logging

    import torch
    from torch import nn

    reached: list[str] = []
    for name, stack in module.named_modules():
        if (not isinstance(stack, nn.ModuleList) or len(stack) < 2 or len({type(b) for b in stack}) != 1
                or any(name.startswith(r + ".") for r in reached)):
            continue
        for index, block in enumerate(stack):
            plain = getattr(type(block), "checkpointed_from", type(block))
            block.__class__ = _checkpointed_class(plain) if enabled else plain
            reached.append(f"{name}.{index}" if name else str(index))
    if enabled:
        before = _CHECKPOINTED_CALLS[0]

        def check(root, args, output):
            if root.training and torch.is_grad_enabled():
                handle.remove()
                if _CHECKPOINTED_CALLS[0] == before:
                    logging.getLogger("tabtune").warning(
                        "strategy.gradient_checkpointing: %s runs none of its repeated blocks through their forward, "
                        "so nothing is recomputed and training keeps its usual memory", title)

        handle = module.register_forward_hook(check)
    return len(reached)


_CHECKPOINTED: dict[type, type] = {}
_CHECKPOINTED_CALLS = [0]  # training forwards through a checkpointed block, for checkpoint_blocks' warning


def _checkpointed_class(plain: type) -> type:
    """``plain``'s subclass whose forward runs through ``torch.utils.checkpoint`` in training (one per class)."""
    if plain not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            import torch
            from torch.utils.checkpoint import checkpoint

            if self.training and torch.is_grad_enabled():
                _CHECKPOINTED_CALLS[0] += 1
                return checkpoint(plain.forward, self, *args, use_reentrant=False, **kwargs)
            return plain.forward(self, *args, **kwargs)

        _CHECKPOINTED[plain] = type(plain.__name__, (plain,), {"forward": forward, "checkpointed_from": plain,
                                                               "__module__": plain.__module__})
    return _CHECKPOINTED[plain]


@contextmanager
def frozen_parameters(module: nn.Module):
    """Parameters with ``requires_grad`` off for the block, then as they were.

    torch's matmul folds a 3-D input into one 2-D product or not depending on whether the weight
    requires grad (even under ``no_grad``), which moves results by an ulp. Freezing makes a pipeline
    right after training predict bit-for-bit like the same pipeline reloaded (whose weights are frozen).
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class ContextCache:
    """What a model computes from its context alone (embeddings, keys/values, fitted preprocessing), kept
    between predictions so that a fitted pipeline pays for its context once.

    An entry is keyed by the context's content, the module (its identity, every parameter's identity and
    in-place version counter, its train/eval mode, peft's active adapters) and ``extra`` (settings that
    change the result), so new weights, a fine-tuning step, an adapter swap or another context rebuild it.
    At most ``size`` entries are kept (least recently used first out).
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(module: nn.Module, arrays: tuple, extra: tuple = ()) -> tuple:
        digest = hashlib.blake2b(digest_size=16)
        for array in arrays:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        weights = tuple((id(p), p._version) for p in module.parameters())
        adapters = getattr(module, "active_adapters", None)
        return (id(module), weights, module.training, str(adapters), digest.hexdigest(), extra)

    def get(self, module: nn.Module, arrays: tuple, build, extra: tuple = ()):
        """The cached value for this module and context, or ``build()`` (then kept)."""
        key = self.key(module, arrays, extra)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = build()
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def settle(self, module: nn.Module, arrays: tuple, value, extra: tuple = ()) -> None:
        """Re-file ``value`` (the entry just used) under ``module``'s current version counters.

        peft's LoRA on a packed parameter (``target_parameters``) that its module does not take as
        factors (``modules.lora_layers.LowRankParamWrapper``; e.g. OrionMSP's row attention ``in_proj_weight``)
        registers and removes a parametrization around every forward, which bumps that parameter's
        version counter without changing its value; call this right after predicting so the next
        prediction still hits. A later change to the weights still moves the counters on, and misses."""
        for key in [k for k, held in self.entries.items() if held is value]:
            del self.entries[key]
        self.entries[self.key(module, arrays, extra)] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def predict_classes(adapter: ModelAdapter, module: nn.Module, X_context: np.ndarray, y_context: np.ndarray,
                    X_query: np.ndarray, task: Task, config: ModelConfig, device: torch.device) -> np.ndarray:
    """``adapter.predict``, for any number of classes: beyond the head's width, a hierarchy of heads.

    The classes are split into at most ``max_classes`` balanced groups; the model predicts the
    group (context labelled by group), then the class within each group (context restricted to
    that group's rows), and the product is the class probability. Groups wider than the head
    recurse. Fine-tuning trains on the same within-group episodes (``data.episodes``).
    """
    width = adapter.max_classes
    if not task.is_classification or width is None or task.n_classes <= width or adapter.native_many_classes:
        with frozen_parameters(module):
            return adapter.predict(module, X_context, y_context, X_query, task, config, device)
    n_groups = min(width, int(np.ceil(task.n_classes / width)))
    groups = np.array_split(np.arange(task.n_classes), n_groups)
    group_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    top = predict_classes(adapter, module, X_context, group_of[y_context], X_query,
                          Task(task.kind, n_groups), config, device)
    probs = np.zeros((len(X_query), task.n_classes))
    for i, members in enumerate(groups):
        rows = np.isin(y_context, members)
        if len(members) == 1:
            probs[:, members[0]] = top[:, i]
            continue
        inner = predict_classes(adapter, module, X_context[rows], np.searchsorted(members, y_context[rows]),
                                X_query, Task(task.kind, len(members)), config, device)
        probs[:, members] = top[:, i:i + 1] * inner
    return probs


def to_task_classes(logits: Tensor, classes, n_classes: int) -> Tensor:
    """Logits (..., len(classes)) over the classes an estimator saw in the context (``classes``, ascending task
    ids) as (..., n_classes) in the task's numbering; a class the context lacks gets -inf (no probability)."""
    import torch

    present = torch.as_tensor(np.asarray(classes, dtype=np.int64), device=logits.device)
    return logits.new_full((*logits.shape[:-1], n_classes), float("-inf")).index_copy(-1, present, logits)


def known_class_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the query rows whose class the episode's context holds: a model whose forward
    numbers the context's classes itself (TabPFN, TabICL's estimator) has no output for another class (-inf
    there), so such a row has nothing to learn from, as prediction gives that class no probability."""
    import torch
    from torch import nn

    logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    # an absent class is exactly -inf; a NaN (diverged weights) must stay in the loss, so the trainer sees it
    known = ~torch.isneginf(logits.gather(1, target[:, None]))[:, 0]
    if not known.any():  # nothing to learn from this batch: zero, still attached to the weights
        return logits[~torch.isneginf(logits)].sum() * 0
    return nn.functional.cross_entropy(logits[known], target[known])


def under_prefixes(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def hub_offline() -> bool:
    """Whether the user asked for the Hugging Face cache alone (``HF_HUB_OFFLINE``, as the Hub client reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The Hub the client talks to: ``HF_ENDPOINT`` (a mirror, at any scheme, host and port) or huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def resolve_checkpoint(config: ModelConfig, *, repo_id: str, filename: str, model_title: str,
                       fetch: bool = True) -> Path | None:
    """Return a local checkpoint file: ``model.checkpoint``, the Hub cache, or a download (the default;
    ``fetch=False``: None once the endpoint has the file, and nothing downloaded).

    A download goes through the Hugging Face client as the models' own packages do: ``HF_ENDPOINT`` (a
    mirror), the user's proxy settings, its progress bar and cache. ``model.allow_download=false`` or
    ``HF_HUB_OFFLINE=1`` means the cache only. When the file is neither cached nor reachable the error says
    which file, which repository, the endpoint that was tried and ``model.checkpoint=``, at once: a first
    request without retries (the client's own metadata call, ``HF_HUB_ETAG_TIMEOUT``) decides, instead of
    the client's minute of retries.
    """
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.is_file():
            raise TabTuneError(f"model.checkpoint: no such file {str(path)!r}")
        return path
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    # the cache alone: hf_hub_download(local_files_only=True) still reaches the Hub (for its user agent)
    cached = try_to_load_from_cache(repo_id=repo_id, filename=filename)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    endpoint = hub_endpoint()
    missing = f"{model_title} checkpoint {filename!r} of {repo_id} is not in the Hugging Face cache, and"
    fix = f"download it from {endpoint}/{repo_id} and pass model.checkpoint=/path/to/{filename}"
    if not config.allow_download:
        raise TabTuneError(f"{missing} model.allow_download=false keeps to the cache: {fix}, or allow downloads")
    if hub_offline():
        raise TabTuneError(f"{missing} HF_HUB_OFFLINE is set, so nothing is downloaded: {fix}, or unset "
                           f"HF_HUB_OFFLINE")
    try:  # one request, no retries: fail in seconds when the endpoint cannot be reached
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = (f"{endpoint} answered {status}" if status else
               f"{endpoint} cannot be reached ({_first_line(exc)})")
        raise TabTuneError(f"{missing} {why}: {fix}") from None
    if not fetch:
        return None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:
        raise TabTuneError(f"{missing} the download from {endpoint} failed ({_first_line(exc)}): {fix}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def load_weights(module: nn.Module, state: dict, path) -> nn.Module:
    """``module`` with ``state`` loaded strictly; a key or shape that does not fit is a TabTuneError naming it."""
    try:  # strict=False only to name the first stray key ourselves; any stray key is refused below
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise TabTuneError(f"{path}: weights do not match its config ({str(exc).splitlines()[-1].strip()[:200]})") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        which = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise TabTuneError(f"{path}: weights do not match its config ({which}; "
                           f"{len(missing)} missing, {len(unexpected)} unexpected)")
    return module


def class_shift_probs(probs: np.ndarray, shift: int) -> np.ndarray:
    """Undo a cyclic label shift applied to the context labels."""
    return np.roll(probs, -shift, axis=-1)


def ensemble_predict(X_context: np.ndarray, y_context: np.ndarray, X_query: np.ndarray, task: Task,
                     n_estimators: int, forward, chunk: int) -> np.ndarray:
    """The mean over ``n_estimators`` members, each a feature order x a cyclic class shift, queries in chunks.

    ``forward(X_context, y_context, X_query)`` (numpy in) gives one chunk's class probabilities, or
    point predictions for regression. Member 0 is the table as given.
    """
    rng = np.random.default_rng(0)
    n_features = X_context.shape[1]
    total = 0.0
    for member in range(n_estimators):
        order = np.arange(n_features) if member == 0 else rng.permutation(n_features)
        shift = member % task.n_classes if task.is_classification else 0
        y_member = (y_context + shift) % task.n_classes if task.is_classification else y_context
        X_member = X_context[:, order]
        pred = np.concatenate([forward(X_member, y_member, X_query[start:start + chunk][:, order])
                               for start in range(0, len(X_query), chunk)])
        total = total + (class_shift_probs(pred, shift) if task.is_classification else pred)
    pred = total / n_estimators
    return pred / pred.sum(axis=1, keepdims=True) if task.is_classification else pred
