"""``tabtune cp`` (copy a shipped config to edit) and ``tabtune validate`` (compose and check without running).

A copied config is used through one mechanism, Hydra's own ``--config-dir``: a folder of your configs
added to the config search path. ``--config my.yaml`` runs a copied top config (and adds its folder);
``--config-dir DIR`` adds group options kept as ``DIR/<group>/<name>.yaml``, selected as
``<group>=<name>`` or named in a copied top config's defaults list. Hydra looks in the shipped tree
first, so a copy named like a shipped config would be ignored: ``cp`` and every command refuse one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .. import __version__
from ..errors import TabTuneError
from .hydra_conf import (CONFIG_FLAGS, HYDRA_FLAGS, compose_train, conf_dir, expand_config_flag, expand_sweeps,
                          given_keys, split_argv)

TOP_CONFIGS = {"train": "train", "pretrain": "pretrain", "leaderboard": "leaderboard",  # config -> its command
               "leaderboard_lora_ranks": "leaderboard", "leaderboard_strategies": "leaderboard"}

CP_USAGE = """usage: tabtune cp <config> <file or folder> [--force]
       tabtune cp --list

Copies a shipped config to a file you edit; never overwrites one unless --force.
  a top config:    tabtune cp train my.yaml           then  tabtune train --config my.yaml [overrides]
  a group option:  tabtune cp strategy/peft my_conf/strategy/slow.yaml
                                                     then  tabtune train --config-dir my_conf strategy=slow
A folder as <file> gets my_<name>.yaml. A copy may not keep a shipped name (train.yaml, strategy/peft.yaml):
Hydra would read the shipped one instead. Check a copy without running: tabtune validate --config my.yaml"""

VALIDATE_USAGE = """usage: tabtune validate [my.yaml | --config my.yaml] [--config-dir DIR] [-m] [overrides]

Composes the train config as `tabtune train` would and makes every check a run makes before it starts
(keys, types, values, combinations, the dataset and its target column, the model's task and checkpoint),
without creating a run directory. Prints the resolved config and `ok`, or one line naming the culprit
(exit 2). With -m, every combination of a sweep is checked."""


def shipped_configs() -> dict[str, Path]:
    """Every config ``tabtune cp`` can copy: the top configs, then ``<group>/<option>`` for each group."""
    root = conf_dir()
    configs = {name: root / f"{name}.yaml" for name in TOP_CONFIGS}
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(group.glob("*.yaml")):
            configs[f"{group.name}/{path.stem}"] = path
    return configs


def _description(path: Path) -> str:
    """The first comment line of a shipped config that says what it is."""
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text
        if line and not line.startswith("#"):
            break
    return ""


def cp(argv: list[str]) -> int:
    """Entry for ``tabtune cp``: copy a shipped config to a file the user edits."""
    if any(a in ("-h", "--help") for a in argv):
        print(CP_USAGE)
        return 0
    force = any(a in ("--force", "-f") for a in argv)
    listing = "--list" in argv
    args = [a for a in argv if a not in ("--force", "-f", "--list")]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise TabTuneError(f"tabtune cp: unknown option {flags[0]!r} (options: --list, --force)")
    configs = shipped_configs()
    if listing or not args:
        width = max(map(len, configs))
        for name, path in configs.items():
            print(f"{name:<{width}}  {_description(path)}")
        return 0
    if len(args) != 2:
        raise TabTuneError("usage: tabtune cp <config> <file> [--force] (`tabtune cp --list` shows the configs)")
    name, target = args[0].removesuffix(".yaml"), Path(args[1]).expanduser()
    if name not in configs:
        raise TabTuneError(f"unknown config {name!r} (available: {', '.join(configs)})")
    if target.is_dir() or args[1].endswith(("/", "\\")):
        target = target / f"my_{Path(name).name}.yaml"
    elif not target.suffix:
        target = target.with_suffix(".yaml")
    elif target.suffix != ".yaml":
        raise TabTuneError(f"{target}: a config file's name ends in .yaml (Hydra reads no other)")
    if target.exists() and not force:
        raise TabTuneError(f"{target} already exists (pass --force to overwrite it)")
    group = name.rpartition("/")[0]
    if (target.stem in TOP_CONFIGS if not group else
            target.parent.name == group and (conf_dir() / group / target.name).is_file()):
        shipped = target.stem if not group else f"{group}/{target.stem}"
        raise TabTuneError(f"{target}: the shipped {shipped} has this name and would be used instead of your copy: "
                           f"choose another (e.g. my_{target.name})")
    if not group:
        use = f"tabtune {TOP_CONFIGS[name]} --config {target} [overrides]"
    else:  # pretrain's model recipes are the group pretrain_model, chosen on its command line as `model=`
        command, choice = ("pretrain", "model") if group == "pretrain_model" else ("train", group)
        if target.parent.name == group:  # <folder>/<group>/<name>.yaml: an option of the folder's
            use = f"tabtune {command} --config-dir {target.parent.parent} {choice}={target.stem}"
        else:
            use = f"keep it as <folder>/{group}/<name>.yaml, then: tabtune {command} --config-dir <folder> {choice}=<name>"
    lines = configs[name].read_text().splitlines(keepends=True)
    # Hydra reads directives (`# @package _global_`) only from the file's first lines: the note goes after them
    directives = next((i for i, line in enumerate(lines) if not re.match(r"\s*#\s*@", line)), len(lines))
    lines.insert(directives, f"# copied by `tabtune cp {name}` from tabtune {__version__}; use it: {use}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w" if force else "x") as out:  # "x": never replace a file that appeared meanwhile
        out.write("".join(lines))
    print(f"copied {name} to {target}")
    print(f"use it: {use}")
    return 0


def validate(argv: list[str]) -> int:
    """Entry for ``tabtune validate``: compose and check every combination; no run directory."""
    from .train import config_warnings_on_console, preflight

    if any(a in ("-h", "--help") for a in argv):
        print(VALIDATE_USAGE)
        return 0
    if argv and argv[0].endswith(".yaml") and "=" not in argv[0]:
        argv = ["--config", *argv]
    argv = expand_config_flag(argv)
    sweep = any(a in ("-m", "--multirun") for a in argv)
    bad = [a for a in argv if a.startswith("-") and a.partition("=")[0] not in CONFIG_FLAGS
           and a not in ("-m", "--multirun")]
    if bad:
        hint = " (validate composes; it takes no Hydra flag but -m, --config and --config-dir)" if bad[0] in HYDRA_FLAGS else ""
        raise TabTuneError(f"tabtune validate: unknown option {bad[0]!r}{hint}")
    config_dir, config_name, overrides = split_argv(argv, "train")
    combos = expand_sweeps(overrides)
    if len(combos) > 1 and not sweep:
        raise TabTuneError("the overrides hold a sweep (a,b values): add -m to check every combination, "
                           "or write a list as [a,b]")
    with config_warnings_on_console():
        for combo in combos:
            try:
                cfg = compose_train(combo, config_name, config_dir)
                if {"model", "strategy", "dataset"} <= set(cfg):  # a train config; others are checked by types
                    preflight(cfg, given_keys(combo), fetch=False)  # creates nothing: no download either
            except TabTuneError as exc:
                if len(combos) > 1:
                    raise TabTuneError(f"[{' '.join(combo)}] {exc}") from None
                raise
            if len(combos) == 1:
                print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            else:
                print(f"ok  {' '.join(combo)}")
    print("ok" if len(combos) == 1 else f"ok: all {len(combos)} combinations")
    sys.stdout.flush()
    return 0
