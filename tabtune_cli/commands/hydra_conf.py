"""Hydra wiring for the CLI: where the config tree is, its schemas, and one-line composition errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..config import DatasetConfig, Device, LeaderboardConfig, LoraSettings, Objective, PretrainConfig, conf_dir
from ..errors import TabTuneError
from ..models.registry import SPECS
from ..strategies import STRATEGIES


@dataclass
class TrainSchema:
    """The top of ``train.yaml``; each model group option brings its own schema for ``model``."""

    model: Any = None
    strategy: Any = None  # each strategy group option brings its own schema (strategies.STRATEGIES)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    device: Device = Device.auto
    seed: int = 0
    objective: Objective = Objective.auto  # the validation metric a job returns to a sweeper (hparams_search)
    threads: Optional[int] = None  # torch threads; None: all cores, shared out among parallel sweep jobs


def register() -> None:
    """Register the schemas and resolvers every composition needs (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    store.store(name="pretrain_schema", node=PretrainConfig)
    store.store(name="leaderboard_schema", node=LeaderboardConfig)
    for name, spec in SPECS.items():
        store.store(group="schema/model", name=name, node=spec.config_class)
    for name, strategy in STRATEGIES.items():
        store.store(group="schema/strategy", name=name, node=strategy.config_class)
    if not OmegaConf.has_resolver("tabtune.is_set"):
        OmegaConf.register_new_resolver("tabtune.is_set", lambda value: value is not None)
    if not OmegaConf.has_resolver("tabtune.models_help"):
        OmegaConf.register_new_resolver("tabtune.models_help", models_help)
    if not OmegaConf.has_resolver("tabtune.direction"):
        OmegaConf.register_new_resolver("tabtune.direction", _metric_direction)
    if not OmegaConf.has_resolver("tabtune.times"):  # lora_alpha: ${tabtune.times:2,${lora.r}}
        OmegaConf.register_new_resolver("tabtune.times", lambda a, b: a * b)


def _metric_direction(name: str) -> str:
    """``evaluation.metrics.direction``, imported when a config asks: that module imports scikit-learn, which
    ``train --help`` and config validation do not need (issue #15)."""
    from ..evaluation.metrics import direction

    return direction(name)


def models_help() -> str:
    """The models block of ``tabtune train --help``: each model's tasks, limits and default LoRA targets."""
    lines = ["== Models (model=<name>) =="]
    for name, spec in sorted(SPECS.items()):
        lines.append(f"{name} ({spec.title}): {', '.join(spec.tasks)}; {spec.limits}")
        lines.append(f"    LoRA targets (lora.target_modules=null): {', '.join(spec.default_lora_prefixes)}")
    return "\n".join(lines)


def train_help(overrides: list[str] = ()) -> str:
    """``tabtune train [overrides] --help``: the config groups and their options (read from the config tree),
    the config the overrides compose (one composition) and the models. Hydra's own help, which composes every
    group option, took seconds to show the same (issue #15); ``--hydra-help`` still shows Hydra's."""
    root = conf_dir()
    groups = sorted({p.parent.relative_to(root).as_posix() for p in root.rglob("*.yaml") if p.parent != root})
    options = {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in groups}
    options["hydra/launcher"] = ["basic", "joblib", *options.get("hydra/launcher", [])]  # Hydra's own, then ours
    return "\n".join([
        "tabtune train: one run = model x strategy x lora x dataset (conf/train.yaml)", "",
        "== Configuration groups ==", "Compose your configuration from those groups (group=option)", "",
        *(f"{group}: {', '.join(names)}" for group, names in options.items()), "",
        "== Config ==", "Override anything in the config (foo.bar=value)", "",
        OmegaConf.to_yaml(compose_train(list(overrides))).rstrip(), "",
        models_help(), "",
        "Use --hydra-help to view Hydra specific help"])


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one sentence naming the key or option at fault."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    for what, extra in PLUGIN_EXTRAS.items():  # a shipped launcher/sweeper config whose plugin is absent
        if f"Could not find '{what}'" in str(exc) or f"Could not load '{what}'" in str(exc):
            group, _, option = what.rpartition("/")
            return f"{group}={option} needs a Hydra plugin that is not installed: pip install 'tabtune-cli[{extra}]'"
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


# the Hydra plugins behind shipped configs, and the optional extra (pyproject.toml) that installs each
PLUGIN_EXTRAS = {"hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/submitit_local": "slurm",
                 "hydra/launcher/ray": "ray", "hydra/sweeper/optuna": "optuna"}


def check_overrides(argv: list[str], config_name: str, validate=None) -> None:
    """Compose every combination the command line asks for (and ``validate(cfg, given)`` each, ``given``
    being the keys that combination sets), so mistakes fail before any work, in one line."""
    register()
    if HYDRA_FLAGS & set(argv):
        return
    config_dir, config_name, overrides = split_argv(argv, config_name)
    for combo in expand_sweeps(overrides):
        cfg = compose_train(combo, config_name, config_dir)
        if validate is not None:
            validate(cfg, given_keys(combo))


# Hydra's flags that take a value: the user's config folder and the top config's name in it
CONFIG_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-name": "name", "-cn": "name"}


def split_argv(argv: list[str], config_name: str) -> tuple[str | None, str, list[str]]:
    """A Hydra command line as (the user's config folder or None, the top config's name, the overrides)."""
    config_dir, overrides = None, []
    args = iter(argv)
    for arg in args:
        flag, has_value, value = arg.partition("=")
        if flag in CONFIG_FLAGS:
            value = value if has_value else next(args, "")
            if CONFIG_FLAGS[flag] == "dir":
                config_dir = value
            else:
                config_name = value.removesuffix(".yaml")
        elif not arg.startswith("-") and not arg.startswith("hydra."):
            overrides.append(arg)
    return config_dir, config_name, overrides


def given_keys(overrides: list[str]) -> set[str]:
    """The config keys a list of overrides sets explicitly (``lora.r=8`` gives ``lora.r``; a group choice
    such as ``strategy=peft`` gives its group name)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.startswith("hydra.")}


def expand_config_flag(argv: list[str]) -> list[str]:
    """``--config FILE`` spelled as Hydra's ``--config-dir <its folder> --config-name <its name>``.

    The file's folder joins the config search path (after the shipped tree, as Hydra puts it), so the
    file's defaults list can name shipped options (``model: nano``) and ``<folder>/<group>/<name>.yaml``
    files are options of their own (``<group>=<name>``); a name the shipped tree has is refused."""
    out, args = [], iter(argv)
    for arg in args:
        flag, has_value, value = arg.partition("=")
        if flag != "--config":
            out.append(arg)
            continue
        value = value if has_value else next(args, "")
        if not value:
            raise TabTuneError("--config needs a file: --config my.yaml (`tabtune cp train my.yaml` writes one)")
        path = Path(value).expanduser()
        if path.suffix != ".yaml":
            raise TabTuneError(f"--config {value}: a config file's name ends in .yaml (Hydra reads no other)")
        if not path.is_file():
            raise TabTuneError(f"--config {value}: no such file")
        out += ["--config-dir", str(path.resolve().parent), "--config-name", path.stem]
    return out


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
               "--shell-completion", "-sc", "--version", "--config-path", "-cp", "--experimental-rerun"}


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


def compose_train(overrides: list[str], config_name: str = "train", config_dir: str | None = None):
    """Compose ``train.yaml`` (or another top config) with ``overrides``; a bad key, type or option is a
    one-line TabTuneError. ``config_dir`` is the user's config folder (Hydra's ``--config-dir``), searched
    after the shipped tree as in a run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            if config_dir is not None:
                _add_user_folder(config_dir, config_name)
            cfg = compose(config_name=config_name, overrides=overrides)
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            return cfg
    except TabTuneError:
        raise
    except Exception as exc:
        raise TabTuneError(one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def _add_user_folder(config_dir: str, config_name: str) -> None:
    """Restart Hydra's global state with the user's config folder in the search path exactly where
    ``hydra.main`` puts ``--config-dir``: after the shipped tree. A file there named like a shipped one
    would be hidden by it, so that is an error rather than a silently ignored file."""
    # the public compose API cannot add a folder that holds the primary config (hydra.searchpath is read
    # after the primary is looked up); these are the calls hydra.main and initialize_config_dir make
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    folder = Path(config_dir).expanduser().resolve()
    if not folder.is_dir():
        raise TabTuneError(f"--config-dir {config_dir}: no such folder")
    shipped = conf_dir()
    if folder == shipped.resolve():
        return
    hidden = [folder / f"{config_name}.yaml"] if (shipped / f"{config_name}.yaml").is_file() else []
    hidden += [path for group in sorted(p for p in shipped.iterdir() if p.is_dir())
               for path in sorted((folder / group.name).glob("*.yaml")) if (group / path.name).is_file()]
    for path in hidden:
        if path.is_file():
            what = path.stem if path.parent == folder else f"{path.parent.name}/{path.stem}"
            raise TabTuneError(f"{path}: the shipped {what} has this name and would be used instead: "
                               f"rename your copy (e.g. my_{path.name})")
    search_path = create_config_search_path(str(shipped))
    search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="tabtune", config_search_path=search_path)
