"""``tabtune ls``: the models, strategies, built-in datasets and presets this install has."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..config import StrategyName
from ..data.builtin import BUILTIN
from ..hydra_conf import conf_dir
from ..models.registry import ADAPTERS


def run(argv: list[str]) -> int:
    console = Console()
    models = Table(title="models (model=<name>)")
    for col in ("name", "model", "tasks", "limits", "random sizes", "default LoRA targets"):
        models.add_column(col)
    for name, cls in sorted(ADAPTERS.items()):
        models.add_row(name, cls.title, ", ".join(cls.tasks), cls.limits, ", ".join(cls.sizes),
                       "\n".join(cls.default_lora_prefixes))
    console.print(models)

    strategies = Table(title="strategies (strategy=<name>)")
    strategies.add_column("name")
    strategies.add_column("what trains")
    what = {"inference": "nothing: the training rows are the context", "base-ft": "every weight",
            "peft": "LoRA adapters only (Hugging Face peft)"}
    for s in StrategyName:
        strategies.add_row(s.value, what[s.value])
    console.print(strategies)

    datasets = Table(title="datasets (dataset=<name>)")
    datasets.add_column("name")
    datasets.add_column("source")
    for path in sorted((conf_dir() / "dataset").glob("*.yaml")):
        name = path.stem
        source = f"scikit-learn built-in ({BUILTIN[name][1]})" if name in BUILTIN else "your file: dataset.path=..."
        datasets.add_row(name, source)
    console.print(datasets)
    presets = ", ".join(p.stem for p in sorted((conf_dir() / "debug").glob("*.yaml")))
    console.print(f"presets: debug=<{presets}>")
    return 0
