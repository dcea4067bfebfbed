"""Settings that would be silently ignored (errors and warnings), ``tabtune cp`` and ``tabtune validate``,
driven in-process through the CLI's own entry point."""

from __future__ import annotations


import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from tabtune_cli.commands.config_tools import shipped_configs
from tabtune_cli.config import LoraSettings, ModelConfig, StrategyConfig
from tabtune_cli.strategies import check_combination
from tabtune_cli.errors import TabTuneError
from tabtune_cli.commands.hydra_conf import compose_train

FAST = ["debug=smoke", "dataset=iris"]  # nano (the default model), random tiny weights, 300 rows at most


def one_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tabtune: error: "), err
    return lines[0]


# ---- check_combination: the one function the CLI and the library share ---------------------------

@pytest.mark.parametrize("model,strategy,lora,given,expected", [
    ({"checkpoint": "w.ckpt", "pretrained": False}, {}, {}, set(),
     "model.checkpoint='w.ckpt' and model.pretrained=false contradict"),
    ({}, {"name": "peft"}, {"bias": "some"}, set(), "'lora.bias': 'some' is not one of: none, all, lora_only"),
    ({}, {"name": "peft"}, {"r": 0}, set(), "'lora.r': expected a whole number >= 1 or 'auto', got 0"),
    ({}, {"name": "peft"}, {"r": "big"}, set(), "got 'big'"),
    ({}, {"name": "peft"}, {"r": 2.5}, set(), "got 2.5"),
    ({}, {"name": "peft"}, {"r": True}, set(), "got True"),
    ({}, {"name": "peft"}, {"lr_ratio": 0.0}, set(), "'lora.lr_ratio': must be greater than 0"),
    ({}, {"name": "peft"}, {"lr_ratio": -2.0}, set(), "got -2.0"),
])
def test_contradictions_and_bad_values_are_one_line_errors(model, strategy, lora, given, expected):
    with pytest.raises(TabTuneError, match=expected.replace("(", r"\(")) as err:
        check_combination(ModelConfig(**model), StrategyConfig(**strategy), LoraSettings(**lora), given)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["inference", "base-ft", "peft"])
def test_ignored_keys_are_warned_about_by_name(name):
    given = {"strategy.epochs", "strategy.learning_rate", "strategy.show_progress", "strategy", "lora.r",
             "lora.lr_ratio", "model.n_estimators", "seed"}
    warnings = check_combination(ModelConfig(), StrategyConfig(name=name), LoraSettings(r="auto", lr_ratio=4.0),
                                 given)
    expected = {
        "inference": ["strategy.epochs and strategy.learning_rate are ignored by strategy=inference: no training",
                      ("lora.lr_ratio and lora.r are ignored by strategy=inference: "
                       "only strategy=peft trains LoRA adapters")],
        "base-ft": ["lora.lr_ratio and lora.r are ignored by strategy=base-ft: only strategy=peft trains LoRA adapters"],
        "peft": [],
    }[name]
    assert warnings == expected
    assert check_combination(ModelConfig(), StrategyConfig(name=name), LoraSettings(), set()) == []


# ---- the command line: errors, warnings --------------------------------------------------------

@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    frame = pd.DataFrame({"a": range(40), "b": [i % 7 for i in range(40)], "label": ["x", "y"] * 20})
    frame.to_csv(root / "train.csv", index=False)
    frame.to_csv(root / "test.csv", index=False)
    return root


@pytest.mark.parametrize("args,culprit", [
    (["model.checkpoint=w.safetensors", "model.pretrained=false"],
     "model.checkpoint='w.safetensors' and model.pretrained=false contradict"),
    (["strategy=peft", "lora.bias=everything"], "config key 'lora.bias': 'everything' is not one of"),
    (["strategy=peft", "lora.r=0"], "config key 'lora.r': expected a whole number >= 1 or 'auto', got 0"),
    (["strategy=peft", "lora.r=abc"], "config key 'lora.r'"),
    (["strategy=peft", "lora.lr_ratio=0"], "config key 'lora.lr_ratio': must be greater than 0"),
    (["dataset=file", "dataset.path={root}/train.csv", "dataset.target=label", "dataset.test_path={root}/test.csv",
      "dataset.test_size=0.3"], "dataset.test_size=0.3 and dataset.test_path="),
    (["dataset=file", "dataset.path={root}/nope.csv", "dataset.target=label"], "nope.csv: no such file"),
    (["dataset=file", "dataset.path={root}/train.csv", "dataset.target=nope"], "target column 'nope' not found"),
])
@pytest.mark.parametrize("command", ["validate", "train"])
def test_each_bad_setting_is_one_line_before_any_run(command, args, culprit, tables, tabtune, tmp_path):
    code, out, err = tabtune(command, "debug=smoke", *[a.format(root=tables) for a in args])
    assert culprit in one_error(code, err)
    assert not list(tmp_path.rglob("run.json"))  # train: Hydra's empty folder for the job is all that is left
    assert command == "train" or not (tmp_path / "runs").exists()


def test_lora_r_auto_and_lr_ratio_validate_under_peft(tabtune):
    code, out, err = tabtune("validate", *FAST, "strategy=peft", "lora.r=auto", "lora.lr_ratio=16")
    assert code == 0 and err == "", err
    lora = yaml.safe_load(out.rsplit("ok", 1)[0])["lora"]
    assert lora["r"] == "auto" and lora["lr_ratio"] == 16.0


def test_ignored_settings_warn_once_on_the_console_and_in_every_train_log(tabtune, tmp_path):
    # a two-job sweep of inference runs: both ignore strategy.epochs and lora.r, checked up front and again per job
    code, out, err = tabtune("train", "-m", *FAST, "strategy.epochs=3", "lora.r=4,8")
    assert code == 0, err
    assert err.splitlines() == [
        "tabtune: warning: strategy.epochs is ignored by strategy=inference: no training",
        "tabtune: warning: lora.r is ignored by strategy=inference: only strategy=peft trains LoRA adapters"]
    logs = sorted((tmp_path / "runs" / "multirun").rglob("train.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert text.count("WARNING strategy.epochs is ignored by strategy=inference") == 1
        assert text.count("WARNING lora.r is ignored by strategy=inference") == 1
        assert "ignored" not in text.replace("strategy.epochs is ignored", "").replace("lora.r is ignored", "")


# ---- tabtune cp ---------------------------------------------------------------------------------

def test_cp_lists_copies_and_never_overwrites(tabtune, tmp_path):
    code, listing, _ = tabtune("cp", "--list")
    names = [line.split()[0] for line in listing.splitlines()]
    assert code == 0 and names == list(shipped_configs())
    assert {"train", "pretrain", "leaderboard", "model/tabicl", "strategy/peft", "lora/default",
            "dataset/file"} <= set(names)
    assert tabtune("cp")[1] == listing
    assert "available: train, pretrain, leaderboard, leaderboard_lora_ranks, leaderboard_strategies, dataset/" in one_error(*tabtune("cp", "model/huge", "x.yaml")[::2])

    code, out, _ = tabtune("cp", "lora/default", "mine.yaml")
    assert code == 0 and "copied lora/default to mine.yaml" in out
    (tmp_path / "mine.yaml").write_text("edited\n")
    assert "mine.yaml already exists (pass --force" in one_error(*tabtune("cp", "lora/default", "mine.yaml")[::2])
    assert (tmp_path / "mine.yaml").read_text() == "edited\n"
    assert tabtune("cp", "lora/default", "mine.yaml", "--force")[0] == 0
    assert "r: 8" in (tmp_path / "mine.yaml").read_text()
    assert "ends in .yaml" in one_error(*tabtune("cp", "train", "my.yml")[::2])


@pytest.mark.parametrize("name", list(shipped_configs()))
def test_every_shipped_config_copies_to_a_file_that_composes(name, tabtune, tmp_path):
    group, _, option = name.rpartition("/")
    target = f"my_conf/{group}/my_{option}.yaml" if group else f"my_conf/my_{name}.yaml"
    code, out, _ = tabtune("cp", name, target)
    assert code == 0
    if group == "pretrain_model":  # chosen on pretrain's command line as `model=`
        assert f"use it: tabtune pretrain --config-dir my_conf model=my_{option}" in out
        cfg, shipped = compose_train([f"{group}=my_{option}"], "pretrain", "my_conf"), \
            compose_train([f"{group}={option}"], "pretrain")
    elif group:
        cfg = compose_train([f"{group}=my_{option}", *([] if group == "debug" else ["debug=smoke"])], "train",
                            "my_conf")
        shipped = compose_train([f"{group}={option}", *([] if group == "debug" else ["debug=smoke"])])
    else:
        cfg, shipped = compose_train([], f"my_{name}", "my_conf"), compose_train([], name)
    # the copy's header comment changes nothing, `# @package _global_` included (unresolved: `${now:}` moves)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(shipped)


def test_cp_round_trip_an_edited_copy_is_what_runs(tabtune, tmp_path):
    """cp train + cp a model option beside it, edit one value in each (the top copy now names the model copy
    in its defaults list), validate, run: the run used both edits."""
    assert tabtune("cp", "train", "my_conf/my.yaml")[0] == 0
    code, out, _ = tabtune("cp", "model/nano", "my_conf/model/")
    assert code == 0 and "use it: tabtune train --config-dir my_conf model=my_nano" in out
    top, nano = tmp_path / "my_conf" / "my.yaml", tmp_path / "my_conf" / "model" / "my_nano.yaml"
    top.write_text(top.read_text().replace("seed: 0", "seed: 7").replace("model: nano", "model: my_nano"))
    nano.write_text(nano.read_text().replace("softmax_temperature: 0.9", "softmax_temperature: 0.7"))

    code, out, err = tabtune("validate", "my_conf/my.yaml", "dataset=iris")
    assert code == 0 and out.rstrip().endswith("ok"), err
    resolved = yaml.safe_load(out.rsplit("ok", 1)[0])
    assert resolved["seed"] == 7 and resolved["model"]["softmax_temperature"] == 0.7
    code, out, _ = tabtune("validate", "--config-dir", "my_conf", "model=my_nano", "dataset=iris")
    assert code == 0 and yaml.safe_load(out.rsplit("ok", 1)[0])["model"]["softmax_temperature"] == 0.7
    assert not (tmp_path / "runs").exists()

    code, out, err = tabtune("train", "--config", "my_conf/my.yaml", *FAST)
    assert code == 0, err
    (config,) = (tmp_path / "runs").rglob("config.yaml")
    ran = yaml.safe_load(config.read_text())
    assert ran["seed"] == 7 and ran["model"]["name"] == "nano" and ran["model"]["softmax_temperature"] == 0.7
    assert "--config nope.yaml: no such file" in one_error(*tabtune("train", "--config", "nope.yaml")[::2])


def test_a_copy_named_like_a_shipped_config_is_refused_not_ignored(tabtune, tmp_path):
    # Hydra reads the shipped tree first: such a copy would be silently ignored
    assert "the shipped strategy/peft has this name" in one_error(
        *tabtune("cp", "strategy/peft", "my_conf/strategy/peft.yaml")[::2])
    assert "the shipped train has this name" in one_error(*tabtune("cp", "train", "train.yaml")[::2])
    (tmp_path / "my_conf" / "strategy").mkdir(parents=True)
    (tmp_path / "my_conf" / "strategy" / "peft.yaml").write_text("name: peft\nepochs: 99\n")
    for command in ("validate", "train"):
        line = one_error(*tabtune(command, "--config-dir", "my_conf", "strategy=peft")[::2])
        assert "my_conf/strategy/peft.yaml: the shipped strategy/peft has this name" in line
    assert not (tmp_path / "runs").exists()


# ---- tabtune validate ---------------------------------------------------------------------------

def test_validate_prints_the_resolved_config_and_ok_and_creates_nothing(tabtune, tmp_path):
    code, out, err = tabtune("validate", *FAST, "strategy=base-ft", "strategy.epochs=2")
    assert code == 0 and err == ""
    body, last = out.rstrip().rsplit("\n", 1)
    assert last == "ok" and yaml.safe_load(body)["strategy"]["epochs"] == 2
    assert list(tmp_path.iterdir()) == []


def test_validate_names_a_bad_key(tabtune):
    assert "'strategy.learnign_rate'" in one_error(*tabtune("validate", "strategy.learnign_rate=0.1")[::2])
    assert "unknown option '--cfg'" in one_error(*tabtune("validate", "--cfg", "job")[::2])


def test_validate_checks_every_combination_of_a_sweep(tabtune):
    code, out, err = tabtune("validate", "-m", *FAST, "strategy=base-ft,peft", "lora.r=4,auto")
    assert code == 0, err
    assert out.splitlines()[-1] == "ok: all 4 combinations" and len(out.splitlines()) == 5
    assert err.splitlines() == [
        "tabtune: warning: lora.r is ignored by strategy=base-ft: only strategy=peft trains LoRA adapters"]
    line = one_error(*tabtune("validate", "-m", *FAST, "strategy=peft", "lora.r=4,0")[::2])
    assert "[debug=smoke dataset=iris strategy=peft lora.r=0] config key 'lora.r'" in line
    assert "add -m" in one_error(*tabtune("validate", "lora.r=4,8")[::2])


def test_validate_a_copied_pretrain_config(tabtune, tmp_path):
    assert tabtune("cp", "pretrain", "pre.yaml")[0] == 0
    code, out, _ = tabtune("validate", "pre.yaml", "steps=10")
    assert code == 0 and yaml.safe_load(out.rsplit("ok", 1)[0])["steps"] == 10
    assert "'steps'" in one_error(*tabtune("validate", "--config", "pre.yaml", "steps=many")[::2])


def test_help_lists_cp_and_validate(tabtune):
    code, out, _ = tabtune("--help")
    assert code == 0 and "\n  cp " in out and "\n  validate " in out
