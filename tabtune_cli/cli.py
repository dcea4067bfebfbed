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
  ls      list models, strategies, built-in datasets and presets
  leaderboard  contenders side by side on several tables (conf/leaderboard.yaml)
  pretrain  pretrain the embedded nano model on synthetic tables (conf/pretrain.yaml; resumes)

Errors print one line; set TABTUNE_DEBUG=1 for the full traceback.
"""


def _commands():
    from .commands import leaderboard, ls, pretrain, train

    return {"train": train.run, "ls": ls.run, "pretrain": pretrain.run, "leaderboard": leaderboard.run}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    commands = _commands()
    command = commands.get(argv[0])
    if command is None:
        print(f"tabtune: error: unknown command {argv[0]!r} (commands: {', '.join(commands)})", file=sys.stderr)
        return 2
    try:
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
