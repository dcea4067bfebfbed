"""``tabtune ls``: the models, strategies, built-in datasets and presets this install has."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..config import conf_dir, group_defaults, recipe_defaults
from ..data.builtin import BUILTIN
from ..models.registry import SPECS
from ..strategies import STRATEGIES


def run(argv: list[str]) -> int:
    console = Console()
    models = Table(title="models (model=<name>)")
    for col in ("name", "model", "tasks", "limits", "random sizes", "default LoRA targets"):
        models.add_column(col)
    for name, spec in sorted(SPECS.items()):
        models.add_row(name, spec.title, ", ".join(spec.tasks), spec.limits, ", ".join(spec.sizes),
                       "\n".join(spec.default_lora_prefixes))
    console.print(models)

    strategies = Table(title="strategies (strategy=<name>)")
    strategies.add_column("name")
    strategies.add_column("what trains")
    for s in STRATEGIES.values():
        strategies.add_row(s.name, s.description)
    console.print(strategies)
    console.print(_recipes())

    datasets = Table(title="datasets (dataset=<name>)")
    datasets.add_column("name")
    datasets.add_column("source")
    for path in sorted((conf_dir() / "dataset").glob("*.yaml")):
        name = path.stem
        source = f"scikit-learn built-in ({BUILTIN[name][1]})" if name in BUILTIN else "your file: dataset.path=..."
        datasets.add_row(name, source)
    console.print(datasets)
    experiments = Table(title="experiments (experiment=<name>; every run of one: tabtune train -m experiment=<name>)")
    experiments.add_column("name")
    experiments.add_column("setup")
    for path in sorted((conf_dir() / "experiment").glob("*.yaml")):
        experiments.add_row(path.stem, _described(path))
    console.print(experiments)
    presets = ", ".join(p.stem for p in sorted((conf_dir() / "debug").glob("*.yaml")))
    console.print(f"presets: debug=<{presets}>")
    searches = ", ".join(p.stem for p in sorted((conf_dir() / "hparams_search").glob("*.yaml")))
    console.print(f"hyperparameter search: hparams_search=<{searches}>")
    launchers = ", ".join(["joblib", *(p.stem for p in sorted((conf_dir() / "hydra" / "launcher").glob("*.yaml")))])
    console.print(f"sweep launchers: hydra/launcher=<{launchers}> (README: Sweeps)")
    return 0


def _recipes() -> Table:
    """Each model's fine-tuning defaults: its recipe (``conf/recipe/``, with its source) or the strategy's own."""
    # the strategies some model has a recipe for (conf/recipe/<model>_<strategy>.yaml)
    trained = [s for s in STRATEGIES if any((conf_dir() / "recipe").glob(f"*_{s}.yaml"))]
    table = Table(title=f"fine-tuning recipes (the model's defaults for strategy={' / '.join(trained)}; "
                        f"keys you set win)")
    table.add_column("model")
    for strategy in trained:
        table.add_column(strategy)
    for name in sorted(SPECS):
        cells = []
        for strategy in trained:
            path = conf_dir() / "recipe" / f"{name}_{strategy}.yaml"
            keys = {**group_defaults("strategy", strategy), **recipe_defaults(name, strategy)}
            figures = (f"lr {keys['learning_rate']:g}, {keys['epochs']} epochs x {keys['steps_per_epoch'] or 'a pass'}"
                       f" step(s), episodes {keys['context_size']:,} + {keys['query_size']:,} rows, stops on "
                       f"{(keys.get('early_stopping_metric') or {}).get('classification', 'log_loss')}")
            source = _source(path) if path.is_file() else "the strategy's defaults (measured on nano)"
            cells.append(f"{figures}\n{source}")
        table.add_row(name, *cells)
    return table


def _source(path) -> str:
    """A recipe's ``# Source:`` line."""
    return next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                 if line.startswith("# Source:")), "")


def _described(path) -> str:
    """A shipped config's own description: its first comment lines, up to the first usage example."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("# @package"):
            if lines:
                break
            continue
        text = line.lstrip("# ").rstrip()
        if text.startswith("tabtune "):
            break
        lines.append(text)
    return " ".join(lines).rstrip(":")
