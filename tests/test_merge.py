"""Adapters as artifacts, ``tabtune merge`` / ``export``, and the official checkpoints they write.

For every model (tiny random weights, one short peft run whose LoRA factors are then set to noise,
so that every adapter moves the output):

a) Hugging Face peft's own ``PeftModel.from_pretrained`` puts the run's adapter files onto a freshly
   built base module and reproduces the run's outputs;
b) merging (peft's ``merge_and_unload``, then the nested layers it skips: ``lora.fold``) leaves a
   plain module with the official keys and no LoRA layer that reproduces them too, and every adapted
   tensor (TabICL's packed ``in_proj_weight`` included) is W0 + (alpha/r)·BA by value;
c) ``write_checkpoint`` writes a file that the model's own package loads (tabicl's
   ``TabICLClassifier(model_path=...)``, tabpfn's ``load_model_criterion_config``, tabdpt's
   ``TabDPTClassifier(model_weight_path=...)``) into its own module class, whose raw outputs equal
   the run's, and that tabtune's ``model.checkpoint=`` reads back to the same outputs. Torch files
   hold only plain data: ``torch.load(weights_only=True)`` reads them.

Measured differences and file sizes are printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tabtune_cli import TabularPipeline, cli
from tabtune_cli.models.base import ModelAdapter, Task, frozen_parameters, load_weights
from tabtune_cli.models.registry import ADAPTERS, get_adapter
from tabtune_cli.models.specs.tabpfn import TabPFNConfig
from tabtune_cli.tuning import lora

from conftest import SEED, make_table

NAMES = sorted(ADAPTERS)
# early stopping on the training objective (log loss), whatever a recipe watches: on 12 validation rows ROC AUC
# rarely rises, and the runs must keep trained weights to be merged and exported
TUNING = {"epochs": 1, "context_size": 32, "query_size": 16, "batch_size": 1, "learning_rate": 1e-3,
          "scheduler": "constant", "early_stopping_patience": None, "show_progress": False,
          "early_stopping_metric": {}}
MODEL = {"pretrained": False, "size": "tiny", "n_estimators": 1}
# ContextTab's official format implies 64-wide attention heads: its tiny size (16-wide) has no official file
SIZE = {"contexttab": "small"}
LORA = {"r": 2, "lora_alpha": 4.0}
PEFT_TOLERANCE, MERGED_TOLERANCE, PACKAGE_TOLERANCE = 1e-5, 1e-4, 1e-4
MEASURED: dict[str, dict] = {}


def fit(name: str, strategy: str, X, y):
    tuning = TUNING if strategy != "inference" else {"show_progress": False}
    return TabularPipeline(model_name=name, tuning_strategy=strategy, tuning_params=dict(tuning),
                           model_params={**MODEL, "size": SIZE.get(name, "tiny")},
                           peft_config=dict(LORA) if strategy == "peft" else None,
                           device="cpu", seed=SEED).fit(X, y)


@pytest.fixture(scope="module")
def table():
    return make_table(n=120)


@pytest.fixture(scope="module")
def peft_runs(table, tmp_path_factory):
    """name -> (fitted pipeline, run dir): a short peft run, its LoRA factors set to noise, then saved.

    Noise in both factors: B starts at zero, and so does A of peft's LoRA on an embedding."""
    runs = {}

    def get(name: str):
        if name not in runs:
            pipe = fit(name, "peft", *table)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n, p in pipe.module_.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            pipe.module_.eval()
            run_dir = tmp_path_factory.mktemp(f"peft-{name}")
            pipe.save(run_dir)
            runs[name] = pipe, run_dir
        return runs[name]

    return get


def episode(pipe):
    """One fixed episode from the run's own (preprocessed) rows: 48 context rows, 16 query rows."""
    X = torch.as_tensor(pipe.context_X_, dtype=torch.float32)
    y = torch.as_tensor(pipe.context_y_)
    return X[None, :48], y[None, :48], X[None, 48:64]


# the TabICL family's eval forward runs under autocast: its bfloat16 rounding would drown the
# differences measured, so these are compared on their training forward, in full precision
TRAINING_FORWARD = ("tabicl", "orionmsp", "orionbix")


@torch.no_grad()
def outputs(pipe, module) -> torch.Tensor:
    """The model's raw outputs on the fixed episode (``episode_logits``), with no dropout running.

    In the training forward every ``nn.Dropout`` is in eval mode, and those models have no other
    dropout at these sizes; the tests check that the same call twice gives the same outputs."""
    module.train(pipe.adapter_.name in TRAINING_FORWARD)
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.eval()
    try:
        with frozen_parameters(module):  # matmul's path (so its last bit) depends on requires_grad
            return pipe.adapter_.episode_logits(module, *episode(pipe), pipe.task_, pipe.model_config_).float()
    finally:
        module.eval()


def fresh_base(pipe, run_dir: Path) -> torch.nn.Module:
    """The run's base module, built anew: its architecture, then its saved base weights."""
    module = pipe.adapter_.from_architecture(json.loads((run_dir / "pipeline.json").read_text())["architecture"])
    return load_weights(module, load_file(run_dir / "model.safetensors"), run_dir / "model.safetensors")


def merged_module(pipe, run_dir: Path):
    from peft import PeftModel

    return lora.fold(PeftModel.from_pretrained(fresh_base(pipe, run_dir), str(run_dir)))[0].eval()


def record(name: str, **values):
    MEASURED.setdefault(name, {}).update(values)
    print(f"\n{name}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))


# ---- a) peft's own loader ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_peft_from_pretrained_on_a_fresh_base_reproduces_the_run(name, peft_runs):
    from peft import PeftModel

    pipe, run_dir = peft_runs(name)
    ours = outputs(pipe, pipe.module_)
    assert torch.equal(outputs(pipe, pipe.module_), ours)
    base = fresh_base(pipe, run_dir)
    without = outputs(pipe, base)
    loaded = PeftModel.from_pretrained(base, str(run_dir))
    difference = (outputs(pipe, loaded) - ours).abs().max().item()
    effect = (without - ours).abs().max().item()
    record(name, peft_from_pretrained=difference, adapter_effect=effect)
    assert effect > 1e-3  # the adapters matter, so agreement says something
    assert difference <= PEFT_TOLERANCE


# ---- b) merge_and_unload -----------------------------------------------------------------------

def expected_merge(peft_model, base_state: dict, scaling: float) -> dict:
    """``state key -> W0 + scaling · B A`` for every LoRA layer, computed here from the factors."""
    from peft.tuners.lora import Embedding, LoraLayer, ParamWrapper

    expected = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(layer, Embedding):
            A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
            delta, key = (B @ A).T, f"{path}.weight"
        else:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            key = f"{path}.{layer.parameter_name}" if isinstance(layer, ParamWrapper) else f"{path}.weight"
            delta = B @ A
        assert key not in expected, f"{key} adapted twice"
        expected[key] = base_state[key] + scaling * delta.detach()
    return expected


@pytest.mark.parametrize("name", NAMES)
def test_merge_folds_every_adapter_by_value_and_reproduces_the_run(name, peft_runs):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, ParamWrapper

    pipe, run_dir = peft_runs(name)
    config = json.loads((run_dir / "adapter_config.json").read_text())
    base_state = load_file(run_dir / "model.safetensors")
    ours = outputs(pipe, pipe.module_)

    # peft's merge_and_unload alone: outputs kept, but it skips a LoRA layer inside another adapted module
    plain = PeftModel.from_pretrained(fresh_base(pipe, run_dir), str(run_dir)).merge_and_unload().eval()
    peft_only = (outputs(pipe, plain) - ours).abs().max().item()
    skipped = [n for n, m in plain.named_modules() if isinstance(m, LoraLayer)]
    assert peft_only <= MERGED_TOLERANCE
    assert all(n.endswith(".out_proj") for n in skipped)  # only an out_proj inside a packed attention

    peft_model = PeftModel.from_pretrained(fresh_base(pipe, run_dir), str(run_dir))
    expected = expected_merge(peft_model, base_state, config["lora_alpha"] / config["r"])
    packed = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, ParamWrapper)]
    merged, n_layers = lora.fold(peft_model)
    merged.eval()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    state = merged.state_dict()
    assert set(state) == set(base_state)  # the official keys, nothing of peft's left
    by_value = max((state[k] - v).abs().max().item() for k, v in expected.items())
    untouched = [k for k in base_state if k not in expected and not torch.equal(state[k], base_state[k])]
    difference = (outputs(pipe, merged) - ours).abs().max().item()
    record(name, merged_tensors=n_layers, packed_parameters=len(packed), peft_left_unmerged=len(skipped),
           merge_by_value=by_value, merged_outputs=difference)
    assert n_layers == len(expected) and by_value <= 1e-6 and untouched == []
    assert all(not torch.equal(state[k], base_state[k]) for k in expected)
    if name in ("tabicl", "orionmsp", "orionbix"):
        assert packed and all(f"{p}.in_proj_weight" in expected for p in packed)
    assert difference <= MERGED_TOLERANCE


# ---- c) the official checkpoint, through the model's own package and ours ----------------------

def plain_data(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain_data(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))


def load_with_own_package(name: str, path: Path):
    """The module the model's own package builds from ``path`` with its own checkpoint loader (None: no package)."""
    if name == "tabicl":
        from tabicl import TabICLClassifier
        from tabicl._model.tabicl import TabICL

        estimator = TabICLClassifier(model_path=str(path), allow_auto_download=False)
        estimator._load_model()
        assert type(estimator.model_) is TabICL  # the package's class, whose attention reads out_proj.weight
        return estimator.model_
    if name == "tabpfn":
        from tabpfn.model_loading import load_model_criterion_config

        models, _, _, _ = load_model_criterion_config(path, check_bar_distribution_criterion=False,
                                                      estimator_type="classifier", version="v2",
                                                      download_if_not_exists=False)
        # the architecture tabtune reads from the same file: its training forward runs the package's estimator,
        # which needs the file's inference config beside the module the package built
        models[0].tabtune_architecture = get_adapter("tabpfn").build(
            TabPFNConfig(checkpoint=str(path)), Task("classification", 2))[1]
        return models[0]
    if name == "tabdpt":
        from tabdpt import TabDPTClassifier

        return TabDPTClassifier(model_weight_path=str(path), device="cpu", use_flash=False, compile=False,
                                verbose=False).model
    return None


@pytest.mark.parametrize("name", NAMES)
def test_the_written_checkpoint_loads_in_the_models_own_package_and_in_tabtune(name, peft_runs, tmp_path):
    pipe, run_dir = peft_runs(name)
    adapter = pipe.adapter_
    assert type(adapter).write_checkpoint is not ModelAdapter.write_checkpoint, \
        f"{adapter.title} has no write_checkpoint of its own"
    merged = merged_module(pipe, run_dir)
    path = adapter.write_checkpoint(merged, pipe.architecture_, pipe.task_, tmp_path / "merged")
    assert path.is_file() and path.parent == tmp_path / "merged"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt"):
            pass
    else:
        assert plain_data(torch.load(path, map_location="cpu", weights_only=True))
    ours = outputs(pipe, pipe.module_)

    official = load_with_own_package(name, path)
    if official is not None:
        package = (outputs(pipe, official) - ours).abs().max().item()
        record(name, own_package=package)
        assert package <= PACKAGE_TOLERANCE

    config = dataclasses.replace(pipe.model_config_, pretrained=True, checkpoint=str(path))
    reread, _ = adapter.build(config, pipe.task_)
    assert torch.equal(outputs(pipe, reread), outputs(pipe, reread))
    tabtune = (outputs(pipe, reread) - outputs(pipe, merged)).abs().max().item()
    adapter_bytes = (run_dir / "adapter_model.safetensors").stat().st_size
    base_bytes = (run_dir / "model.safetensors").stat().st_size
    record(name, tabtune_reread=tabtune, vs_run=(outputs(pipe, reread) - ours).abs().max().item(),
           file=path.name, adapter_kb=f"{adapter_bytes / 1024:.1f}", base_kb=f"{base_bytes / 1024:.1f}",
           merged_kb=f"{path.stat().st_size / 1024:.1f}", adapter_ratio=f"{adapter_bytes / base_bytes:.1%}")
    assert tabtune == 0.0


@pytest.mark.parametrize("name", [n for n in NAMES if "regression" in ADAPTERS[n].tasks])
def test_a_regression_checkpoint_keeps_its_head_and_loads_in_the_models_own_package(name, tmp_path):
    """No training needed: a random regression module with noise in every tensor, written and read back."""
    adapter = ADAPTERS[name]()
    task = Task("regression")
    config = adapter.config_class(name=name, pretrained=False, size=SIZE.get(name, "tiny"))
    torch.manual_seed(0)
    module, architecture = adapter.build(config, task)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and "borders" not in key:
                tensor.add_(torch.randn_like(tensor) * 0.05)
    path = adapter.write_checkpoint(module.eval(), architecture, task, tmp_path)
    if path.suffix != ".safetensors":
        assert plain_data(torch.load(path, map_location="cpu", weights_only=True))
    reread, _ = adapter.build(dataclasses.replace(config, pretrained=True, checkpoint=str(path)), task)
    state, again = module.state_dict(), reread.state_dict()
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    if name == "tabicl":
        from tabicl import TabICLRegressor

        estimator = TabICLRegressor(model_path=str(path), allow_auto_download=False)
        estimator._load_model()
        official = estimator.model_.state_dict()
    elif name == "tabpfn":
        from tabpfn.model_loading import load_model_criterion_config

        models, criterion, _, _ = load_model_criterion_config(path, check_bar_distribution_criterion=True,
                                                              estimator_type="regressor", version="v2",
                                                              download_if_not_exists=False)
        official = {**models[0].state_dict(), "regression_borders": criterion.borders}
    elif name == "tabdpt":
        from tabdpt import TabDPTRegressor

        official = TabDPTRegressor(model_weight_path=str(path), device="cpu", use_flash=False, compile=False,
                                   verbose=False).model.state_dict()
    else:
        return
    assert set(official) == set(state) and all(torch.equal(official[k], state[k]) for k in state)


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """A saved peft, base-ft and inference TabICL run (TabICL: packed attention parameters)."""
    out = {}
    for strategy in ("peft", "base-ft", "inference"):
        folder = tmp_path_factory.mktemp(strategy)
        fit("tabicl", strategy, *table).save(folder)
        out[strategy] = folder
    return out


def tabtune(capsys, *args: str) -> tuple[int, str, str]:
    """``tabtune ARGS`` in this process: exit code, stdout, stderr."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_merge_command_writes_the_official_file_once_and_says_what_it_did(runs, capsys):
    run_dir = runs["peft"]
    code, shown, _ = tabtune(capsys, "merge", f"run={run_dir}")
    written = run_dir / "merged" / ADAPTERS["tabicl"].checkpoints["classification"]
    assert code == 0 and written.is_file()
    for said in ("LoRA merged into", "weight tensors", "adapter file", "of the merged weights", "MB", "read back"):
        assert said in shown, said
    code, _, err = tabtune(capsys, "merge", f"run={run_dir}")
    assert code == 2 and "overwrite=true" in err and len(err.strip().splitlines()) == 1
    code, _, _ = tabtune(capsys, "merge", f"run={run_dir}", "overwrite=true")
    assert code == 0
    from tabicl import TabICLClassifier

    estimator = TabICLClassifier(model_path=str(written), allow_auto_download=False)
    estimator._load_model()  # the package's own loader takes the merged file


def test_export_writes_a_base_ft_run_and_an_inference_run_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    code, shown, _ = tabtune(capsys, "export", f"run={runs['base-ft']}", f"output={out}")
    assert code == 0 and "exported" in shown
    saved = load_file(runs["base-ft"] / "model.safetensors")
    state = torch.load(out / ADAPTERS["tabicl"].checkpoints["classification"], weights_only=True)["state_dict"]
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    code, _, err = tabtune(capsys, "merge", f"run={runs['inference']}")
    assert code == 2 and "inference run changed no weight" in err


def test_an_inference_run_that_folded_adapters_in_is_exported(runs, table, tmp_path, capsys):
    """model.adapters under inference folds another run's LoRA into the weights: those weights are the run's
    model, and export writes them (read back and compared with the run's predictions, as for base-ft)."""
    folded = TabularPipeline(model_name="tabicl", tuning_strategy="inference", tuning_params={"show_progress": False},
                             model_params={**MODEL, "adapters": str(runs["peft"])}, device="cpu",
                             seed=SEED).fit(*table).save(tmp_path / "folded")
    out = tmp_path / "exported"
    code, shown, err = tabtune(capsys, "export", f"run={folded}", f"output={out}")
    assert code == 0, err
    assert "read back" in shown
    saved = load_file(folded / "model.safetensors")
    state = torch.load(out / ADAPTERS["tabicl"].checkpoints["classification"], weights_only=True)["state_dict"]
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    base = load_file(runs["inference"] / "model.safetensors")  # the same random base, without the adapters
    assert set(base) == set(saved) and any(not torch.equal(saved[k], base[k]) for k in saved)


@pytest.mark.parametrize("args,message", [
    (["rnu=x"], "unknown key 'rnu' (known keys: run, output, overwrite, verify)"),
    (["x"], "expected key=value, got 'x'"),
    ([], "run= is required"),
    (["run=a", "overwrite=maybe"], "overwrite must be true or false"),
    (["run=."], "pipeline.json is missing"),
])
def test_merge_arguments_are_checked_in_one_line(args, message, capsys):
    code, _, err = tabtune(capsys, "merge", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# ---- the model card -----------------------------------------------------------------------------

def test_the_model_card_holds_the_facts_not_peft_s_empty_template(runs, tmp_path):
    facts = {"model": "TabICL", "checkpoint": "tabicl-classifier-v2-20260212.ckpt", "dataset": "churn.csv",
             "strategy": "peft", "task": {"kind": "classification", "n_classes": 2},
             "lora": {"r": 8, "lora_alpha": 16.0, "target_modules": ["icl_predictor.tf_icl"]},
             "metrics": {"test": {"accuracy": 0.8125, "log_loss": 0.41}, "val": {"accuracy": 0.75}}}
    path = lora.write_card(tmp_path, facts)
    card = path.read_text()
    assert path == tmp_path / "README.md"
    for fact in ("TabICL", "tabicl-classifier-v2-20260212.ckpt", "churn.csv", "peft", "classification, 2 classes",
                 "| r | 8 |", "| lora_alpha | 16 |", "icl_predictor.tf_icl", "| accuracy | 0.8125 | 0.75 |",
                 "| log_loss | 0.41 |  |", "library_name: peft"):
        assert fact in card, fact
    assert "More Information Needed" not in card
    # a saved peft run's card is the real one too, not the template peft writes
    saved = (runs["peft"] / "README.md").read_text()
    assert "More Information Needed" not in saved and "| r | 2 |" in saved
