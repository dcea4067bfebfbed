"""Hydra wiring for the CLI: where the config tree is, its schemas, and one-line composition errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .config import (DatasetConfig, Device, LeaderboardConfig, LoraSettings, PretrainConfig,
                     StrategyConfig)
from .errors import TabTuneError
from .models.registry import ADAPTERS


@dataclass
class TrainSchema:
    """The top of ``train.yaml``; each model group option brings its own schema for ``model``."""

    model: Any = None
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    device: Device = Device.auto
    seed: int = 0


def conf_dir() -> Path:
    """The config tree: inside the installed package, or ``conf/`` at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise TabTuneError(f"the config tree is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def register() -> None:
    """Register the schemas and resolvers every composition needs (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    store.store(name="pretrain_schema", node=PretrainConfig)
    store.store(name="leaderboard_schema", node=LeaderboardConfig)
    for name, cls in ADAPTERS.items():
        store.store(group="schema/model", name=name, node=cls.config_class)
    if not OmegaConf.has_resolver("tabtune.is_set"):
        OmegaConf.register_new_resolver("tabtune.is_set", lambda value: value is not None)
    if not OmegaConf.has_resolver("tabtune.models_help"):
        OmegaConf.register_new_resolver("tabtune.models_help", models_help)


def models_help() -> str:
    """The models block of ``tabtune train --help``: each model's tasks, limits and default LoRA targets."""
    lines = ["== Models (model=<name>) =="]
    for name, cls in sorted(ADAPTERS.items()):
        lines.append(f"{name} ({cls.title}): {', '.join(cls.tasks)}; {cls.limits}")
        lines.append(f"    LoRA targets (lora.target_modules=null): {', '.join(cls.default_lora_prefixes)}")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one sentence naming the key or option at fault."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(exc, MissingConfigException) or "Could not find" in str(exc):
        text = str(exc)
        first = text.splitlines()[0]
        options = [l.strip() for l in text.splitlines()[1:] if l.startswith("\t") and "=" not in l
                   and not l.strip().endswith("_schema")]
        if "Could not find '" in first:
            what = first.split("Could not find '")[1].split("'")[0]
            group, _, option = what.rpartition("/")
            return f"unknown {group or 'config'} {option!r}" + (f" (available: {', '.join(options)})" if options else "")
        return first
    if isinstance(cause, MissingMandatoryValue):
        return f"config key '{cause.full_key}' is not set"
    if isinstance(cause, ConfigKeyError):
        return f"unknown config key '{cause.full_key}'"
    if isinstance(cause, OmegaConfBaseException):
        message = str(cause).splitlines()[0]
        return f"config key '{cause.full_key}': {message}" if getattr(cause, "full_key", None) else message
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_overrides(argv: list[str], config_name: str, validate=None) -> None:
    """Compose every combination the command line asks for (and ``validate`` each), so mistakes fail
    before any work, in one line."""
    register()
    if HYDRA_FLAGS & set(argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra.")]
    for combo in expand_sweeps(overrides):
        cfg = compose_train(combo, config_name)
        if validate is not None:
            validate(cfg)


def one_line_errors(job):
    """A Hydra job whose TabTuneError prints one line and exits 2 (Hydra would print a traceback)."""
    import functools
    import os
    import sys

    @functools.wraps(job)
    def wrapped(cfg):
        try:
            return job(cfg)
        except TabTuneError as exc:
            if os.environ.get("TABTUNE_DEBUG"):
                raise
            print(f"tabtune: error: {exc}", file=sys.stderr)
            sys.exit(2)
    return wrapped


HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version"}


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every combination a ``-m`` sweep would run, as plain override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise TabTuneError(f"bad override: {str(exc).splitlines()[0]}") from None
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def compose_train(overrides: list[str], config_name: str = "train"):
    """Compose ``train.yaml`` (or another top config) with ``overrides``; a bad key, type or option is a
    one-line TabTuneError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            return cfg
    except TabTuneError:
        raise
    except Exception as exc:
        raise TabTuneError(one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
