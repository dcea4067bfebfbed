"""LoRA through Hugging Face peft: the adapter names the targets, peft does the rest.

peft's layers are then computed from their factors (``modules.low_rank``, ``modules.lora_layers``): ``x·Wᵀ``
plus ``scaling·(x·Aᵀ)·Bᵀ``, never ``W + B·A``, and no gradient for the frozen weight; adapters save, load
and merge as peft's own."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from torch import nn

from ..config import LoraSettings
from ..errors import TabTuneError
from ..models.base import ModelAdapter
from ..modules.low_rank import lora_linear, packed_linear  # noqa: F401  (tuning.lora's public names)

log = logging.getLogger("tabtune")


def lora_config(adapter: ModelAdapter, module: nn.Module, settings: LoraSettings):
    """Return the peft LoraConfig that puts adapters on this model's chosen modules and packed parameters."""
    from peft import LoraConfig  # peft imports transformers: seconds, so only when LoRA is used

    target_modules, target_parameters = adapter.lora_targets(module, settings.target_modules)
    if not target_modules and not target_parameters:
        raise TabTuneError("lora.target_modules: no LoRA-capable layer under the given prefixes")
    # peft's LoRA on packed parameters cannot have dropout: then wrap() adds it to the linear targets only
    dropout = 0.0 if target_parameters else settings.lora_dropout
    return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=dropout,
                      target_modules=target_modules or None, target_parameters=target_parameters or None,
                      bias=settings.bias, modules_to_save=settings.modules_to_save)


def low_rank(model):
    """``model`` with peft's LoRA layers computing ``x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ`` (``lora_layers``): no
    per-call ``W + B·A``, no full-size intermediates; same parameters, names and saved files."""
    from ..modules.lora_layers import make_low_rank

    return make_low_rank(model)


def wrap(adapter: ModelAdapter, module: nn.Module, settings: LoraSettings):
    """Return ``module`` with LoRA adapters; only adapter (and ``modules_to_save``) weights train."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    config = lora_config(adapter, module, settings)
    try:
        model = get_peft_model(module, config)
    except ValueError as exc:
        raise TabTuneError(f"lora: {str(exc).splitlines()[0]}") from None
    if settings.lora_dropout and not config.lora_dropout:
        # dropout on the linear targets' input, as lora_dropout means; the packed ones train without it
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and not isinstance(layer, ParamWrapper):
                for name in layer.lora_dropout:
                    layer.lora_dropout[name] = nn.Dropout(settings.lora_dropout)
        log.warning("lora.lora_dropout=%s applies to %s's linear targets; its packed attention weights "
                    "(in_proj_weight) train without dropout, which peft cannot give them", settings.lora_dropout,
                    adapter.title)
    return low_rank(model)


def load(module: nn.Module, path, trainable: bool = False):
    """Return ``module`` with the adapters saved at ``path`` (peft's own loader); ``trainable`` to train them on."""
    from peft import PeftModel

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():  # peft would fall back to a pickled adapter_model.bin: tabtune never reads one
        raise TabTuneError(f"{weights}: missing (tabtune reads adapters only as safetensors)")
    try:
        model = PeftModel.from_pretrained(module, str(path), is_trainable=trainable)
    except Exception as exc:  # a file that is not safetensors, or adapters of another shape
        raise TabTuneError(f"{weights}: cannot load these adapters ({str(exc).splitlines()[0][:160]})") from None
    return low_rank(model)


def add(model, path, name: str) -> None:
    """Load the adapters saved at ``path`` into the peft ``model`` as a further adapter ``name``.

    peft's own ``load_adapter`` matches target names against the wrapped model, where a module inside
    a packed-parameter wrapper (TabICL's ``attn.out_proj`` under ``attn.base_layer``) has another name,
    and silently leaves those adapters out; the names are mapped here, and every saved tensor must land.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise TabTuneError(f"{weights}: missing (tabtune reads adapters only as safetensors)")
    config = LoraConfig.from_pretrained(str(path))
    names = {n for n, _ in model.get_base_model().named_modules()}
    wrapped = {n.replace(".base_layer", ""): n for n in names
               if not n.endswith(".base_layer") and n.replace(".base_layer", "") not in names}
    if isinstance(config.target_modules, (list, set)):
        config.target_modules = sorted(wrapped.get(t, t) for t in config.target_modules)
    from ..modules.lora_layers import make_plain

    make_plain(model)  # peft's add_adapter knows its own layer classes only; low_rank again below
    model.add_adapter(name, config)
    # peft does not descend into a module it already wrapped (TabICL's attn around its out_proj): those
    # LoRA layers get the new adapter here, with peft's own per-layer call
    targets = set(config.target_modules or ())
    for key, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer) and name not in layer.lora_A and key in targets:
            layer.update_layer(name, config.r, config.lora_alpha, config, target_name=key)
    try:
        result = set_peft_model_state_dict(model, load_file(weights), adapter_name=name)
    except Exception as exc:
        raise TabTuneError(f"{weights}: cannot load these adapters ({str(exc).splitlines()[0][:160]})") from None
    if result.unexpected_keys:
        raise TabTuneError(f"{weights}: tensor {result.unexpected_keys[0]!r} fits no adapter of this model")
    low_rank(model)  # layers the new adapter's targets added


def fold(model) -> tuple[nn.Module, int]:
    """The plain module with every LoRA adapter folded into its weight, and how many weights took one.

    peft's ``merge_and_unload`` does the folding (W0 + (alpha/r)·BA, packed ``target_parameters``
    included), but it never visits a LoRA layer that sits inside another adapted module: the
    ``out_proj`` of an attention whose packed ``in_proj_weight`` it parametrizes (TabICL, OrionMSP,
    OrionBix; peft 0.21) stays an active, unmerged LoRA layer. Those are folded here, one by one,
    with peft's own per-layer merge, so the result holds the official state-dict keys only.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    n_layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    module = model.merge_and_unload()
    while True:
        left = next(((n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)), None)
        if left is None:
            break
        name, layer = left
        if hasattr(layer, "unload_and_optionally_merge_module"):
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, plain)
    stray = next((n for n, m in module.named_modules() if isinstance(m, ModulesToSaveWrapper)), None)
    if stray is not None:
        raise TabTuneError(f"peft left a wrapped module in place after merging ({stray}); nothing was written")
    return module, n_layers


def auto_rank(n_train: int) -> int:
    """The seeds' rule of thumb, r = max(4, n_train / 50,000), rounded to the nearest power of two."""
    return 2 ** round(math.log2(max(4.0, n_train / 50_000)))


def write_card(path, facts: dict):
    """Write the model card ``README.md`` into the adapter folder ``path`` and return its path.

    It replaces the template with empty fields that peft's ``save_pretrained`` leaves there. The
    facts: ``model``, ``checkpoint``, ``dataset``, ``strategy``, ``task`` (text, or ``{"kind",
    "n_classes"}``), ``lora`` and ``training`` (dicts of settings) and ``metrics`` (``{metric: value}``
    or ``{split: {metric: value}}``). A saved pipeline's own description (``pipeline.json``'s dict)
    serves as well: ``model_name``, ``tuning_strategy``, ``peft_config``, ``tuning_params``,
    ``model_params``, ``val_metrics`` and ``provenance`` are read as those facts. A fact that is
    missing gets no line (no empty fields); other keys are not shown.
    """
    import json
    from pathlib import Path

    from .. import rundir

    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return ", ".join(text(x) for x in v) or "none"
        if isinstance(v, dict):
            return "`" + json.dumps(v, default=str) + "`"
        return str(v).replace("|", "\\|").replace("\n", " ")

    def table(header: tuple[str, ...], rows: list) -> list[str]:
        return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
                *(f"| {' | '.join(text(c) for c in row)} |" for row in rows), ""]

    model_params = facts.get("model_params") or {}
    provenance = facts.get("provenance") or {}
    checkpoint = facts.get("checkpoint")
    if checkpoint is None and isinstance(provenance.get("checkpoint"), dict):
        checkpoint = f"{provenance['checkpoint'].get('path')} (sha256 {provenance['checkpoint'].get('sha256')})"
    if checkpoint is None and model_params:
        checkpoint = model_params.get("checkpoint") or (
            f"random weights, size {model_params.get('size')}" if model_params.get("pretrained") is False else None)
    dataset = facts.get("dataset")
    source = provenance.get("dataset") if isinstance(provenance.get("dataset"), dict) else {}
    if dataset is None and provenance.get("data_sha256"):
        named = source.get("path") or source.get("name")
        dataset = (f"{named}, " if named else "") + f"training rows sha256 {provenance['data_sha256'][:16]}…"
    task = facts.get("task")
    if isinstance(task, dict):
        task = task.get("kind", "") + (f", {task['n_classes']} classes" if task.get("n_classes") else "")
    training = facts.get("training") or {k: v for k, v in (facts.get("tuning_params") or {}).items() if k != "name"}
    metrics = facts.get("metrics") or ({"validation": facts["val_metrics"]} if facts.get("val_metrics") else None)
    model = facts.get("model") or facts.get("model_name")
    basics = [("model", model), ("base checkpoint", checkpoint), ("dataset", dataset), ("task", task),
              ("strategy", facts.get("strategy") or facts.get("tuning_strategy"))]
    basics = [(k, v) for k, v in basics if v not in (None, "")]

    lines = ["---", "library_name: peft", f"tags: {json.dumps(['tabtune', 'lora', 'tabular'])}", "---", "",
             f"# LoRA adapters for {model or 'a tabular foundation model'}", "",
             "Trained with tabtune. `adapter_model.safetensors` and `adapter_config.json` are Hugging Face peft's "
             "own files: `PeftModel.from_pretrained` loads them onto the module tabtune builds for this model. "
             "`tabtune merge run=<this folder>` folds them into the base weights and writes the model's official "
             "checkpoint, which the model's own package loads.", ""]
    if basics:
        lines += table(("", ""), basics)
    for title, settings in (("LoRA settings", facts.get("lora") or facts.get("peft_config")), ("Training", training)):
        if isinstance(settings, dict) and settings:
            lines += [f"## {title}", "", *table(("setting", "value"), [(k, v) for k, v in settings.items()
                                                                       if v is not None])]
    if isinstance(metrics, dict) and metrics:
        splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        if not splits:
            splits = {"value": metrics}
        names = list(dict.fromkeys(m for split in splits.values() for m, v in split.items()
                                   if isinstance(v, (int, float))))
        lines += ["## Metrics", "", *table(("metric", *splits), [(m, *(s.get(m, "") for s in splits.values()))
                                                                  for m in names])]
    return rundir.write_text(Path(path) / "README.md", "\n".join(lines))
