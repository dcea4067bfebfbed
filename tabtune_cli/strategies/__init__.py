"""The strategies, by the name ``strategy=<name>`` / ``tuning_strategy=`` gives them.

Adding one: its module here (a :class:`~.base.Strategy`), its YAML (``conf/strategy/<name>.yaml``), one row
below, and one row in ``tests/test_strategies.py``'s contract (CONTRIBUTING.md has the checklist).
"""

from __future__ import annotations

from ..errors import TabTuneError
from .base import Strategy
from .base_ft import BaseFT
from .context import Context
from .inference import Inference
from .peft import Peft

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Inference(), BaseFT(), Peft(), Context())}


def get_strategy(name) -> Strategy:
    """The strategy called ``name``; an unknown name is one line listing the known ones."""
    strategy = STRATEGIES.get(str(name))
    if strategy is None:
        raise TabTuneError(f"unknown strategy {str(name)!r} (available: {', '.join(STRATEGIES)})")
    return strategy


def check_strategy(config, model=None) -> Strategy:
    """The strategy ``config`` names, its keys' values checked (one line naming the key at fault), and the
    model (its spec) it is to tune, when given, checked to be one it can."""
    from ..config import check_strategy_values

    strategy = get_strategy(config.name)
    config.name = strategy.name
    check_strategy_values(config)
    strategy.check(config)
    if model is not None:
        strategy.check_model(model)
    return strategy


def check_combination(model, config, lora, given: set[str]) -> list[str]:
    """A warning for each setting in ``given`` this combination ignores; a contradiction or a value peft would
    refuse is a one-line TabTuneError naming the keys. The one check the command line and the library share.

    ``given`` holds the dotted keys the user set explicitly (``{"strategy.epochs", "lora.r"}``): the command
    line's overrides, or the library's ``tuning_params``/``peft_config`` keys. Values are checked whoever set
    them; only explicit keys are warned about, since every shipped default is harmless."""
    from ..config import check_model_lora

    return check_model_lora(model, lora, given) + get_strategy(config.name).ignored(given, model, config)
