"""Typed schemas for every config group: the one place where keys, types and allowed values live.

The Hydra CLI registers these dataclasses in its ConfigStore so that a misspelled
key or a wrong type fails at composition; the Python API validates plain dicts
against the same dataclasses with :func:`from_dict`. Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import TabTuneError


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Scheduler(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class MixedPrecision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TaskKind(str, Enum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


class Objective(str, Enum):
    """The validation metric a sweep's job returns for its sweeper to optimise (``hparams_search``): ``auto``
    is the one training watches (log loss, or RMSE); the others are ``evaluation.metrics.METRICS``."""
    auto = "auto"
    accuracy = "accuracy"
    balanced_accuracy = "balanced_accuracy"
    f1_macro = "f1_macro"
    f1_weighted = "f1_weighted"
    roc_auc = "roc_auc"
    log_loss = "log_loss"
    brier = "brier"
    ece = "ece"
    rmse = "rmse"
    mae = "mae"
    r2 = "r2"


def conf_dir() -> Path:
    """The config tree: inside the installed package, or ``conf/`` at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise TabTuneError(f"the config tree is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def group_defaults(group: str, option: str) -> dict:
    """The values of a shipped config option (``conf/<group>/<option>.yaml``), its defaults list followed
    within its group as Hydra composes it (``peft.yaml`` over ``base-ft.yaml``; a ``/schema/...`` entry is
    the option's type, not values), so the Python API starts from exactly what the command line composes."""
    from omegaconf import OmegaConf

    path = conf_dir() / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    merged = {}
    for parent in values.pop("defaults", None) or []:
        if isinstance(parent, str) and parent != "_self_" and not parent.startswith("/"):
            merged.update(group_defaults(group, parent))
    return {**merged, **values}


def recipe_defaults(model: str, strategy: str) -> dict:
    """The strategy keys of the model's own recipe for ``strategy`` (``conf/recipe/<model>_<strategy>.yaml``, its
    defaults list followed, as Hydra composes it); {} where the model has none (the strategy's defaults stand)."""
    return group_defaults("recipe", f"{model}_{strategy}")


# the training keys' defaults live in one place, conf/strategy/base-ft.yaml: StrategyConfig() is what a
# base-ft run composes, and peft.yaml (and every training strategy's YAML) inherits from it
_TRAINING = group_defaults("strategy", "base-ft")


@dataclass
class StrategyConfig:
    """How the model is tuned; the keys are the Python API's ``tuning_params``. The defaults are
    ``conf/strategy/base-ft.yaml``'s (read from it: one place, with its comments on each key)."""

    # a plain string so Hydra accepts the value spelling "base-ft"; the registry (strategies/) knows the names
    name: str = "base-ft"
    # training comes in epochs of steps_per_epoch optimizer steps, each epoch ending in a validation pass
    # (early stopping counts epochs); so the amount of training does not grow or shrink with the table.
    # steps_per_epoch null: an epoch is one pass over the training rows (episodes of query_size rows)
    epochs: int = _TRAINING["epochs"]
    steps_per_epoch: Optional[int] = _TRAINING["steps_per_epoch"]
    learning_rate: float = _TRAINING["learning_rate"]
    batch_size: int = _TRAINING["batch_size"]
    optimizer: Optimizer = Optimizer(_TRAINING["optimizer"])
    weight_decay: float = _TRAINING["weight_decay"]
    scheduler: Scheduler = Scheduler(_TRAINING["scheduler"])
    warmup_steps: int = _TRAINING["warmup_steps"]
    max_grad_norm: Optional[float] = _TRAINING["max_grad_norm"]
    gradient_accumulation_steps: int = _TRAINING["gradient_accumulation_steps"]
    mixed_precision: MixedPrecision = MixedPrecision(_TRAINING["mixed_precision"])
    early_stopping_patience: Optional[int] = _TRAINING["early_stopping_patience"]
    context_size: int = _TRAINING["context_size"]
    query_size: int = _TRAINING["query_size"]
    # validation passes predict at most val_max_rows of the validation split (a seeded stratified subset;
    # null: all) with at most val_n_estimators ensemble members (null: the model's n_estimators)
    val_max_rows: Optional[int] = _TRAINING["val_max_rows"]
    val_n_estimators: Optional[int] = _TRAINING["val_n_estimators"]
    # ensemble members a training episode goes through, for a model whose prediction preprocesses each member
    # (TabICL, TabPFN: their estimators' own members, as prediction fits them on the context); null: the
    # model's n_estimators
    train_n_estimators: Optional[int] = _TRAINING["train_n_estimators"]
    # the validation metric early stopping watches and the best weights are kept by, per task kind
    # ({classification: roc_auc}); a kind not named watches the training objective's (log_loss, rmse)
    early_stopping_metric: Dict[str, str] = field(default_factory=lambda: dict(_TRAINING["early_stopping_metric"]))
    show_progress: bool = _TRAINING["show_progress"]
    # recompute each repeated block's activations in the backward pass instead of keeping them (less
    # memory, about one more forward's time a step); the model adapter decides what its blocks are
    gradient_checkpointing: bool = _TRAINING["gradient_checkpointing"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters, passed to Hugging Face ``peft.LoraConfig``."""

    # the rank, or "auto": the seeds' rule r = max(4, n_train / 50,000) rounded to a power of two
    r: Any = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # null: the model adapter's defaults; else module-name prefixes to reach
    target_modules: Optional[List[str]] = None
    bias: str = "none"
    # extra modules trained in full and saved beside the adapters (e.g. the head)
    modules_to_save: Optional[List[str]] = None
    # LoRA+: the B matrices learn at lr_ratio x the learning rate (null: the same rate)
    lr_ratio: Optional[float] = None


@dataclass
class ModelConfig:
    """Keys every model shares; an adapter may subclass this with its own."""

    name: str = "tabicl"
    checkpoint: Optional[str] = None
    pretrained: bool = True
    size: str = "tiny"
    allow_download: bool = True  # a missing official checkpoint is fetched from the Hub (or HF_ENDPOINT)
    # ensemble members at prediction; a model whose package chooses them itself takes null for "the package's"
    n_estimators: Optional[int] = 4
    max_context_rows: Optional[int] = 2048  # training rows used as context at prediction (null: every row)
    softmax_temperature: Optional[float] = 0.9  # null: the package's own ("auto" where it has one)
    # a peft run directory whose LoRA adapters this run starts from (peft trains them on; inference and
    # base-ft fold them into the weights first)
    adapters: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = "custom"
    builtin: Optional[str] = None
    path: Optional[str] = None
    target: Optional[str] = None
    test_path: Optional[str] = None
    task: TaskKind = TaskKind.auto
    # share of the rows held out for testing (null: 0.2); not with test_path
    test_size: Optional[float] = None
    val_size: float = 0.1
    drop_columns: List[str] = field(default_factory=list)
    # subsample the table before splitting (null: every row); used by smoke runs
    max_rows: Optional[int] = None
    # free-text columns (null: detected, see data.preprocess.is_text; []: none). ContextTab reads them as
    # text; the other models get text_features numeric features per column from their embeddings (0: dropped)
    text_columns: Optional[List[str]] = None
    text_features: int = 8


def _coerce(name: str, hint: Any, value: Any, where: str) -> Any:
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise TabTuneError(f"{where}.{name}: a value is required, got null")
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value.value if isinstance(value, Enum) else value)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise TabTuneError(f"{where}.{name}: {value!r} is not one of: {allowed}") from None
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise TabTuneError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
        return kind(value)
    if kind is bool and not isinstance(value, bool):
        raise TabTuneError(f"{where}.{name}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise TabTuneError(f"{where}.{name}: expected a string, got {value!r}")
    if typing.get_origin(kind) in (list, List):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TabTuneError(f"{where}.{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_coerce(name, item, v, where) for v in value] if item is not Any else list(value)
    return value


def from_dict(cls, values: Optional[dict], where: str):
    """Return ``cls`` filled from ``values``; an unknown key or a wrong value is a TabTuneError naming it."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TabTuneError(f"unknown {where} key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(k, hints[k], v, where) for k, v in values.items()})


def to_dict(obj) -> dict:
    """Plain, JSON-ready dict of a config dataclass (enums as their strings)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        plain = lambda x: x.value if isinstance(x, Enum) else x  # noqa: E731
        out[f.name] = [plain(x) for x in v] if isinstance(v, (list, tuple)) else plain(v)
    return out


def check_strategy_values(s: StrategyConfig) -> None:
    """Reject values of the training keys that cannot work, with the key at fault (the strategy's name and
    its own keys are the strategy's to check: ``strategies.check_strategy``)."""
    positive = ["epochs", "steps_per_epoch", "batch_size", "gradient_accumulation_steps", "context_size",
                "query_size", "val_max_rows", "val_n_estimators", "train_n_estimators"]
    for key in positive:
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise TabTuneError(f"strategy.{key} must be at least 1, got {getattr(s, key)}")
    if s.learning_rate <= 0:
        raise TabTuneError(f"strategy.learning_rate must be positive, got {s.learning_rate}")
    if s.warmup_steps < 0:
        raise TabTuneError(f"strategy.warmup_steps must be >= 0, got {s.warmup_steps}")
    from .evaluation.metrics import METRICS

    for kind, metric in dict(s.early_stopping_metric or {}).items():
        if kind not in METRICS:
            raise TabTuneError(f"strategy.early_stopping_metric: unknown task kind {kind!r} "
                               f"(known: {', '.join(METRICS)})")
        if metric not in METRICS[kind]:
            raise TabTuneError(f"strategy.early_stopping_metric.{kind}: unknown metric {metric!r} "
                               f"(known: {', '.join(METRICS[kind])})")


@dataclass
class PriorSettings:
    type: str = "mix_scm"
    tables_per_step: int = 32
    tables_per_group: int = 8
    min_rows: Optional[int] = None
    max_rows: int = 256
    max_features: int = 100
    max_classes: int = 10
    log_n_features: bool = True
    min_context_fraction: float = 0.3
    max_context_fraction: float = 0.9


@dataclass
class PretrainConfig:
    """``tabtune pretrain`` (conf/pretrain.yaml; each model's pretraining recipe in conf/pretrain_model/)."""

    # ``name``: the model (its adapter); the other keys: its architecture, the constructor's arguments
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "nano"})
    prior: PriorSettings = field(default_factory=PriorSettings)
    steps: int = 20000
    stop_at: Optional[int] = None
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    scheduler: Scheduler = Scheduler.cosine
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    threads: int = 0
    prior_workers: int = 1
    checkpoint_every: int = 50
    eval_every: int = 250
    eval_tables: str = "../shared/datasets"
    eval_settings: Dict[str, Any] = field(default_factory=dict)  # model.* keys of the zero-shot tracking
    out_dir: str = "runs/pretrain/nano"
    show_progress: bool = True


class CrossValidation(str, Enum):
    split = "split"   # `splits` seeded train/test splits, test_size of the rows held out in each
    kfold = "kfold"   # `splits`-fold cross-validation (stratified for classification), seeded


@dataclass
class EntryDefaults:
    """What every leaderboard entry starts from: its model, strategy and overrides unless it gives its own
    (an entry's overrides go over these)."""

    model: str = "nano"
    strategy: str = "inference"
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LeaderboardConfig:
    """``tabtune leaderboard`` (conf/leaderboard*.yaml): entries side by side on tables, on the same folds.

    An entry is ``{model, strategy, overrides}`` (``overrides``: the train config's ``model``, ``strategy`` and
    ``lora`` settings, ``{lora: {r: 8}}``) or ``{baseline: <name>}``, over ``entry_defaults``.
    ``commands.leaderboard.check_board`` checks the entries when the config is composed."""

    datasets: List[Any] = field(default_factory=list)  # names (built-in, shared_dir) or {path, target[, name]}
    shared_dir: str = "../shared/datasets"
    cv: CrossValidation = CrossValidation.split
    splits: int = 3
    test_size: float = 0.3
    max_train_rows: Optional[int] = 1024
    max_test_rows: Optional[int] = 2000
    seed: int = 0
    metric: str = "auto"
    device: Device = Device.auto
    threads: Optional[int] = None  # torch threads; None: torch's default (every core)
    entry_defaults: EntryDefaults = field(default_factory=EntryDefaults)
    entries: Dict[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/leaderboard"


# peft.LoraConfig's bias values
LORA_BIASES = ("none", "all", "lora_only")


def check_model_lora(model: ModelConfig, lora: LoraSettings, given: set[str]) -> list[str]:
    """The model and LoRA keys' part of ``strategies.check_combination``: a warning for each key in ``given``
    the model's settings make idle; a contradiction or a value peft would refuse is a one-line TabTuneError."""
    import numbers

    if model.checkpoint is not None and not model.pretrained:
        raise TabTuneError(f"model.checkpoint={model.checkpoint!r} and model.pretrained=false contradict: random "
                           f"weights never read the checkpoint (drop one of them)")
    for key in ("n_estimators", "max_context_rows"):
        if getattr(model, key) is not None and getattr(model, key) < 1:
            raise TabTuneError(f"model.{key} must be at least 1 (or null: the model's own default), "
                               f"got {getattr(model, key)}")
    if model.softmax_temperature is not None and not model.softmax_temperature > 0:
        raise TabTuneError(f"model.softmax_temperature must be positive, got {model.softmax_temperature}")
    if lora.bias not in LORA_BIASES:
        raise TabTuneError(f"config key 'lora.bias': {lora.bias!r} is not one of: {', '.join(LORA_BIASES)}")
    r = lora.r
    if r != "auto" and (isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1):
        raise TabTuneError(f"config key 'lora.r': expected a whole number >= 1 or 'auto', got {r!r}")
    ratio = lora.lr_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 0):
        raise TabTuneError(f"config key 'lora.lr_ratio': must be greater than 0 (or null), got {ratio!r}")

    warnings = []
    if "model.size" in given and model.pretrained:
        warnings.append("model.size is ignored with model.pretrained=true: a checkpoint has its own architecture "
                        "(sizes are for random weights)")
    if "model.allow_download" in given and model.checkpoint:
        warnings.append("model.allow_download is ignored beside model.checkpoint: the local file is used")
    return warnings
