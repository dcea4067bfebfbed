"""``tabtune <command>``: picks the command and hands the rest to it (Hydra for ``train``)."""

from __future__ import annotations

import os
import sys

from . import __version__
from .errors import TabTuneError

USAGE = f"""tabtune {__version__} — tabular foundation models: inference, full fine-tuning, LoRA

usage: tabtune <command> [args]

commands:
  train   run one job (or a sweep with -m): tabtune train model=tabicl strategy=peft dataset=iris
          `tabtune train --help` shows the config groups and their options
          tabtune train -m lora.r=2,4,8 hydra/launcher=joblib hydra.launcher.n_jobs=2   (jobs side by side)
          tabtune train hparams_search=optuna strategy=peft   (a search; experiment=<name>: a named setup)
  report  runs side by side (a sweep's, or any): table, report.csv, report.md, plots
          tabtune report runs/multirun/<date>/<time> [more dirs] [output=<folder>] [metric=<name>]
  ls      list models, strategies, built-in datasets and presets
  leaderboard  entries (model x strategy x overrides) side by side on tables, cross-validated (conf/leaderboard*.yaml)
  pretrain  pretrain the embedded nano model on synthetic tables (conf/pretrain.yaml; resumes)
  cp      copy a shipped config to edit: tabtune cp train my.yaml, then tabtune train --config my.yaml
          (group options: tabtune cp strategy/peft my_conf/strategy/mine.yaml; --config-dir my_conf strategy=mine)
  validate  compose and check a config as train would, without running: tabtune validate my.yaml [-m] [overrides]
  merge   fold a peft run's LoRA into its base weights, in the model's official checkpoint format:
          tabtune merge run=<run dir> [output=<folder>] [overwrite=true]
  export  a base-ft (or peft) run's weights in the model's official checkpoint format (as merge)
  predict  a finished run on a new table (checked against the training columns): labels and probabilities
          tabtune predict run=<run dir> data=<csv|parquet> [output=<file>] [id=<column>] [overwrite=true]
  evaluate  every metric of a finished run on a labelled table, printed and written as JSON
          tabtune evaluate run=<run dir> data=<csv|parquet> [target=<column>] [output=<file.json>]

Errors print one line; set TABTUNE_DEBUG=1 for the full traceback.
"""


# the Hydra commands whose `--config my.yaml` names a copied top config (tabtune cp)
CONFIG_FILE_COMMANDS = ("train", "pretrain", "leaderboard", "validate")


# command -> (module under tabtune_cli.commands, its entry); only the command run is imported, so that
# `ls`, `validate` and `train --help` do not pay for torch that another command's module imports
COMMANDS = {"train": ("train", "run"), "ls": ("ls", "run"), "pretrain": ("pretrain", "run"),
            "leaderboard": ("leaderboard", "run"), "merge": ("merge", "run"), "export": ("merge", "export"),
            "predict": ("predict", "run"), "report": ("report", "run"), "evaluate": ("predict", "evaluate"),
            "cp": ("config_tools", "cp"), "validate": ("config_tools", "validate")}


def _command(name: str):
    from importlib import import_module

    module, entry = COMMANDS[name]
    return getattr(import_module(f"{__package__}.commands.{module}"), entry)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"tabtune: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    command = _command(argv[0])
    try:
        if argv[0] in CONFIG_FILE_COMMANDS:
            from .commands.hydra_conf import expand_config_flag

            return command(expand_config_flag(argv[1:]))
        return command(argv[1:])
    except TabTuneError as exc:
        if os.environ.get("TABTUNE_DEBUG"):
            raise
        print(f"tabtune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tabtune: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
